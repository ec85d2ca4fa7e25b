"""Offline augmentations from any source (e.g. images made by a diffusion model), drawn into batches with tags.

:class:`OfflineAugmentations` holds pre-made samples and, for each, the index of the real training sample it was
made from (an ``.npz`` with a ``source_index`` column, a folder with an ``index.csv``, or tensors in memory).
:class:`OfflineAugmentedDataset` pairs them with the real training set; items are
:class:`saflex_data.collate.TaggedSample` and :meth:`OfflineAugmentedDataset.collate_fn` stacks them into
``(inputs, SaflexTarget)``. Two ways to draw batches:

* **pool**: shuffle over ``len(real) + len(augmented)`` items (``DataLoader(ds, shuffle=True, ...)``); item
  ``k < len(real)`` is real and clean, item ``len(real) + j`` is augmentation ``j``.
* **replace**: ``SaflexBatchSampler(range(len(real)), ..., p=0.3)``; a flagged sample is replaced by one of its own
  pre-made augmentations (picked with the flag as seed), or stays clean if it has none.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from saflex_data.sampler import split_key

from ._seeds import mix_seed
from .collate import SaflexCollate, TaggedSample

__all__ = ["OfflineAugmentations", "OfflineAugmentedDataset"]

_INPUT_KEYS = ("inputs", "images", "x", "data")


class OfflineAugmentations:
    """Pre-made augmented samples and the source index of each.

    Args:
        inputs: Tensor or array of shape `(M, ...)`, or a sequence of samples or file paths (loaded with
            ``loader``).
        source_index: Index in the real training set of the sample each one was made from, shape `(M,)`.
        labels: Optional labels of shape `(M,)` (e.g. the class a generator was prompted with); by default each
            one inherits the label of its source sample.
        name: Op name reported in the target's ``op_names`` (e.g. ``"diffusion"``).
        loader: Callable that loads a path (default: PIL, converted to RGB).

    Example:
        >>> aug = OfflineAugmentations(torch.zeros(3, 2), source_index=[0, 0, 1], name="gen")
        >>> len(aug), aug.by_source()[0]
        (3, [0, 1])
    """

    def __init__(
        self,
        inputs: Any,
        source_index: Sequence[int] | Tensor | Any,
        labels: Sequence[int] | Tensor | Any | None = None,
        *,
        name: str = "offline",
        loader: Callable[[str], Any] | None = None,
    ) -> None:
        src = torch.as_tensor(_as_array(source_index))
        if src.dim() != 1 or src.is_floating_point():
            raise TypeError(
                f"OfflineAugmentations({name!r}): source_index must be a 1-D int array, but got shape "
                f"{tuple(src.shape)} and dtype {src.dtype}."
            )
        if len(inputs) != src.shape[0]:
            raise ValueError(f"OfflineAugmentations({name!r}): {len(inputs)} inputs but {src.shape[0]} source indices.")
        if labels is not None:
            lab = torch.as_tensor(_as_array(labels))
            if lab.shape[0] != src.shape[0]:
                raise ValueError(
                    f"OfflineAugmentations({name!r}): {lab.shape[0]} labels but {src.shape[0]} source indices."
                )
            labels = lab
        self.inputs = inputs
        self.source_index = src.long()
        self.labels = labels
        self.name = name
        self.loader = loader
        self._by_source: dict[int, list[int]] | None = None

    @classmethod
    def from_npz(
        cls,
        path: str | os.PathLike[str],
        *,
        inputs_key: str | None = None,
        source_key: str = "source_index",
        labels_key: str | None = "labels",
        name: str | None = None,
    ) -> OfflineAugmentations:
        """Load from an ``.npz`` with the samples (key ``inputs``/``images``/``x``/``data``) and ``source_index``."""
        import numpy as np  # an .npz needs numpy anyway

        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            key = inputs_key or next((k for k in _INPUT_KEYS if k in keys), None)
            if key is None or key not in keys or source_key not in keys:
                raise KeyError(
                    f"OfflineAugmentations.from_npz({os.fspath(path)!r}): needs an inputs array "
                    f"({inputs_key or ' or '.join(_INPUT_KEYS)}) and {source_key!r}, but the file has {keys}."
                )
            inputs = data[key]
            source = data[source_key]
            labels = data[labels_key] if labels_key and labels_key in keys else None
        stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
        return cls(inputs, source, labels, name=name or stem)

    @classmethod
    def from_folder(
        cls,
        root: str | os.PathLike[str],
        *,
        index_file: str = "index.csv",
        name: str | None = None,
        loader: Callable[[str], Any] | None = None,
    ) -> OfflineAugmentations:
        """Load a folder of files listed in ``index_file``, a CSV with columns ``file,source_index[,label]``."""
        root = os.fspath(root)
        table = os.path.join(root, index_file)
        if not os.path.isfile(table):
            raise FileNotFoundError(
                f"OfflineAugmentations.from_folder({root!r}): expected {index_file} with columns "
                "file,source_index[,label]."
            )
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"file", "source_index"} <= set(rows[0]):
            raise KeyError(f"{table}: needs columns file and source_index, but has {sorted(rows[0])}.")
        paths = [os.path.join(root, r["file"]) for r in rows]
        source = [int(r["source_index"]) for r in rows]
        labels = [int(r["label"]) for r in rows] if rows and _has_column(rows, "label") else None
        return cls(paths, source, labels, name=name or os.path.basename(os.path.normpath(root)), loader=loader)

    def __len__(self) -> int:
        return int(self.source_index.shape[0])

    def __getitem__(self, j: int) -> tuple[Any, int, int | None]:
        """``(input, source_index, label or None)`` of augmentation ``j``."""
        x = self.inputs[j]
        if isinstance(x, (str, os.PathLike)):
            x = (self.loader or _load_image)(os.fspath(x))
        label = None if self.labels is None else _scalar(self.labels[j])
        return x, int(self.source_index[j]), label

    def by_source(self) -> dict[int, list[int]]:
        """Map source index -> indices of its augmentations."""
        if self._by_source is None:
            table: dict[int, list[int]] = {}
            for j, s in enumerate(self.source_index.tolist()):
                table.setdefault(s, []).append(j)
            self._by_source = table
        return self._by_source

    def __repr__(self) -> str:
        return f"OfflineAugmentations(name={self.name!r}, len={len(self)})"


class OfflineAugmentedDataset(Dataset):
    """A real training set plus pre-made augmentations, as tagged samples.

    Args:
        dataset: Map-style dataset of ``(input, label)`` items (the real training set).
        augmentations: One or more :class:`OfflineAugmentations`; each one's ``name`` is an op name.
        transform: Fixed callable applied to real and augmented inputs alike (e.g. ``ToImage`` + ``ToDtype``),
            so that both have the same shape and dtype.
        labels: Labels of the real set, to avoid loading a source input only to read its label.

    Example:
        >>> real = [(torch.zeros(2), 0), (torch.ones(2), 1)]
        >>> ds = OfflineAugmentedDataset(real, OfflineAugmentations(torch.full((1, 2), 5.0), [1], name="gen"))
        >>> len(ds), ds[2].op, ds[2].index, ds[2].label
        (3, 0, 1, 1)
    """

    def __init__(
        self,
        dataset: Any,
        augmentations: OfflineAugmentations | Sequence[OfflineAugmentations],
        *,
        transform: Callable[[Any], Any] | None = None,
        labels: Sequence[int] | Tensor | None = None,
    ) -> None:
        sets = [augmentations] if isinstance(augmentations, OfflineAugmentations) else list(augmentations)
        if not sets or not all(isinstance(a, OfflineAugmentations) for a in sets):
            raise TypeError(
                "OfflineAugmentedDataset: augmentations must be an OfflineAugmentations or a non-empty sequence of "
                f"them, but got {augmentations!r:.80}."
            )
        n = len(dataset)
        for a in sets:
            if len(a) and (int(a.source_index.min()) < 0 or int(a.source_index.max()) >= n):
                bad = a.source_index[(a.source_index < 0) | (a.source_index >= n)][:5].tolist()
                raise ValueError(
                    f"OfflineAugmentedDataset: augmentations {a.name!r} have source_index {bad} out of range for a "
                    f"dataset of {n} samples."
                )
        if labels is not None and len(labels) != n:
            raise ValueError(f"OfflineAugmentedDataset: labels has {len(labels)} entries for {n} samples.")
        self.dataset = dataset
        self.augmentations = sets
        self.transform = transform
        self.labels = labels
        names: list[str] = []
        for a in sets:
            if a.name in names:
                raise ValueError(f"OfflineAugmentedDataset: two augmentation sets are named {a.name!r}.")
            names.append(a.name)
        self.op_names: tuple[str, ...] = tuple(names)
        self._offsets = [0]
        for a in sets:
            self._offsets.append(self._offsets[-1] + len(a))

    @property
    def num_real(self) -> int:
        return len(self.dataset)

    @property
    def num_augmented(self) -> int:
        return self._offsets[-1]

    def __len__(self) -> int:
        return self.num_real + self.num_augmented

    def __getitem__(self, key: int | tuple[int, int]) -> TaggedSample:
        index, flag = split_key(key, "OfflineAugmentedDataset")
        n = self.num_real
        if not 0 <= index < len(self):
            raise IndexError(f"OfflineAugmentedDataset: index {index} is out of range for {len(self)} items.")
        if index >= n:
            if flag:
                raise ValueError(f"OfflineAugmentedDataset: a flag applies to real indices < {n}, but got {key!r}.")
            return self._augmented(index - n)
        if flag:
            choices = [(k, j) for k, a in enumerate(self.augmentations) for j in a.by_source().get(index, [])]
            if choices:
                g = torch.Generator().manual_seed(mix_seed(flag, index))
                k, j = choices[int(torch.randint(len(choices), (), generator=g))]
                return self._augmented(self._offsets[k] + j)
        x, y = self._real(index)
        return TaggedSample(self._fixed(x), y, index, -1)

    def _real(self, index: int) -> tuple[Any, Any]:
        item = self.dataset[index]
        return item[0], item[1]

    def _augmented(self, j: int) -> TaggedSample:
        k = max(i for i, off in enumerate(self._offsets[:-1]) if off <= j)
        x, source, label = self.augmentations[k][j - self._offsets[k]]
        if label is None:
            label = _scalar(self.labels[source]) if self.labels is not None else self._real(source)[1]
        return TaggedSample(self._fixed(x), label, source, k)

    def _fixed(self, x: Any) -> Any:
        return self.transform(x) if self.transform is not None else x

    def collate_fn(self, **kwargs: Any) -> SaflexCollate:
        """A :class:`SaflexCollate` that stacks these tagged samples (kwargs: ``output``, ``target_format``, ...)."""
        return SaflexCollate(op_names=self.op_names, **kwargs)

    def __repr__(self) -> str:
        return f"OfflineAugmentedDataset(real={self.num_real}, augmented={self.num_augmented}, ops={self.op_names})"


def _has_column(rows: list[dict[str, str]], column: str) -> bool:
    return column in rows[0] and all(r[column] not in ("", None) for r in rows)


def _as_array(value: Any) -> Any:
    return value if isinstance(value, Tensor) else (list(value) if not hasattr(value, "__array__") else value)


def _scalar(value: Any) -> Any:
    if isinstance(value, Tensor) and value.dim() == 0:
        return int(value) if not value.is_floating_point() else value
    if type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _load_image(path: str) -> Any:
    from PIL import Image  # Pillow comes with torchvision; only needed for folders of image files

    with Image.open(path) as img:
        return img.convert("RGB")
