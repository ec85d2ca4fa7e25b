"""The suite's only data entry point: raw offline data sets as float arrays (nothing is downloaded).

Images come back as ``(N, H, W)`` float32 in ``[0, 1]`` (the 28×28 sets 2×2-average-pooled to 14×14, which keeps
the suite inside its compute budget), tables as ``(N, D)`` float32 (log1p on skewed counts,
one-hot categorical columns; standardised later on each run's clean training split), labels as int64.
"""

from __future__ import annotations

import functools

import numpy as np

from benchmarks.datasets import load_fashion_mnist, load_mnist_5k, load_tabular

IMAGE_SETS = ("fmnist", "mnist", "digits")
TABLE_SETS = ("hpc", "churn", "credit")


@functools.cache
def load(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(x, y, x_test, y_test)``; ``x_test`` is None when the set has no official test split (the run cuts one)."""
    if name == "fmnist":
        x, y = load_fashion_mnist(split="train")
        xt, yt = load_fashion_mnist(split="test")
        return _pool(x.numpy()), y.numpy(), _pool(xt.numpy()), yt.numpy()
    if name == "mnist":
        x, y = load_mnist_5k()
        return _pool(x.numpy()), y.numpy(), None, None
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64), None, None
    if name in TABLE_SETS:
        table = load_tabular({"hpc": "hpc_data", "churn": "wa_churn", "credit": "credit_data"}[name])
        cont = table.x_cont.numpy().astype(np.float64)
        cont = np.where(np.isnan(cont), np.nanmedian(cont, 0), cont)
        skewed = (cont.min(0) >= 0) & (cont.max(0) > 20)
        cont[:, skewed] = np.log1p(cont[:, skewed])
        cat = table.x_cat.numpy()
        onehot = [np.eye(card, dtype=np.float64)[cat[:, j]] for j, card in enumerate(table.cat_cardinalities)]
        x = np.concatenate([cont, *onehot], 1).astype(np.float32)
        return x, table.y.numpy(), None, None
    raise ValueError(f"data set must be one of {IMAGE_SETS + TABLE_SETS}, but got {name!r}.")


def _pool(x: np.ndarray) -> np.ndarray:
    """uint8 `(N, 28, 28)` -> float32 `(N, 14, 14)` in [0, 1] (2×2 means)."""
    x = x.astype(np.float32) / 255
    return x.reshape(len(x), 14, 2, 14, 2).mean((2, 4))


def num_classes(name: str) -> int:
    return int(load(name)[1].max()) + 1


def is_image(name: str) -> bool:
    return name in IMAGE_SETS
