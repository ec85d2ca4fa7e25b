"""albumentations adapter: tags from applied_transforms, clean = fixed part, per-worker reseeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

A = pytest.importorskip("albumentations")
from albumentations.pytorch import ToTensorV2  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from saflex_data.adapters.albumentations import (  # noqa: E402
    AlbumentationsTransform,
    AlbumentationsWorkerInit,
    reseed_albumentations,
)
from saflex_data.collate import IndexedDataset, SaflexCollate  # noqa: E402


def pipeline(**kwargs) -> A.Compose:  # type: ignore[no-untyped-def]
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.OneOf([A.RandomBrightnessContrast(p=1.0), A.Blur(blur_limit=3, p=1.0)], p=0.5),
            A.Normalize(),
            ToTensorV2(),
        ],
        save_applied_params=True,
        **kwargs,
    )


class Images(Dataset):
    """numpy HWC uint8 images; ``same=True`` makes every image identical (to compare augmentations)."""

    def __init__(self, n: int = 16, same: bool = False) -> None:
        self.n, self.same = n, same

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng(0 if self.same else i)
        return rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), i % 3


def test_tags_are_true() -> None:
    ds = Images(40)
    compose = pipeline()
    t = AlbumentationsTransform(compose)
    assert t.op_names == ("HorizontalFlip", "RandomBrightnessContrast", "Blur")
    collate = SaflexCollate(t, p=1.0, seed=0)
    x, target = collate([ds[i] for i in range(40)])
    assert x.dtype == torch.float32 and x.shape == (40, 3, 8, 8)
    clean_pipeline = A.Compose([A.Normalize(), ToTensorV2()])
    aug = target.is_augmented
    assert 10 < int(aug.sum()) < 40  # (1 - 0.5 * 0.5) of the rows on average
    for r in range(40):
        clean = clean_pipeline(image=ds[r][0])["image"]
        if not aug[r]:
            assert torch.equal(x[r], clean)  # bit-identical to the fixed part of the pipeline
        else:
            assert not torch.equal(x[r], clean)
    # op ids name a transform that fired: replay the sample with the same seed and read albumentations' record
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    outs = [t.augment(ds[i][0], gen) for i in range(12)]
    gen.set_state(state)
    from saflex_data.collate import draw_seed

    for i, (out, op) in enumerate(outs):
        compose.set_random_seed(draw_seed(gen) % 2**32)
        ref = compose(image=ds[i][0])
        fired = [n for n, _ in ref["applied_transforms"] if n not in ("Normalize", "ToTensorV2")]
        assert torch.equal(out, ref["image"])
        assert (op == -1) == (not fired) and (op == -1 or t.op_names[op] == fired[0])


def test_clean_copies_use_fixed_part() -> None:
    ds = Images(4)
    x, target = SaflexCollate(AlbumentationsTransform(pipeline()), num_copies=1)([ds[i] for i in range(4)])
    for r in range(4):
        assert torch.equal(x[r], A.Compose([A.Normalize(), ToTensorV2()])(image=ds[r][0])["image"])
    assert not target.is_augmented[:4].any()


def test_uint8_output_for_timm_prefetcher() -> None:
    compose = A.Compose([A.HorizontalFlip(p=1.0), ToTensorV2()], save_applied_params=True)
    x, target = SaflexCollate(AlbumentationsTransform(compose), output="uint8", num_copies=1)(
        [Images(2)[i] for i in range(2)]
    )
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 8, 8) and target.is_augmented.tolist() == [0, 0, 1, 1]


def test_requires_save_applied_params() -> None:
    with pytest.raises(ValueError, match=r"build it with A.Compose\(\[...\], save_applied_params=True\)"):
        AlbumentationsTransform(A.Compose([A.HorizontalFlip()]))


def test_rejects_tensors() -> None:
    t = AlbumentationsTransform(pipeline())
    with pytest.raises(TypeError, match="expected a numpy HWC image .* but got a tensor of shape"):
        t.augment(torch.zeros(3, 4, 4), torch.Generator())


def _augmented_batches(loader: DataLoader) -> list[torch.Tensor]:
    return [x for x, _ in loader]


def test_two_workers_give_different_augmentations() -> None:
    # Every image is the same, so batches from worker 0 and worker 1 differ only through the augmentation.
    loader = DataLoader(
        IndexedDataset(Images(16, same=True)),
        batch_size=4,
        num_workers=2,
        collate_fn=SaflexCollate(AlbumentationsTransform(pipeline()), p=1.0),
        generator=torch.Generator().manual_seed(0),
    )
    b0, b1, b2, b3 = _augmented_batches(loader)
    assert not torch.equal(b0, b1) and not torch.equal(b2, b3)
    # same seed, same batches
    again = DataLoader(
        IndexedDataset(Images(16, same=True)),
        batch_size=4,
        num_workers=2,
        collate_fn=SaflexCollate(AlbumentationsTransform(pipeline()), p=1.0),
        generator=torch.Generator().manual_seed(0),
    )
    for a, b in zip((b0, b1, b2, b3), _augmented_batches(again), strict=True):
        assert torch.equal(a, b)


class UserDataset(Dataset):
    """A user's own dataset calling albumentations in __getitem__ (no saflex collate)."""

    def __init__(self) -> None:
        self.transform = A.Compose([A.RandomBrightnessContrast(p=1.0), ToTensorV2()])
        self.image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(image=self.image)["image"], 0


def test_worker_init_reseeds_user_dataset() -> None:
    ds = UserDataset()
    loader = DataLoader(
        ds,
        batch_size=2,
        num_workers=2,
        worker_init_fn=AlbumentationsWorkerInit(),
        generator=torch.Generator().manual_seed(0),
    )
    batches = [x for x, _ in loader]
    assert not torch.equal(batches[0], batches[1])  # worker 0 vs worker 1


def test_reseed_finds_nested_composes() -> None:
    class Holder:
        def __init__(self) -> None:
            self.inner = {"t": [pipeline(), pipeline()]}

    assert reseed_albumentations(Holder(), 3) == 2
