"""saflex_data.adapters.timm pieces that train.py uses: TaggedMixup, check_train_args, log_line, the holdout loader."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("PIL")

from timm.data import create_dataset  # noqa: E402

from saflex_data import SaflexLoss, SaflexTarget  # noqa: E402
from saflex_data.adapters.timm import (  # noqa: E402
    TaggedMixup,
    check_train_args,
    create_val_loader,
    log_line,
    mixup_args_from,
    train_class_map,
)

from .conftest import make_model  # noqa: E402
from .test_adapters_timm import CPU, SIZE, dataset, train_loader, write_image_folder  # noqa: E402, F401
from .test_adapters_timm import data_dir as data_dir  # noqa: E402  (a fixture: the tests take it by name)


def _batch(rows: int = 6, classes: int = 3) -> tuple[torch.Tensor, SaflexTarget]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 3, 8, 8, generator=gen)
    labels = torch.arange(rows) % classes
    return x, SaflexTarget(labels, torch.zeros(rows, dtype=torch.bool), op=torch.full((rows,), -1), op_names=())


class TestTaggedMixup:
    def test_mixup_tags_every_mixed_row(self) -> None:
        x, target = _batch()
        mix = TaggedMixup(mixup_alpha=1.0, num_classes=3, generator=torch.Generator().manual_seed(1))
        out, mixed = mix(x, target)
        assert mixed.is_soft and mixed.labels.shape == (6, 3)
        torch.testing.assert_close(mixed.labels.sum(1), torch.ones(6))
        changed = (out != x).flatten(1).any(1)
        assert torch.equal(changed, mixed.is_augmented) and bool(changed.any())
        assert mixed.op_names == ("mixup",)

    def test_switch_to_cutmix(self) -> None:
        x, target = _batch()
        mix = TaggedMixup(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0, num_classes=3,
                          generator=torch.Generator().manual_seed(2))
        _, mixed = mix(x, target)
        assert mixed.op_names == ("cutmix",)

    @pytest.mark.parametrize("kwargs", [{"prob": 0.0}, {"prob": 0.0, "mode": "elem"}])
    def test_prob_zero_leaves_the_batch(self, kwargs: dict) -> None:
        x, target = _batch()
        out, same = TaggedMixup(num_classes=3, **kwargs)(x, target)
        assert out is x and same == target or (torch.equal(out, x) and not same.is_augmented.any())

    def test_mixup_enabled_false_is_identity(self) -> None:
        x, target = _batch()
        mix = TaggedMixup(num_classes=3)
        mix.mixup_enabled = False  # train.py at --mixup-off-epoch
        out, same = mix(x, target)
        assert out is x and same is target

    def test_plain_labels_and_training_step(self) -> None:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).double()
        val = [(torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2]))]
        criterion = SaflexLoss(model, val, label_smoothing=0.1)
        x, target = _batch()
        out, mixed = TaggedMixup(num_classes=3, generator=torch.Generator().manual_seed(3))(x.double(), target.labels)
        loss = criterion(model(out), mixed)
        loss.backward()
        assert torch.isfinite(loss) and criterion.stats["augmented_fraction"] > 0  # rows paired with themselves stay

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"cutmix_minmax": (0.2, 0.8)}, r"cutmix_minmax=\(0.2, 0.8\) \(--cutmix-minmax\) is not supported"),
            ({"mode": "pair"}, r"mode='pair' \(--mixup-mode\) is not supported .* use 'batch' or 'elem'"),
            ({"mixup_alpha": 0.0}, r"mixup_alpha or cutmix_alpha must be > 0, but got 0.0 and 0.0"),
            ({"prob": 1.5}, r"prob must be a probability in \[0, 1\], but got 1.5"),
            ({"switch_prob": -1}, r"switch_prob must be a probability in \[0, 1\], but got -1"),
        ],
    )
    def test_errors(self, kwargs: dict, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            TaggedMixup(num_classes=3, **kwargs)


def _args(**overrides) -> argparse.Namespace:
    args = dict(
        jsd_loss=False, bce_loss=False, naflex_loader=False, train_img_sizes=None, no_aug=False, mixup=0.0, cutmix=0.0,
        cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", smoothing=0.1, num_classes=10,
    )
    args.update(overrides)
    return argparse.Namespace(**args)


class TestCheckTrainArgs:
    def test_defaults_and_supported_mixing_pass(self) -> None:
        check_train_args(_args())
        check_train_args(_args(mixup=0.8, cutmix=1.0, mixup_mode="elem"))
        check_train_args(argparse.Namespace())  # options a script does not have are skipped

    @pytest.mark.parametrize(
        "overrides, match",
        [
            ({"jsd_loss": True}, r"--jsd-loss cannot be combined with SAFLEX: .* Drop --jsd-loss \(keep --aug-splits"),
            ({"bce_loss": True}, r"--bce-loss is not supported with SAFLEX: .*softmax cross-entropy.* Drop --bce-loss"),
            ({"naflex_loader": True}, r"--naflex-loader is not supported with SAFLEX"),
            ({"train_img_sizes": [32, 64]}, r"--train-img-sizes \(scheduled resolutions\) is not supported"),
            ({"no_aug": True}, r"--no-aug leaves SAFLEX nothing to weigh"),
            ({"mixup": 0.8, "cutmix_minmax": [0.2, 0.8]}, r"--cutmix-minmax\) is not supported"),
            ({"cutmix": 1.0, "mixup_mode": "pair"}, r"--mixup-mode\) is not supported"),
        ],
    )
    def test_unsupported_options_raise(self, overrides: dict, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            check_train_args(_args(**overrides))

    def test_mixup_args_are_train_py_s(self) -> None:
        args = _args(mixup=0.8, cutmix=1.0)
        assert mixup_args_from(args) == dict(
            mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5, mode="batch",
            label_smoothing=0.1, num_classes=10,
        )


class TestLogLine:
    def test_interval_fractions(self) -> None:
        model = make_model("mlp", num_classes=3)
        gen = torch.Generator().manual_seed(0)
        val = [(torch.randn(6, 5, dtype=torch.float64, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2]))]
        criterion = SaflexLoss(model, val)
        assert log_line(criterion) == "SAFLEX: no augmented samples yet (step 0)"
        kept = relabeled = count = 0.0
        for step in range(3):
            x = torch.randn(8, 5, dtype=torch.float64, generator=gen)
            aug = torch.arange(8) >= 2
            op = torch.where(aug, 0, -1)
            criterion(model(x), SaflexTarget(torch.randint(0, 3, (8,), generator=gen), aug, op=op, op_names=("a",)))
            if step == 0:
                first = log_line(criterion)
                continue
            s = criterion.stats
            kept += s["kept_fraction"] * 6
            relabeled += s["relabeled_fraction"] * 6
            count += 6
        line = log_line(criterion)
        s = criterion.stats
        assert first.startswith("SAFLEX: kept ") and "of 6 augmented samples since the last log" in first
        assert line.startswith(f"SAFLEX: kept {kept / count:.3f}, relabeled {relabeled / count:.3f} of 12 augmented")
        assert line.endswith(
            f"(last step: kept {s['kept_fraction']:.3f}, relabeled {s['relabeled_fraction']:.3f}, weight "
            f"{s['weight_mean']:.3f}, augmented 0.750; step 3)"
        )
        assert "no augmented samples since the last log" in log_line(criterion)


class TestHoldoutLoader:
    def test_own_batch_size_default_128(self, data_dir: Path) -> None:
        train = train_loader(data_dir)
        val = create_val_loader(dataset(data_dir, "holdout"), SIZE, train_loader=train, num_workers=0)
        assert val.loader.batch_size == 128  # independent of the training batch size (4)

    def test_takes_the_training_workers(self, data_dir: Path) -> None:
        train = train_loader(data_dir)
        train.loader.num_workers = 2  # as if built with num_workers=2 (no worker is started here)
        val = create_val_loader(dataset(data_dir, "holdout"), SIZE, 4, train_loader=train)
        assert val.loader.num_workers == 2
        val = create_val_loader(dataset(data_dir, "holdout"), SIZE, 4, train_loader=train, num_workers=0)
        assert val.loader.num_workers == 0

    def test_class_map_mismatch_raises_and_the_training_map_fixes_it(self, data_dir: Path, tmp_path: Path) -> None:
        root = tmp_path / "three"
        write_image_folder(root / "train", n_per_class=2, num_classes=3)
        write_image_folder(root / "holdout", n_per_class=2, num_classes=3)
        (root / "holdout" / "class0").rename(tmp_path / "gone")  # holdout lacks class0: sorted names shift
        train = create_dataset("", root=str(root), split="train", is_training=True)
        from saflex_data.adapters.timm import create_train_loader

        loader = create_train_loader(train, SIZE, 2, device=CPU, num_workers=0, auto_augment="rand-m9-mstd0.5")
        assert train_class_map(loader) == {"class0": 0, "class1": 1, "class2": 2}
        holdout = create_dataset("", root=str(root), split="holdout", is_training=False)
        with pytest.raises(
            ValueError,
            match=r"the held-out dataset's class_to_idx does not match the training set's \('class1' is 0 here but 1 "
            r"in training; 'class2' is 1 here but 2 in training; missing here: \['class0'\]\), so its labels would "
            r"name other classes. Build it with the training class map: create_dataset\(\.\.\., "
            r"class_map=train_class_map\(loader_train\)\)",
        ):
            create_val_loader(holdout, SIZE, 2, train_loader=loader, num_workers=0)
        holdout = create_dataset("", root=str(root), split="holdout", is_training=False,
                                 class_map=train_class_map(loader))
        val = create_val_loader(holdout, SIZE, 2, train_loader=loader, num_workers=0, drop_last=False)
        labels = sorted(int(y) for _, ys in val for y in ys)
        assert labels == [1, 1, 2, 2]  # class1 and class2 keep their training indices

    def test_no_class_map_no_check(self, data_dir: Path) -> None:
        assert train_class_map(torch.utils.data.TensorDataset(torch.zeros(2))) is None
