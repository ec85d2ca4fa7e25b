"""saflex_data.adapters.timm: tagged timm loaders, the validation stream, ValPrepare, SaflexTask, compile."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
PIL = pytest.importorskip("PIL")

from timm.data import AugMixDataset, create_dataset, create_loader  # noqa: E402
from timm.data.loader import PrefetchLoader  # noqa: E402

from saflex_data import SaflexLoss, SaflexTarget  # noqa: E402
from saflex_data.adapters.timm import (  # noqa: E402
    SaflexTask,
    SplitsCollate,
    TaggedAugmentDataset,
    ValPrepare,
    create_train_loader,
    create_val_loader,
    has_task_api,
    step_stats,
)
from saflex_data.collate import SaflexCollate  # noqa: E402

CPU = torch.device("cpu")
SIZE = (3, 32, 32)


def write_image_folder(root: Path, n_per_class: int = 8, num_classes: int = 2, size: int = 32, seed: int = 0) -> Path:
    """Tiny ImageFolder of PNGs: class c is a noisy image dominated by colour channel c."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            base = np.zeros((size, size, 3), np.float32)
            base[..., c % 3] = 180
            img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("timm_images")
    for seed, split in enumerate(("train", "holdout", "validation")):
        write_image_folder(root / split, seed=seed)
    return root


def dataset(data_dir: Path, split: str = "train"):
    return create_dataset("", root=str(data_dir), split=split, is_training=split == "train")


def train_loader(data_dir: Path, **kwargs):
    kwargs.setdefault("use_prefetcher", True)
    return create_train_loader(
        dataset(data_dir), SIZE, 4, device=CPU, num_workers=0, auto_augment="rand-m9-mstd0.5", **kwargs
    )


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([])


def tiny_model(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=2, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# training loader
# ------------------------------------------------------------------------------------------------------------------
class TestTrainLoader:
    @pytest.mark.parametrize("prefetcher", [True, False])
    def test_per_sample_tags(self, data_dir: Path, prefetcher: bool) -> None:
        loader = train_loader(data_dir, use_prefetcher=prefetcher, aug_prob=0.5)
        assert isinstance(loader, PrefetchLoader) == prefetcher
        x, target = next(iter(loader))
        assert x.shape == (4, *SIZE) and x.dtype == torch.float32
        assert isinstance(target, SaflexTarget) and len(target) == 4
        assert target.op_names == ("RandAugment",)
        assert torch.equal(target.op, torch.where(target.is_augmented, 0, -1))
        # normalised inputs (ImageNet mean/std), whichever path did the normalising
        assert -3.0 < float(x.min()) and float(x.max()) < 3.0 and float(x.min()) < 0

    def test_prefetcher_collate_is_uint8_like_fast_collate(self, data_dir: Path) -> None:
        loader = train_loader(data_dir, use_prefetcher=True)
        assert isinstance(loader.loader.collate_fn, SaflexCollate)
        x, target = next(iter(loader.loader))  # what the workers hand to PrefetchLoader
        assert x.dtype == torch.uint8 and x.shape == (4, *SIZE)
        assert target.labels.dtype == torch.long
        assert target.index is not None and sorted(target.index.tolist()) == sorted(set(target.index.tolist()))

    @pytest.mark.parametrize("p, expected", [(0.0, 0), (1.0, 4)])
    def test_aug_prob_extremes(self, data_dir: Path, p: float, expected: int) -> None:
        for _, target in train_loader(data_dir, aug_prob=p):
            assert target.num_augmented == expected

    @pytest.mark.parametrize("prefetcher", [True, False])
    def test_aug_splits_layout_clean_then_augmented(self, data_dir: Path, prefetcher: bool) -> None:
        loader = train_loader(data_dir, use_prefetcher=prefetcher, num_aug_splits=2)
        assert isinstance(loader.dataset, AugMixDataset)
        x, target = next(iter(loader))
        assert x.shape == (8, *SIZE)
        assert target.is_augmented.tolist() == [False] * 4 + [True] * 4
        assert torch.equal(target.labels[:4], target.labels[4:])  # the same images, clean then augmented

    def test_accepts_train_py_augmix_dataset(self, data_dir: Path) -> None:
        ds = AugMixDataset(dataset(data_dir), num_splits=2)  # train.py wraps the dataset for --aug-splits 2
        loader = create_train_loader(ds, SIZE, 4, num_aug_splits=2, device=CPU, num_workers=0)
        assert loader.dataset is ds
        x, target = next(iter(loader))
        assert x.shape[0] == 8 and target.num_augmented == 4 and target.op_names == ("ColorJitter",)

    def test_splits_collate_matches_fast_collate_order(self) -> None:
        from timm.data.loader import fast_collate

        items = [((torch.full((3, 2, 2), i, dtype=torch.uint8), torch.full((3, 2, 2), 10 + i, dtype=torch.uint8)), i)
                 for i in range(3)]
        x8, t8 = SplitsCollate(2, uint8=True)(items)
        ref_x, ref_y = fast_collate(items)
        assert torch.equal(x8, ref_x) and torch.equal(t8.labels, ref_y)
        xf, tf = SplitsCollate(2, uint8=False)([((a.float(), b.float()), y) for (a, b), y in items])
        assert torch.equal(xf, ref_x.float()) and torch.equal(tf.labels, ref_y)

    def test_loader_set_epoch_and_len_pass_through(self, data_dir: Path) -> None:
        loader = train_loader(data_dir)
        assert len(loader) == 4 and loader.sampler is not None and loader.mixup_enabled is False
        seen = []
        loader.dataset.dataset.set_epoch = seen.append  # e.g. timm's iterable readers
        loader.dataset.set_epoch(3)  # what timm's train.py calls
        assert seen == [3]

    def test_errors(self, data_dir: Path) -> None:
        with pytest.raises(ValueError, match="collate_fn cannot be passed"):
            train_loader(data_dir, collate_fn=lambda b: b)
        with pytest.raises(ValueError, match="is_training must be True"):
            train_loader(data_dir, is_training=False)
        with pytest.raises(ValueError, match="no_aug=True leaves nothing to tag"):
            train_loader(data_dir, no_aug=True)
        with pytest.raises(ValueError, match="num_aug_splits must be 0"):
            train_loader(data_dir, num_aug_splits=1)
        with pytest.raises(ValueError, match="aug_prob"):
            train_loader(data_dir, aug_prob=1.5)
        with pytest.raises(ValueError, match="no secondary augmentation stage"):
            create_train_loader(dataset(data_dir), SIZE, 4, device=CPU, num_workers=0, color_jitter=None)
        with pytest.raises(ValueError, match="AugMixDataset with num_splits=3, but num_aug_splits=2"):
            create_train_loader(AugMixDataset(dataset(data_dir), num_splits=3), SIZE, 4, num_aug_splits=2,
                                device=CPU, num_workers=0)
        with pytest.raises(TypeError, match="must be a map-style dataset"):
            TaggedAugmentDataset(_Stream())
        with pytest.raises(TypeError, match="already a TaggedAugmentDataset"):
            create_train_loader(TaggedAugmentDataset(dataset(data_dir)), SIZE, 4, device=CPU, num_workers=0)
        with pytest.raises(TypeError, match=r"\(primary, secondary, final\) triple"):
            TaggedAugmentDataset(dataset(data_dir)).transform = lambda x: x


# ------------------------------------------------------------------------------------------------------------------
# validation stream and prepare
# ------------------------------------------------------------------------------------------------------------------
class TestValLoader:
    def test_normalised_like_training_with_and_without_prefetcher(self, data_dir: Path) -> None:
        batches = []
        for prefetcher in (True, False):
            train = train_loader(data_dir, use_prefetcher=prefetcher)
            val = create_val_loader(dataset(data_dir, "holdout"), SIZE, 4, train_loader=train, num_workers=0, seed=3)
            assert isinstance(val, PrefetchLoader) == prefetcher
            x, y = next(iter(val))
            assert x.dtype == torch.float32 and y.dtype == torch.long
            batches.append((x, y))
        torch.testing.assert_close(batches[0][0], batches[1][0], atol=1e-5, rtol=1e-5)
        assert torch.equal(batches[0][1], batches[1][1])

    def test_shuffled_minibatches_mix_classes(self, data_dir: Path) -> None:
        val = create_val_loader(dataset(data_dir, "holdout"), SIZE, 8, device=CPU, num_workers=0, seed=0)
        labels = [y for _, y in val]
        assert len(labels) == 2 and all(len(y) == 8 for y in labels)
        assert any(0 < int(y.sum()) < 8 for y in labels)  # an unshuffled image folder gives one class per batch

    def test_inherits_the_training_normalisation(self, data_dir: Path) -> None:
        train = train_loader(data_dir, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        val = create_val_loader(dataset(data_dir, "holdout"), SIZE, 4, train_loader=train, num_workers=0)
        torch.testing.assert_close(val.mean.flatten(), torch.full((3,), 0.5 * 255))
        torch.testing.assert_close(val.std.flatten(), torch.full((3,), 0.25 * 255))

    def test_plain_timm_prefetch_loader_is_accepted_as_train_loader(self, data_dir: Path) -> None:
        plain = create_loader(dataset(data_dir), SIZE, 4, is_training=True, device=CPU, num_workers=0,
                              mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
        val = create_val_loader(dataset(data_dir, "holdout"), SIZE, 4, train_loader=plain, num_workers=0)
        assert val.saflex_config["mean"] == pytest.approx((0.4, 0.4, 0.4))

    def test_mismatched_normalisation_raises(self, data_dir: Path) -> None:
        train = train_loader(data_dir)
        holdout = dataset(data_dir, "holdout")
        with pytest.raises(ValueError, match=r"mean=\(0.0, 0.0, 0.0\) differs from the training loader's mean"):
            create_val_loader(holdout, SIZE, 4, train_loader=train, mean=(0.0, 0.0, 0.0), num_workers=0)
        with pytest.raises(ValueError, match="std=.* differs from the training loader's std"):
            create_val_loader(holdout, SIZE, 4, train_loader=train, std=(1.0, 1.0, 1.0), num_workers=0)
        with pytest.raises(ValueError, match="use_prefetcher=False differs from the training loader's"):
            create_val_loader(holdout, SIZE, 4, train_loader=train, use_prefetcher=False, num_workers=0)
        with pytest.raises(TypeError, match="train_loader must be a loader from create_train_loader"):
            create_val_loader(holdout, SIZE, 4, train_loader=[1, 2], num_workers=0)


class TestValPrepare:
    def test_uint8_inputs_raise(self) -> None:
        with pytest.raises(TypeError, match="validation inputs are uint8"):
            ValPrepare()(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))

    def test_warns_when_statistics_differ_from_training(self) -> None:
        prepare = ValPrepare()
        prepare.observe_train(torch.randn(8, 3, 8, 8))
        with pytest.warns(RuntimeWarning, match="do not look normalised like the training inputs"):
            prepare(torch.rand(8, 3, 8, 8))  # [0, 1] images against normalised training inputs
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            prepare(torch.rand(8, 3, 8, 8))  # checked once only

    def test_warns_on_unnormalised_range_without_reference(self) -> None:
        with pytest.warns(RuntimeWarning, match="look un-normalised"):
            ValPrepare()(torch.rand(4, 3, 8, 8) * 255)

    def test_normalised_inputs_pass_silently(self) -> None:
        prepare = ValPrepare()
        prepare.observe_train(torch.randn(8, 3, 8, 8))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            prepare(torch.randn(8, 3, 8, 8) * 1.2 + 0.1)

    def test_channels_last_follows_the_model_and_dtype(self) -> None:
        model = tiny_model().to(memory_format=torch.channels_last)
        prepare = ValPrepare.from_model(torch.compile(model), dtype=torch.float64)
        out = prepare(torch.randn(2, 3, 8, 8))
        assert prepare.channels_last and out.dtype == torch.float64
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert not ValPrepare.from_model(tiny_model()).channels_last

    def test_on_device_normalisation(self) -> None:
        prepare = ValPrepare(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), check=False)
        torch.testing.assert_close(prepare(torch.ones(1, 3, 2, 2)), torch.ones(1, 3, 2, 2))
        with pytest.raises(ValueError, match="mean and std must be given together"):
            ValPrepare(mean=(0.5,))


# ------------------------------------------------------------------------------------------------------------------
# the loss with timm models and loaders
# ------------------------------------------------------------------------------------------------------------------
def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


class TestLossWithTimm:
    @pytest.mark.parametrize("method", ["last_layer", "jvp"])
    def test_validation_stream_does_not_change_batchnorm_statistics(self, data_dir: Path, method: str) -> None:
        model = tiny_model()
        train = train_loader(data_dir, aug_prob=1.0)
        val = create_val_loader(dataset(data_dir, "holdout"), SIZE, 4, train_loader=train, num_workers=0)
        criterion = SaflexLoss(model, val, method=method, prepare=ValPrepare.from_model(model))
        model.train()
        x, target = next(iter(train))
        output = model(x)  # the training forward updates BN, as it should
        before = bn_buffers(model)
        assert before, "test_resnet has BatchNorm buffers"
        loss = criterion(output, target)  # draws a validation batch and runs the validation pass(es)
        loss.backward()
        after = bn_buffers(model)
        for k in before:
            assert torch.equal(before[k], after[k]), k
        assert model.training

    def test_timm_native_aug_splits_with_num_splits(self, data_dir: Path) -> None:
        """timm's own --aug-splits 2 path (AugMixDataset + fast_collate + PrefetchLoader), no saflex collate."""
        ds = AugMixDataset(dataset(data_dir), num_splits=2)
        loader = create_loader(ds, SIZE, 4, is_training=True, num_aug_splits=2, device=CPU, num_workers=0,
                               auto_augment="rand-m9-mstd0.5")
        val = create_val_loader(dataset(data_dir, "holdout"), SIZE, 4, train_loader=loader, num_workers=0)
        model = tiny_model()
        criterion = SaflexLoss(model, val, num_splits=2, prepare=ValPrepare.from_model(model))
        x, y = next(iter(loader))
        assert x.shape[0] == 8 and isinstance(y, torch.Tensor)
        loss = criterion(model(x), y)
        loss.backward()
        assert torch.isfinite(loss) and criterion.stats["augmented_fraction"] == 0.5

    def test_plain_target_without_tags_names_the_loader(self, data_dir: Path) -> None:
        model = tiny_model()
        criterion = SaflexLoss(model, [(torch.randn(4, *SIZE), torch.tensor([0, 1, 0, 1]))])
        x = torch.randn(4, *SIZE)
        with pytest.raises(TypeError, match="SaflexCollate or SaflexBatchSampler.*num_splits=2"):
            criterion(model(x), torch.tensor([0, 1, 0, 1]))

    def test_model_without_classifier_raises(self) -> None:
        model = tiny_model()
        model.reset_classifier(0)  # timm: classifier becomes nn.Identity, the model returns pooled features
        with pytest.raises(ValueError, match="classifier"):
            SaflexLoss(model, [(torch.randn(2, *SIZE), torch.tensor([0, 1]))], method="last_layer")


# ------------------------------------------------------------------------------------------------------------------
# task
# ------------------------------------------------------------------------------------------------------------------
needs_task = pytest.mark.skipif(not has_task_api(), reason="timm.task needs timm >= 1.0.23")


@needs_task
class TestSaflexTask:
    def test_forward_returns_loss_output_and_stats(self, data_dir: Path) -> None:
        model = tiny_model()
        train = train_loader(data_dir, aug_prob=1.0)
        val = create_val_loader(dataset(data_dir, "holdout"), SIZE, 4, train_loader=train, num_workers=0)
        task = SaflexTask(model, val, saflex_kwargs={"method": "last_layer"}, verbose=False)
        x, target = next(iter(train))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result = task(x, target)
        result["loss"].backward()
        assert set(result) >= {"loss", "output", "saflex_weight_mean", "saflex_kept_fraction"}
        assert result["output"].shape == (4, 2)
        assert 0.0 <= float(result["saflex_kept_fraction"]) <= 1.0
        assert isinstance(task.criterion.prepare, ValPrepare) and task.criterion.prepare._train_stats is not None
        assert not any(k.startswith("criterion.model") for k in task.state_dict())

    def test_plain_target_error_names_the_loader(self, data_dir: Path) -> None:
        model = tiny_model()
        task = SaflexTask(model, [(torch.randn(2, *SIZE), torch.tensor([0, 1]))], verbose=False)
        with pytest.raises(TypeError, match="create_train_loader"):
            task(torch.randn(2, *SIZE), torch.tensor([0, 1]))

    def test_aug_splits_plain_target_with_num_splits(self) -> None:
        model = tiny_model()
        task = SaflexTask(model, [(torch.randn(2, *SIZE), torch.tensor([0, 1]))], saflex_kwargs={"num_splits": 2},
                          verbose=False)
        result = task(torch.randn(4, *SIZE), torch.tensor([0, 1, 0, 1]))
        assert torch.isfinite(result["loss"])

    def test_bad_arguments(self) -> None:
        model = tiny_model()
        with pytest.raises(ValueError, match="needs val_loader"):
            SaflexTask(model)
        with pytest.raises(TypeError, match="criterion must be a SaflexLoss"):
            SaflexTask(model, criterion=nn.CrossEntropyLoss())
        other = SaflexLoss(tiny_model(), [(torch.randn(2, *SIZE), torch.tensor([0, 1]))])
        with pytest.raises(ValueError, match="different model"):
            SaflexTask(model, criterion=other)

    def test_step_stats_empty_before_first_step(self) -> None:
        criterion = SaflexLoss(tiny_model(), [(torch.randn(2, *SIZE), torch.tensor([0, 1]))])
        assert step_stats(criterion) == {}


# ------------------------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["last_layer", "jvp"])
def test_compile_with_hooks_has_no_graph_breaks(method: str) -> None:
    torch._dynamo.reset()
    model = tiny_model()
    x = torch.randn(4, *SIZE)
    baseline = torch._dynamo.explain(model)(x)
    criterion = SaflexLoss(model, [(torch.randn(4, *SIZE), torch.tensor([0, 1, 0, 1]))], method=method)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == baseline.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    target = SaflexTarget(torch.tensor([0, 1, 0, 1]), torch.tensor([False, False, True, True]))
    for _ in range(2):
        loss = criterion(compiled(x), target)  # the hooks fired inside the compiled forward
        loss.backward()
    assert torch.isfinite(loss) and criterion.stats["step"] == 2.0
