"""timm train.py support: the held-out split checks, the start-up and log lines, checkpoints, refused options."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
pytest.importorskip("PIL")

from timm.data import create_dataset  # noqa: E402

from saflex_data import SaflexLoss, SaflexTarget  # noqa: E402
from saflex_data.adapters.timm import (  # noqa: E402
    SaflexTask,
    ValPrepare,
    check_train_args,
    create_holdout_dataset,
    create_val_loader,
    describe_holdout,
    has_task_api,
    log_line,
    plain_cross_entropy,
)

from .test_adapters_timm import CPU, SIZE, tiny_model, train_loader, write_image_folder  # noqa: E402


def _root(tmp_path: Path, splits: tuple[str, ...] = ("train", "holdout", "validation"), classes: int = 3) -> Path:
    for seed, split in enumerate(splits):
        write_image_folder(tmp_path / split, n_per_class=2, num_classes=classes, size=8, seed=seed)
    return tmp_path


def _train(root: Path):
    return create_dataset("", root=str(root), split="train", is_training=True)


def _eval(root: Path):
    return create_dataset("", root=str(root), split="validation", is_training=False)


def _holdout(root: Path, split: str = "holdout", **kwargs):
    kwargs.setdefault("eval_dataset", _eval(root) if (root / "validation").is_dir() else None)
    return create_holdout_dataset("", str(root), split, train_dataset=_train(root), **kwargs)


class TestHoldoutSplit:
    def test_a_proper_split_is_built_with_the_training_indices(self, tmp_path: Path) -> None:
        root = _root(tmp_path)
        shutil.rmtree(root / "holdout" / "class0")  # a class missing from the held-out split is fine
        ds = _holdout(root)
        assert len(ds) == 4
        assert sorted({y for _, y in ds.reader.samples}) == [1, 2]  # the training indices of class1, class2
        line = describe_holdout(ds, aug_prob=0.5)
        assert str(root / "holdout") in line and "4 images, 2 classes [class1, class2]" in line
        assert "fraction 0.5 of the samples (--saflex-aug-prob" in line
        assert "[clean; augmented] x2" in describe_holdout(ds, aug_prob=0.5, num_aug_splits=2)

    def test_missing_split_is_refused_not_the_data_root(self, tmp_path: Path) -> None:  # T1
        root = _root(tmp_path, splits=("train", "validation"))
        # what timm itself does: the data root, the reported split included
        assert len(create_dataset("", root=str(root), split="holdout")) == 12
        with pytest.raises(ValueError, match=r"held-out split 'holdout' is missing: .*holdout' is not a folder "
                                             r"\(timm would silently use every image under"):
            _holdout(root)

    @pytest.mark.parametrize("split", [".", "train", "validation"])
    def test_split_resolving_to_the_root_or_another_split_is_refused(self, tmp_path: Path, split: str) -> None:
        root = _root(tmp_path)
        with pytest.raises(ValueError, match=r"held-out split '.*' resolves to the (data root|training split|"
                                             r"evaluation split)"):
            _holdout(root, split)

    def test_renamed_class_is_refused(self, tmp_path: Path) -> None:  # T2
        root = _root(tmp_path)
        os.rename(root / "holdout" / "class2", root / "holdout" / "two")
        with pytest.raises(ValueError, match=r"class folders that are not training classes: \['two'\] \(training "
                                             r"classes: \[class0, class1, class2\]\)"):
            _holdout(root)

    def test_all_classes_renamed_is_refused(self, tmp_path: Path) -> None:  # T2, not "Found 0 images"
        root = _root(tmp_path)
        for c in range(3):
            os.rename(root / "holdout" / f"class{c}", root / "holdout" / f"k{c}")
        with pytest.raises(ValueError, match=r"not training classes: \['k0', 'k1', 'k2'\]"):
            _holdout(root)

    @pytest.mark.parametrize("other", ["train", "validation"])
    def test_shared_files_are_refused(self, tmp_path: Path, other: str) -> None:  # T1/T3: overlap
        root = _root(tmp_path)
        os.symlink(root / other / "class1" / "1.png", root / "holdout" / "class1" / "linked.png")
        what = "training" if other == "train" else "evaluation"
        with pytest.raises(ValueError, match=rf"shares 1 image file\(s\) with the {what} split, e.g. .*1.png"):
            _holdout(root)

    def test_non_folder_dataset_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"must be an image folder \(--dataset '' or 'folder'\), but --dataset is "
                                             r"'torch/cifar10'"):
            create_holdout_dataset("torch/cifar10", str(tmp_path), "holdout", train_dataset=None)


def _args(**kwargs) -> argparse.Namespace:
    return argparse.Namespace(**kwargs)


class TestTrainArgs:
    def test_distillation_raises_at_start_up(self) -> None:  # T7
        with pytest.raises(ValueError, match=r"--kd-model-name 'resnet50' \(distillation\) is not supported"):
            check_train_args(_args(kd_model_name="resnet50"))
        check_train_args(_args(kd_model_name=None))

    @pytest.mark.parametrize("p", [0.0, -0.1, 1.5])
    def test_aug_prob_range(self, p: float) -> None:  # T4
        with pytest.raises(ValueError, match=r"--saflex-aug-prob must be in \(0, 1\]"):
            check_train_args(_args(saflex_aug_prob=p))


def _criterion_and_batch(tmp_path: Path, **loss_kwargs):
    root = _root(tmp_path, classes=2)
    loader = train_loader(root)
    model = tiny_model()
    holdout = _holdout(root)
    val = create_val_loader(holdout, SIZE, 4, train_loader=loader)
    criterion = SaflexLoss(model, val, prepare=ValPrepare.from_model(model), **loss_kwargs)
    x, target = next(iter(loader))
    return model, criterion, loader, x, target


class TestLogLine:
    def test_plain_cross_entropy_is_reported(self, tmp_path: Path) -> None:  # T5
        model, criterion, _, x, target = _criterion_and_batch(tmp_path, label_smoothing=0.1)
        output = model(x)
        criterion(output, target).backward()
        expected = float(F.cross_entropy(output.detach(), target.labels, label_smoothing=0.1))
        assert plain_cross_entropy(criterion, output, target) == pytest.approx(expected)
        line = log_line(criterion, output, target)
        assert line.endswith(f"; plain CE of the batch {expected:.4g}")
        assert "plain CE" not in log_line(criterion)

    def test_plain_cross_entropy_messages(self, tmp_path: Path) -> None:
        model, criterion, _, x, target = _criterion_and_batch(tmp_path)
        with pytest.raises(TypeError, match=r"output must be the \(B, K\) logits of the batch, but got \(4,\)"):
            plain_cross_entropy(criterion, torch.zeros(4), target)
        with pytest.raises(ValueError, match="target has 4 samples but output has 3"):
            plain_cross_entropy(criterion, torch.zeros(3, 2), target)
        with pytest.raises(TypeError, match="target must be a SaflexTarget or a label tensor, but got list"):
            plain_cross_entropy(criterion, torch.zeros(4, 2), [0, 1])  # type: ignore[arg-type]
        soft = SaflexTarget(torch.full((4, 2), 0.5), torch.zeros(4, dtype=torch.bool))
        expected = float(torch.log(torch.tensor(2.0)))
        assert plain_cross_entropy(criterion, torch.zeros(4, 2), soft) == pytest.approx(expected)


@pytest.mark.skipif(not has_task_api(), reason="needs timm >= 1.0.23 (timm.task)")
class TestCheckpoint:
    def test_loss_state_rides_in_timms_checkpoint_and_resume(self, tmp_path: Path) -> None:  # T6
        from timm.task import resume_task_checkpoint
        from timm.utils import CheckpointSaver

        model, criterion, loader, x, target = _criterion_and_batch(tmp_path / "data")
        task = SaflexTask(model, criterion=criterion, device=CPU, verbose=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(3):
            task(x, target)["loss"].backward()
        assert criterion.step == 3
        out = tmp_path / "out"
        out.mkdir()
        saver = CheckpointSaver(model=model, optimizer=optimizer, checkpoint_dir=str(out), recovery_dir=str(out),
                                task=task)
        saver.save_checkpoint(epoch=0, metric=1.0)
        path = out / "checkpoint-0.pth.tar"
        assert torch.load(path, weights_only=True)["task_state"]["saflex_loss"]["_extra_state"]["step"] == 3

        model2, criterion2, *_ = _criterion_and_batch(tmp_path / "data2")
        task2 = SaflexTask(model2, criterion=criterion2, device=CPU, verbose=False)
        resume_task_checkpoint(task2, str(path), optimizer=torch.optim.SGD(model2.parameters(), lr=0.01),
                               log_info=False)
        assert criterion2.step == 3
        torch.testing.assert_close(criterion2.state_dict()["_extra_state"]["generator"],
                                   criterion.state_dict()["_extra_state"]["generator"])

    def test_checkpoint_without_saflex_state_warns(self, tmp_path: Path) -> None:
        model, criterion, *_ = _criterion_and_batch(tmp_path)
        task = SaflexTask(model, criterion=criterion, device=CPU, verbose=False)
        with pytest.warns(RuntimeWarning, match=r"the checkpoint has no SAFLEX state \(task_state\['saflex_loss'\]\)"):
            task.load_task_state(None)
        assert task.get_task_state(ema=True) == {}
