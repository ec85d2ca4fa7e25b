"""SAFLEX's held-out split for timm's ``train.py``: found where it is said to be, or refused.

timm's ``create_dataset`` falls back to the data root when a split folder is absent (``_search_split``), drops the
images of class folders missing from ``class_map`` and says "Found 0 images" when none match. For SAFLEX's
validation stream each of these means training against the wrong images (the reported split included), so
:func:`create_holdout_dataset` resolves the split itself and checks it before any step.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from timm.data import create_dataset
from torch.utils.data import Dataset

from ._val_loader import train_class_map

_FOLDER_NAMES = ("", "folder", "image_folder")


def create_holdout_dataset(
    name: str,
    root: str,
    split: str,
    *,
    train_dataset: Any,
    eval_dataset: Any = None,
    **kwargs: Any,
) -> Dataset:
    """``timm.data.create_dataset`` for SAFLEX's held-out split, refusing every way it could be the wrong images.

    The split must be a folder ``root/split`` of class folders (timm's image-folder layout, the default
    ``--dataset``). It is refused when

    * it is missing (timm would fall back to ``root`` itself: every image, the reported split included), or resolves
      to the data root or to the training or evaluation folder;
    * one of its class folders is not a training class (timm would drop those images, or find none);
    * it shares an image file with the training or the evaluation split.

    The dataset is built with the training set's class map, so its labels are the training indices.

    Args:
        name: ``--dataset`` (``""``, ``"folder"`` or ``"image_folder"``).
        root: ``--data-dir``.
        split: ``--saflex-split``, a folder under ``root``.
        train_dataset: The training dataset (or its loader): its class map and files.
        eval_dataset: The evaluation dataset (``--val-split``), if any: its files.
        **kwargs: Other ``create_dataset`` arguments (``input_img_mode``, ...); ``is_training`` is ``False``.

    Returns:
        The held-out dataset (describe it in the log with :func:`describe_holdout`).

    Raises:
        ValueError: Naming the split, the folder and what was found, for each case above, or for a dataset that is
            not an image folder.
    """
    if name.lower() not in _FOLDER_NAMES:
        raise ValueError(
            f"SAFLEX's held-out split must be an image folder (--dataset '' or 'folder'), but --dataset is {name!r}; "
            "the split checks (present, training classes, no shared files) need its files. Put the held-out images "
            "in <data-dir>/<saflex-split>/<class>/ and train from image folders."
        )
    if not root:
        raise ValueError("SAFLEX needs --data-dir: the held-out split is the folder <data-dir>/<saflex-split>.")
    split_name = split.split("[")[0]
    folder = os.path.join(root, split_name)
    if not split_name or not os.path.isdir(folder):
        raise ValueError(
            f"SAFLEX's held-out split {split!r} is missing: {folder!r} is not a folder (timm would silently use "
            f"every image under {root!r}, the reported split included). Create it with one folder per training "
            "class, or pass --saflex-split NAME of an existing held-out folder."
        )
    real = os.path.realpath(folder)
    named = {"the data root (--data-dir)": os.path.realpath(root)}
    for what, ds in (("the training split", train_dataset), ("the evaluation split", eval_dataset)):
        reader_root = _reader_root(ds)
        if reader_root is not None:
            named[what] = os.path.realpath(reader_root)
    for what, other in named.items():
        if real == other:
            raise ValueError(
                f"SAFLEX's held-out split {split!r} resolves to {what} ({real}); it must be a folder of its own."
            )

    train_map = train_class_map(train_dataset)
    if train_map is None:
        raise ValueError(
            f"train_dataset ({type(train_dataset).__name__}) has no class_to_idx: SAFLEX's held-out split needs the "
            "training set's class names (an image-folder training set)."
        )
    kwargs.pop("is_training", None)
    kwargs.pop("class_map", None)
    own = create_dataset(name, root=folder, split=split, search_split=False, is_training=False, **kwargs)
    own_map = train_class_map(own) or {}
    extra = sorted(str(k) for k in own_map if k not in train_map)
    if extra:
        raise ValueError(
            f"SAFLEX's held-out split {split!r} ({folder}) has class folders that are not training classes: "
            f"{extra[:8]}{' ...' if len(extra) > 8 else ''} (training classes: {_short(sorted(map(str, train_map)))}). "
            "Rename them to the training folder names (timm would drop their images, or find none)."
        )
    dataset = create_dataset(name, root=folder, split=split, search_split=False, is_training=False,
                             class_map=dict(train_map), **kwargs)

    files = _files(dataset, each=True)
    for what, ds in (("training", train_dataset), ("evaluation", eval_dataset)):
        if ds is None or files is None:
            continue
        other = _files(ds)
        shared = sorted(files & other) if other is not None else []
        if shared:
            raise ValueError(
                f"SAFLEX's held-out split {split!r} shares {len(shared)} image file(s) with the {what} split, e.g. "
                f"{shared[0]!r}: its validation gradient would come from images the model trains on or is evaluated "
                "on. Use disjoint folders."
            )
    return dataset


def describe_holdout(dataset: Any, *, aug_prob: float | None = None, num_aug_splits: int = 0) -> str:
    """The start-up log line: the held-out root, size and classes, and how much of the batch ``--aa`` reaches."""
    root = _reader_root(dataset)
    classes = sorted({str(k) for k in (train_class_map(dataset) or {})} & set(map(str, _used_classes(dataset))))
    line = f"SAFLEX held-out split: {root}, {len(dataset)} images, {len(classes)} classes {_short(classes)}"
    if num_aug_splits:
        line += (f". Batches are [clean; augmented] x{num_aug_splits} (--aug-splits): every image is seen clean and "
                 "augmented, as in the unpatched recipe")
    elif aug_prob is not None:
        line += (f". The secondary augmentation (--aa, or colour jitter) now reaches a fraction {aug_prob:g} of the "
                 "samples (--saflex-aug-prob; the unpatched recipe applies it to every sample), so that SAFLEX "
                 "has clean rows to keep")
    return line


def _short(names: list[str], limit: int = 10) -> str:
    return "[" + ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "") + "]"


def _reader(ds: Any) -> Any:
    seen = 0
    while ds is not None and seen < 8:
        seen += 1
        reader = getattr(ds, "reader", None)
        if reader is not None:
            return reader
        ds = getattr(ds, "loader", None) if hasattr(ds, "loader") else getattr(ds, "dataset", None)
    return None


def _reader_root(ds: Any) -> str | None:
    root = getattr(_reader(ds), "root", None)
    return root if isinstance(root, str) else None


def _used_classes(ds: Any) -> Iterable[Any]:
    reader = _reader(ds)
    mapping = getattr(reader, "class_to_idx", None) or {}
    index_to_name = {v: k for k, v in mapping.items()}
    return {index_to_name.get(target, target) for _, target in getattr(reader, "samples", [])}


def _files(ds: Any, *, each: bool = False) -> set[str] | None:
    """The paths of a folder reader's image files under its real root (``None`` for other readers).

    ``each=True`` resolves every file (links included: for the small held-out split); the training split's files
    are resolved through their root only, which costs no system call per file.
    """
    reader = _reader(ds)
    samples = getattr(reader, "samples", None)
    root = getattr(reader, "root", None)
    if not samples or not isinstance(root, str) or not isinstance(samples[0][0], str):
        return None
    if each:
        return {os.path.realpath(path) for path, _ in samples}
    real_root = os.path.realpath(root)
    return {os.path.normpath(os.path.join(real_root, os.path.relpath(path, root))) for path, _ in samples}
