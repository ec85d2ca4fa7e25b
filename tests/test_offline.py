"""OfflineAugmentations / OfflineAugmentedDataset: npz and folder sources, pool and replace modes, tags."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from saflex_data.offline import OfflineAugmentations, OfflineAugmentedDataset
from saflex_data.sampler import SaflexBatchSampler


class Real(Dataset):
    """Real sample ``i``: a (4, 4, 3) uint8 image filled with ``i``, label ``i % 3``."""

    def __init__(self, n: int = 6) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.full((4, 4, 3), i, dtype=np.uint8), i % 3


def to_tensor(x: object) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.uint8).copy()).permute(2, 0, 1)


def write_npz(path: Path, source: list[int], labels: list[int] | None = None) -> None:
    images = np.stack([np.full((4, 4, 3), 100 + j, dtype=np.uint8) for j in range(len(source))])
    arrays = {"images": images, "source_index": np.asarray(source)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    np.savez(path, **arrays)


def test_npz_pool_mode(tmp_path: Path) -> None:
    write_npz(tmp_path / "diffusion.npz", [0, 0, 4])
    aug = OfflineAugmentations.from_npz(tmp_path / "diffusion.npz")
    assert aug.name == "diffusion" and len(aug) == 3 and aug.by_source() == {0: [0, 1], 4: [2]}
    ds = OfflineAugmentedDataset(Real(), aug, transform=to_tensor)
    assert len(ds) == 9 and ds.op_names == ("diffusion",)
    x, target = ds.collate_fn()([ds[i] for i in range(9)])
    assert target.is_augmented.tolist() == [False] * 6 + [True] * 3
    assert target.index.tolist() == [0, 1, 2, 3, 4, 5, 0, 0, 4]
    assert target.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 0, 1]  # inherited from the source sample
    assert target.op.tolist() == [-1] * 6 + [0] * 3
    for r in range(6):
        assert torch.equal(x[r], to_tensor(Real()[r][0]))  # real rows are the dataset's samples
    for j in range(3):
        assert int(x[6 + j, 0, 0, 0]) == 100 + j  # augmented rows are the stored ones


def test_own_labels_and_real_labels_argument(tmp_path: Path) -> None:
    write_npz(tmp_path / "gen.npz", [1, 2], labels=[2, 2])
    ds = OfflineAugmentedDataset(
        Real(), OfflineAugmentations.from_npz(tmp_path / "gen.npz"), transform=to_tensor, labels=[9, 9, 9, 9, 9, 9]
    )
    assert ds[6].label == 2 and ds[7].label == 2
    ds2 = OfflineAugmentedDataset(
        Real(), OfflineAugmentations(np.zeros((1, 4, 4, 3), np.uint8), [3]), labels=[5, 6, 7, 8, 9, 10]
    )
    assert ds2[6].label == 8


def test_folder_with_index_csv(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "sd_images"
    root.mkdir()
    with open(root / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "source_index"])
        for j, src in enumerate([2, 5]):
            Image.fromarray(np.full((4, 4, 3), 200 + j, np.uint8)).save(root / f"img{j}.png")
            w.writerow([f"img{j}.png", src])
    aug = OfflineAugmentations.from_folder(root)
    assert aug.name == "sd_images" and aug.source_index.tolist() == [2, 5]
    ds = OfflineAugmentedDataset(Real(), aug, transform=to_tensor)
    item = ds[7]
    assert item.index == 5 and item.op == 0 and int(item.input[0, 0, 0]) == 201


def test_replace_mode_with_batch_sampler(tmp_path: Path) -> None:
    write_npz(tmp_path / "gen.npz", [0, 1, 2, 3, 4, 5, 0, 1])
    ds = OfflineAugmentedDataset(Real(), OfflineAugmentations.from_npz(tmp_path / "gen.npz"), transform=to_tensor)
    bs = SaflexBatchSampler(range(ds.num_real), batch_size=3, p=1.0, seed=0)
    loader = DataLoader(ds, batch_sampler=bs, collate_fn=ds.collate_fn(), num_workers=0)
    batches = list(loader)
    assert len(batches) == 2
    for x, target in batches:
        assert target.is_augmented.all()
        for r in range(len(target)):
            j = int(x[r, 0, 0, 0]) - 100  # which stored sample was drawn
            assert int(ds.augmentations[0].source_index[j]) == int(target.index[r])


def test_replace_mode_without_augmentation_stays_clean() -> None:
    ds = OfflineAugmentedDataset(Real(), OfflineAugmentations(np.zeros((1, 4, 4, 3), np.uint8), [0]))
    item = ds[(3, 777)]
    assert item.op == -1 and item.index == 3


def test_several_sets_are_several_ops() -> None:
    a = OfflineAugmentations(np.zeros((2, 4, 4, 3), np.uint8), [0, 1], name="sd")
    b = OfflineAugmentations(np.ones((1, 4, 4, 3), np.uint8), [2], name="gan")
    ds = OfflineAugmentedDataset(Real(), [a, b], transform=to_tensor)
    assert ds.op_names == ("sd", "gan") and ds[8].op == 1 and ds[8].index == 2


class TestErrors:
    def test_source_out_of_range(self) -> None:
        aug = OfflineAugmentations(np.zeros((2, 4, 4, 3), np.uint8), [0, 12], name="gen")
        with pytest.raises(
            ValueError,
            match=r"augmentations 'gen' have source_index \[12\] out of range for a "
            r"dataset of 6 samples",
        ):
            OfflineAugmentedDataset(Real(), aug)

    def test_lengths_differ(self) -> None:
        with pytest.raises(ValueError, match=r"OfflineAugmentations\('offline'\): 2 inputs but 3 source indices"):
            OfflineAugmentations(np.zeros((2, 3)), [0, 1, 2])

    def test_float_source_index(self) -> None:
        with pytest.raises(TypeError, match="source_index must be a 1-D int array"):
            OfflineAugmentations(np.zeros((2, 3)), [0.5, 1.0])

    def test_npz_missing_keys(self, tmp_path: Path) -> None:
        np.savez(tmp_path / "bad.npz", pixels=np.zeros((2, 3)))
        with pytest.raises(KeyError, match="needs an inputs array"):
            OfflineAugmentations.from_npz(tmp_path / "bad.npz")

    def test_folder_without_index(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="expected index.csv"):
            OfflineAugmentations.from_folder(tmp_path)

    def test_not_augmentations(self) -> None:
        with pytest.raises(TypeError, match="augmentations must be an OfflineAugmentations"):
            OfflineAugmentedDataset(Real(), [np.zeros(3)])  # type: ignore[list-item]

    def test_index_out_of_range(self) -> None:
        ds = OfflineAugmentedDataset(Real(), OfflineAugmentations(np.zeros((1, 4, 4, 3), np.uint8), [0]))
        with pytest.raises(IndexError, match="index 99 is out of range for 7 items"):
            ds[99]
