"""SaflexCollate: layout, tags, determinism, DataLoader integration and error messages."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from saflex_data.batch import SaflexTarget
from saflex_data.collate import (
    CallableTransform,
    IndexedDataset,
    SaflexCollate,
    TaggedSample,
    draw_seed,
    mix_seed,
    seeded,
)
from saflex_data.mixing import MixUp


class IdxDataset(Dataset):
    """Sample ``i`` is a (3, 4, 4) uint8 image with distinct pixels and label ``i % 5`` (torchvision test style)."""

    def __init__(self, n: int = 12) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(i)
        return torch.randint(0, 256, (3, 4, 4), generator=g, dtype=torch.uint8), i % 5


def flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def noisy(x: torch.Tensor) -> torch.Tensor:
    """Uses the global torch RNG, like most upstream transforms."""
    if x.is_floating_point():
        return x + torch.rand(x.shape)
    return (x.int() + torch.randint(1, 50, x.shape)).clamp(max=255).to(x.dtype)


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def random_crop_size(x: torch.Tensor) -> torch.Tensor:
    size = int(torch.randint(2, 5, ()))
    return x[..., :size, :size]


def to_double(x: torch.Tensor) -> torch.Tensor:
    return x.double()


class TestSaflexCollate:
    def test_copies_layout_and_tags(self) -> None:
        ds = IdxDataset(4)
        collate = SaflexCollate(flip, post_transform=to_float, num_copies=2)
        x, target = collate([ds[i] for i in range(4)])
        assert x.shape == (12, 3, 4, 4) and x.dtype == torch.float32
        assert isinstance(target, SaflexTarget)
        assert target.is_augmented.tolist() == [False] * 4 + [True] * 8
        assert target.index.tolist() == [0, 1, 2, 3] * 3
        assert target.op.tolist() == [-1] * 4 + [0] * 8
        assert target.op_names == ("flip",)
        assert target.labels.tolist() == [0, 1, 2, 3] * 3
        for r in range(12):
            clean = to_float(ds[r % 4][0])
            # clean rows are bit-identical to the fixed part of the pipeline; augmented rows are the transform's output
            expected = clean if r < 4 else to_float(flip(ds[r % 4][0]))
            assert torch.equal(x[r], expected)

    def test_keep_clean_false(self) -> None:
        x, target = SaflexCollate(flip, num_copies=1, keep_clean=False)([IdxDataset(3)[i] for i in range(3)])
        assert len(target) == 3 and bool(target.is_augmented.all())

    @pytest.mark.parametrize("p, expected", [(0.0, 0), (1.0, 10)])
    def test_in_place_extremes(self, p: float, expected: int) -> None:
        ds = IdxDataset(10)
        x, target = SaflexCollate(flip, p=p)([ds[i] for i in range(10)])
        assert len(target) == 10 and target.num_augmented == expected
        for r in range(10):
            ref = flip(ds[r][0]) if target.is_augmented[r] else ds[r][0]
            assert torch.equal(x[r], ref)

    def test_in_place_fraction(self) -> None:
        ds = IdxDataset(400)
        _, target = SaflexCollate(flip, p=0.3, seed=0)([ds[i] for i in range(400)])
        assert 0.22 < target.is_augmented.float().mean().item() < 0.38

    def test_several_transforms_give_op_ids(self) -> None:
        ds = IdxDataset(60)
        collate = SaflexCollate([flip, CallableTransform(lambda x: x.flip(-2), name="vflip")], num_copies=1, seed=1)
        x, target = collate([ds[i] for i in range(60)])
        assert target.op_names == ("flip", "vflip")
        aug = target.is_augmented
        assert set(target.op[aug].tolist()) == {0, 1}
        for r in range(60, 120):
            src = ds[r - 60][0]
            ref = src.flip(-1) if target.op[r] == 0 else src.flip(-2)
            assert torch.equal(x[r], ref)

    def test_weights_pick_only_positive(self) -> None:
        ds = IdxDataset(20)
        _, target = SaflexCollate([flip, noisy], weights=[0.0, 1.0], num_copies=1)([ds[i] for i in range(20)])
        assert set(target.op[20:].tolist()) == {1}

    def test_indexed_dataset_records_dataset_index(self) -> None:
        ds = IndexedDataset(IdxDataset(10))
        _, target = SaflexCollate(flip, num_copies=1)([ds[7], ds[3]])
        assert target.index.tolist() == [7, 3, 7, 3]

    def test_target_format_labels(self) -> None:
        ds = IdxDataset(3)
        x, y = SaflexCollate(flip, num_copies=1, target_format="labels")([ds[i] for i in range(3)])
        assert isinstance(y, torch.Tensor) and y.tolist() == [0, 1, 2, 0, 1, 2]

    def test_soft_labels_per_sample(self) -> None:
        batch = [(torch.zeros(2), torch.tensor([0.25, 0.75])), (torch.ones(2), torch.tensor([1.0, 0.0]))]
        _, target = SaflexCollate(flip, num_copies=1)(batch)
        assert target.labels.shape == (4, 2) and target.labels.dtype == torch.float32

    def test_uint8_output_like_fast_collate(self) -> None:
        from PIL import Image

        arr = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
        batch = [
            (Image.fromarray(arr), 1),
            (torch.from_numpy(arr).permute(2, 0, 1).contiguous(), 2),
            (np.ascontiguousarray(arr.transpose(2, 0, 1)), 3),
        ]
        x, target = SaflexCollate(None, num_copies=0, output="uint8")(batch)
        assert x.dtype == torch.uint8 and x.shape == (3, 3, 4, 5)
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
        timm_loader = pytest.importorskip("timm.data.loader")
        for r in (1, 2):  # timm's fast_collate takes one input type per batch
            ref, _ = timm_loader.fast_collate([batch[r]])
            assert torch.equal(ref, x[r : r + 1])

    def test_same_seed_same_batch_and_tags(self) -> None:
        ds = IdxDataset(16)
        items = [ds[i] for i in range(16)]
        a = SaflexCollate(noisy, p=0.5, post_transform=to_float, seed=3)(items)
        b = SaflexCollate(noisy, p=0.5, post_transform=to_float, seed=3)(items)
        c = SaflexCollate(noisy, p=0.5, post_transform=to_float, seed=4)(items)
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
        assert not torch.equal(a[0], c[0])

    def test_does_not_touch_global_rng_state(self) -> None:
        torch.manual_seed(0)
        state = torch.get_rng_state()
        np_state = np.random.get_state()[1].copy()
        SaflexCollate(noisy, num_copies=2, seed=0)([IdxDataset(4)[i] for i in range(4)])
        assert torch.equal(torch.get_rng_state(), state)
        assert np.array_equal(np.random.get_state()[1], np_state)

    def test_pickle_drops_generator(self) -> None:
        collate = SaflexCollate(flip, p=0.5, seed=0)
        collate([IdxDataset(2)[0]])
        assert collate._generator is not None
        clone = pickle.loads(pickle.dumps(collate))
        assert clone._generator is None

    def test_batch_transform_only_sees_copies(self) -> None:
        ds = IdxDataset(6)
        mix = MixUp(num_classes=5, generator=torch.Generator().manual_seed(0))
        x, target = SaflexCollate(None, post_transform=to_float, num_copies=1, batch_transform=mix)(
            [ds[i] for i in range(6)]
        )
        assert target.op_names == ("mixup",)
        assert not target.is_augmented[:6].any() and target.labels.shape == (12, 5)
        for r in range(6):
            assert torch.equal(x[r], to_float(ds[r][0]))
        assert target.is_augmented[6:].sum() >= 4

    def test_pretagged_samples_are_stacked(self) -> None:
        batch = [TaggedSample(torch.zeros(2), 1, 5, -1), TaggedSample(torch.ones(2), 0, 5, 0)]
        _, target = SaflexCollate(op_names=("offline",))(batch)
        assert target.is_augmented.tolist() == [False, True] and target.op_names == ("offline",)

    def test_repr(self) -> None:
        assert "num_copies=1" in repr(SaflexCollate(flip))


class TestSaflexCollateErrors:
    def test_shape_change_between_samples(self) -> None:
        ds = IdxDataset(8)
        collate = SaflexCollate(random_crop_size, num_copies=3, seed=0)
        with pytest.raises(
            ValueError,
            match=r"SaflexCollate\(transform=random_crop_size\): row \d+ \(augmented by "
            r"'random_crop_size'\) came back with shape \(3, \d, \d\)",
        ):
            collate([ds[i] for i in range(8)])

    def test_dtype_change_between_samples(self) -> None:
        with pytest.raises(
            ValueError,
            match=r"dtype torch.float64, but row 0 \(clean\) has shape \(3, 4, 4\) and "
            r"dtype torch.uint8",
        ):
            SaflexCollate(to_double, num_copies=1)([IdxDataset(2)[0]])

    @pytest.mark.parametrize(
        "label, what",
        [
            ("cat", r"an object of type str \('cat'\)"),
            (0.5, r"an object of type float \(0.5\)"),
            (torch.zeros(2, 2), r"a tensor of shape \(2, 2\)"),
        ],
    )
    def test_wrong_label_kind(self, label: object, what: str) -> None:
        with pytest.raises(
            TypeError,
            match=rf"label of row 0 \(clean\) must be an int class index or a 1-D float "
            rf"tensor of class probabilities, but got {what}",
        ):
            SaflexCollate(flip)([(torch.zeros(2), label)])

    def test_mixed_hard_and_soft(self) -> None:
        with pytest.raises(TypeError, match="all class indices or all probability vectors"):
            SaflexCollate(None, num_copies=0)([(torch.zeros(2), 1), (torch.zeros(2), torch.tensor([0.5, 0.5]))])

    def test_pil_without_conversion(self) -> None:
        from PIL import Image

        with pytest.raises(TypeError, match=r"PILToTensor"):
            SaflexCollate(None, num_copies=0)([(Image.new("RGB", (2, 2)), 0)])

    def test_uint8_needs_uint8(self) -> None:
        with pytest.raises(TypeError, match=r"output='uint8' needs uint8 inputs .* dtype torch.float32"):
            SaflexCollate(None, num_copies=0, output="uint8")([(torch.zeros(3, 2, 2), 0)])

    def test_bad_sample_structure(self) -> None:
        with pytest.raises(TypeError, match=r"each sample must be \(input, label\) or \(input, label, index\)"):
            SaflexCollate(flip)([torch.zeros(2)])

    def test_pretagged_with_transform(self) -> None:
        with pytest.raises(ValueError, match="pass the transform to only one of them"):
            SaflexCollate(flip)([TaggedSample(torch.zeros(2), 0, 0, -1)])

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(p=0.5, num_copies=1), "either num_copies .* or p"),
            (dict(p=1.5), r"p must be a probability in \[0, 1\], but got 1.5"),
            (dict(num_copies=-1), "num_copies must be a non-negative int, but got -1"),
            (dict(num_copies=0, keep_clean=False), "would emit no rows"),
            (dict(output="float16"), "output must be 'tensor' or 'uint8'"),
            (dict(target_format="dict"), "target_format must be 'saflex' or 'labels'"),
            (dict(weights=[1.0, 2.0]), "weights must be 1 non-negative numbers"),
        ],
    )
    def test_bad_arguments(self, kwargs: dict, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            SaflexCollate(flip, **kwargs)

    def test_batch_transform_returning_wrong_size(self) -> None:
        def drop_one(x: torch.Tensor, t: SaflexTarget) -> tuple[torch.Tensor, SaflexTarget]:
            return x[1:], t[1:]

        with pytest.raises(
            ValueError,
            match=r"batch_transform=function returned 2 inputs and 2 targets for a batch "
            r"of 3",
        ):
            SaflexCollate(flip, num_copies=1, batch_transform=drop_one)([IdxDataset(3)[i] for i in range(3)])


def test_mix_seed_and_seeded_are_deterministic() -> None:
    assert mix_seed(1, 2) == mix_seed(1, 2) and mix_seed(1, 2) != mix_seed(1, 3)
    g = torch.Generator().manual_seed(0)
    s = draw_seed(g)
    with seeded(s):
        a = torch.rand(3)
    with seeded(s):
        b = torch.rand(3)
    assert torch.equal(a, b)


def _collect(loader: DataLoader) -> list[tuple[torch.Tensor, SaflexTarget]]:
    return [(x.clone(), t) for x, t in loader]


@pytest.mark.filterwarnings("ignore:.pin_memory. argument")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_same_seed_same_batches(num_workers: int) -> None:
    def make() -> DataLoader:
        return DataLoader(
            IndexedDataset(IdxDataset(12)),
            batch_size=4,
            shuffle=True,
            num_workers=num_workers,
            collate_fn=SaflexCollate(noisy, p=0.5, post_transform=to_float),
            pin_memory=True,
            generator=torch.Generator().manual_seed(7),
        )

    torch.manual_seed(123)  # the main-process seed (num_workers=0)
    a = _collect(make())
    torch.manual_seed(123)
    b = _collect(make())
    assert len(a) == 3
    for (xa, ta), (xb, tb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and ta == tb
    # tags are true: clean rows are the untransformed samples
    ds = IdxDataset(12)
    for x, t in a:
        for r in range(len(t)):
            if not t.is_augmented[r]:
                assert torch.equal(x[r], to_float(ds[int(t.index[r])][0]))


def test_dataloader_persistent_workers_new_augmentations_each_epoch() -> None:
    ds = IndexedDataset(IdxDataset(8))
    loader = DataLoader(
        ds,
        batch_size=8,
        num_workers=2,
        persistent_workers=True,
        collate_fn=SaflexCollate(noisy, p=1.0, post_transform=to_float),
    )
    ((x0, t0),) = list(loader)
    ((x1, t1),) = list(loader)
    assert t0.index.tolist() == t1.index.tolist() and not torch.equal(x0, x1)


@pytest.mark.filterwarnings("ignore:.pin_memory. argument")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)])
def test_target_moves_non_blocking(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    loader = DataLoader(IdxDataset(4), batch_size=4, pin_memory=True, collate_fn=SaflexCollate(flip))
    x, target = next(iter(loader))
    moved = target.to(device, non_blocking=True)
    assert moved.device.type == device and moved.index.device.type == device


def test_structured_inputs_use_default_collate() -> None:
    def jitter_numeric(sample: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return sample[0] + 1.0, sample[1]

    batch = [((torch.zeros(3), torch.tensor([1, 2])), 0), ((torch.ones(3), torch.tensor([0, 1])), 1)]
    (numeric, categorical), target = SaflexCollate(jitter_numeric, num_copies=1)(batch)
    assert numeric.shape == (4, 3) and categorical.shape == (4, 2)
    assert torch.equal(numeric[2], torch.ones(3)) and target.is_augmented.tolist() == [False, False, True, True]


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from saflex_data._deps import is_available, require

    monkeypatch.setitem(sys.modules, "kornia", None)
    with pytest.raises(
        ModuleNotFoundError,
        match=r"saflex_data.adapters.kornia needs kornia; install the 'kornia' extra \(pip install '.\[kornia\]' in a "
        r"clone of saflex_data, or pip install 'saflex-data\[kornia\]' where it is published\)",
    ):
        require("kornia")
    assert is_available("torch") and not is_available("surely_not_a_module_xyz")


def test_core_data_modules_import_no_optional_dependency() -> None:
    import subprocess
    import sys

    code = (
        "import sys, saflex_data.collate, saflex_data.sampler, saflex_data.mixing, saflex_data.offline, "
        "saflex_data.device, saflex_data.adapters; "
        "print(sorted(m for m in ('torchvision', 'kornia', 'albumentations', 'timm', 'PIL') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
