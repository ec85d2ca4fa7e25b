"""Validation side of the timm integration: ``create_val_loader`` (SAFLEX's held-out stream) and class maps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import timm  # noqa: F401
import torch
import torch.distributed as dist
from timm.data import create_loader as _timm_create_loader
from timm.data.loader import PrefetchLoader
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ._train_loader import _attach_config


def _loader_config(loader: Any) -> dict[str, Any] | None:
    config = getattr(loader, "saflex_config", None)
    if config is not None:
        return dict(config)
    if isinstance(loader, PrefetchLoader):  # a plain timm training loader (e.g. --aug-splits 2)
        return {
            "mean": tuple((loader.mean.flatten().float() / 255).tolist()),
            "std": tuple((loader.std.flatten().float() / 255).tolist()),
            "use_prefetcher": True,
            "device": loader.device,
            "img_dtype": loader.img_dtype,
        }
    return None


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6) for x, y in zip(a, b, strict=True))


def create_val_loader(
    dataset: Dataset,
    input_size: int | tuple[int, ...],
    batch_size: int = 128,
    *,
    train_loader: Any = None,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    **kwargs: Any,
) -> DataLoader | PrefetchLoader:
    """The validation stream for ``SaflexLoss``: ``timm.data.create_loader(is_training=False)``, shuffled.

    The images get timm's evaluation transform (resize + centre crop with ``crop_pct``, ``interpolation``) and the
    same normalisation as the training inputs: with the prefetcher they arrive normalised and on ``device``;
    without it, normalised by the dataset transform (``SaflexLoss`` moves them to the model's device). Pair it with
    ``prepare=ValPrepare.from_model(model)`` for ``channels_last`` and dtype.

    Args:
        dataset: Held-out images (not the training images, and not the split you report accuracy on).
        input_size: As in ``create_loader`` (use the training ``input_size``).
        batch_size: Validation minibatch size (one minibatch per SAFLEX step by default), independent of the
            training batch size.
        train_loader: The training loader. Its ``mean``/``std``, ``use_prefetcher``, ``device``, ``img_dtype`` and
            ``num_workers`` become the defaults here, and explicit normalisation values that disagree raise. When
            both datasets have a ``class_to_idx`` (timm's folder readers), they must be equal: build the held-out
            dataset with ``class_map=train_class_map(train_loader)``.
        shuffle: Draw the minibatches in a random order (a fresh permutation per pass, from ``seed``). Without it
            a class-sorted image folder gives one-class minibatches.
        seed: Seed of the shuffling generator (plus the rank under ``torch.distributed``, so that ranks draw
            different minibatches).
        drop_last: Keep every minibatch full (ignored when the dataset is smaller than one batch).
        **kwargs: Any other ``create_loader`` argument (``crop_pct``, ``interpolation``, ``num_workers``,
            ``pin_memory``, ...). ``is_training`` is always ``False``.

    Returns:
        A ``PrefetchLoader`` or ``DataLoader`` of ``(images, labels)``.

    Raises:
        ValueError: If ``mean``, ``std`` or ``use_prefetcher`` contradict ``train_loader``, or the held-out
            dataset's ``class_to_idx`` differs from the training set's.
    """
    if kwargs.pop("is_training", False):
        raise ValueError("create_val_loader builds the validation stream; is_training must be False (or omitted).")
    config = _loader_config(train_loader) if train_loader is not None else None
    if train_loader is not None and config is None:
        raise TypeError(
            "train_loader must be a loader from create_train_loader or timm's create_loader with the prefetcher; got "
            f"{type(train_loader).__name__} (pass mean=, std=, use_prefetcher= explicitly instead)."
        )
    if config is not None:
        for key in ("mean", "std"):
            if key in kwargs and not _same(tuple(kwargs[key]), config[key]):
                raise ValueError(
                    f"{key}={tuple(kwargs[key])} differs from the training loader's {key}={config[key]}: the "
                    "validation inputs must be normalised like the training inputs."
                )
            kwargs.setdefault(key, config[key])
        if "use_prefetcher" in kwargs and bool(kwargs["use_prefetcher"]) != config["use_prefetcher"]:
            raise ValueError(
                f"use_prefetcher={kwargs['use_prefetcher']} differs from the training loader's "
                f"({config['use_prefetcher']}); build both with the same setting."
            )
        kwargs.setdefault("use_prefetcher", config["use_prefetcher"])
        kwargs.setdefault("device", config["device"])
        kwargs.setdefault("img_dtype", config["img_dtype"])
        workers = getattr(_inner_loader(train_loader), "num_workers", None)
        if isinstance(workers, int):
            kwargs.setdefault("num_workers", workers)
        _check_class_maps(train_class_map(train_loader), train_class_map(dataset))
    loader = _timm_create_loader(dataset, input_size, batch_size, is_training=False, **kwargs)
    inner = loader.loader if isinstance(loader, PrefetchLoader) else loader
    if shuffle or drop_last:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        generator = torch.Generator().manual_seed(seed + rank)
        keep_last = drop_last and len(inner.dataset) >= batch_size  # type: ignore[arg-type]
        inner = DataLoader(
            inner.dataset,
            batch_size=batch_size,
            sampler=RandomSampler(inner.dataset, generator=generator) if shuffle else inner.sampler,
            num_workers=inner.num_workers,
            collate_fn=inner.collate_fn,
            pin_memory=inner.pin_memory,
            drop_last=keep_last,
            worker_init_fn=inner.worker_init_fn,
            persistent_workers=inner.persistent_workers,
        )
        if isinstance(loader, PrefetchLoader):
            loader.loader = inner
        else:
            loader = inner
    _attach_config(loader, kwargs, bool(kwargs.get("use_prefetcher", True)))
    return loader


def _inner_loader(loader: Any) -> Any:
    return loader.loader if isinstance(loader, PrefetchLoader) else loader


def train_class_map(source: Any) -> dict[Any, int] | None:
    """The ``class_to_idx`` of a loader's or dataset's timm reader (``None`` if it has none).

    Looks through ``PrefetchLoader``, ``DataLoader`` and dataset wrappers (``AugMixDataset``,
    :class:`TaggedAugmentDataset`). Pass it as ``create_dataset(..., class_map=train_class_map(loader_train))`` so
    that a held-out folder with a class missing, or an extra one, keeps the training indices.
    """
    seen = 0
    while source is not None and seen < 8:
        seen += 1
        for owner in (getattr(source, "reader", None), source):
            mapping = getattr(owner, "class_to_idx", None)
            if isinstance(mapping, dict) and mapping:
                return dict(mapping)
        source = getattr(source, "loader", None) if isinstance(source, PrefetchLoader) else getattr(
            source, "dataset", None
        )
    return None


def _check_class_maps(train: dict[Any, int] | None, holdout: dict[Any, int] | None) -> None:
    if train is None or holdout is None or train == holdout:
        return
    moved = [f"{k!r} is {holdout[k]} here but {train[k]} in training" for k in holdout if k in train and
             holdout[k] != train[k]]
    missing = [k for k in train if k not in holdout]
    extra = [k for k in holdout if k not in train]
    parts = moved[:3] + ([f"missing here: {missing[:5]}"] if missing else []) + (
        [f"not in training: {extra[:5]}"] if extra else [])
    raise ValueError(
        f"the held-out dataset's class_to_idx does not match the training set's ({'; '.join(parts)}), so its labels "
        "would name other classes. Build it with the training class map: create_dataset(..., "
        "class_map=train_class_map(loader_train)) (or the same --class-map file)."
    )
