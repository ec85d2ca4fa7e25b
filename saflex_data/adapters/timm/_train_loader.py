"""Training side of the timm integration: per-sample tagged datasets and collates, and ``create_train_loader``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import timm  # noqa: F401
import torch
from timm.data import AugMixDataset
from timm.data import create_loader as _timm_create_loader
from timm.data.loader import PrefetchLoader, fast_collate
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from ...batch import SaflexTarget
from ...collate import SaflexCollate, TaggedSample


def _stage_name(stage: Callable[..., Any] | None) -> str:
    inner = getattr(stage, "transforms", None)
    if inner:
        return "+".join(type(t).__name__ for t in inner)
    return type(stage).__name__ if stage is not None else "augment"


class TaggedAugmentDataset(Dataset):
    """Per-sample tagged version of timm's ``AugMixDataset``: the secondary stage runs with probability ``p``.

    ``create_loader`` assigns ``create_transform(..., separate=True)``'s ``(primary, secondary, final)`` triple to
    ``.transform``. Each item is a pre-tagged :class:`saflex_data.collate.TaggedSample` ``(input, label, index,
    op)`` (``op`` 0: augmented, -1: clean) whose image went through ``primary -> [secondary if augmented] -> final``;
    :class:`saflex_data.SaflexCollate` stacks them (uint8 like ``fast_collate`` for the prefetcher). The coin is
    drawn from torch's RNG, which the DataLoader seeds per worker, so workers differ and runs are reproducible.

    Args:
        dataset: A timm/torchvision style dataset returning ``(image, label)`` that applies ``.transform``.
        p: Probability that a sample gets the secondary augmentation (the "augmented" samples of SAFLEX).
    """

    def __init__(self, dataset: Dataset, p: float = 0.5) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"dataset must be a map-style dataset (an ImageFolder/ImageTar reader), but got the iterable "
                f"{type(dataset).__name__}; for streaming datasets use num_aug_splits=2 or the device path."
            )
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p (aug_prob) must be a probability in [0, 1], but got {p!r}.")
        self.dataset = dataset
        self.p = p
        self.augmentation: Callable[..., Any] | None = None
        self.normalize: Callable[..., Any] | None = None

    @property
    def transform(self) -> Any:
        return getattr(self.dataset, "transform", None)

    @transform.setter
    def transform(self, value: Any) -> None:
        if not (isinstance(value, (tuple, list)) and len(value) == 3):
            raise TypeError(
                "TaggedAugmentDataset.transform must be timm's (primary, secondary, final) triple from "
                f"create_transform(..., separate=True); got {type(value).__name__}. Build the loader with "
                "saflex_data.adapters.timm.create_train_loader."
            )
        self.dataset.transform, self.augmentation, self.normalize = value

    @property
    def op_names(self) -> tuple[str]:
        return (_stage_name(self.augmentation),)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the wrapped dataset when it has one (timm's ``train.py`` calls ``loader.dataset.set_epoch``)."""
        inner = getattr(self.dataset, "set_epoch", None)
        if callable(inner):
            inner(epoch)

    def __getitem__(self, index: int) -> TaggedSample:
        x, y = self.dataset[index]
        augmented = bool(torch.rand(()) < self.p)
        if augmented and self.augmentation is not None:
            x = self.augmentation(x)
        if self.normalize is not None:
            x = self.normalize(x)
        return TaggedSample(x, y, index, 0 if augmented else -1)


class SplitsCollate:
    """Collate timm ``AugMixDataset`` items (``(split_0, ..., split_{n-1}), label``) into ``[clean; augmented...]``.

    The layout is exactly ``fast_collate``'s (all split-0 rows, then all split-1 rows, ...), for the prefetcher
    (``uint8=True``) and without it (float, where ``default_collate`` alone would return a list of splits). The
    target is a :class:`SaflexTarget` whose tags are the positions (split 0 clean, the rest augmented), so
    ``SaflexLoss`` needs no ``num_splits``.
    """

    def __init__(self, num_splits: int = 2, uint8: bool = True, op_names: Sequence[str] | None = None) -> None:
        if not isinstance(num_splits, int) or num_splits < 2:
            raise ValueError(f"num_splits must be an int >= 2 ([clean; augmented...]), but got {num_splits!r}.")
        self.num_splits = num_splits
        self.uint8 = uint8
        self.op_names = tuple(op_names) if op_names is not None else None

    def __call__(self, batch: list[tuple[Any, Any]]) -> tuple[Tensor, SaflexTarget]:
        if not batch or not isinstance(batch[0][0], (tuple, list)) or len(batch[0][0]) != self.num_splits:
            raise TypeError(
                f"SplitsCollate expects ((split_0, ..., split_{self.num_splits - 1}), label) items from timm's "
                "AugMixDataset(num_splits=...)."
            )
        if self.uint8:
            images, labels = fast_collate(batch)
        else:
            images = torch.cat([torch.stack([x[j] for x, _ in batch]) for j in range(self.num_splits)])
            labels = default_collate([y for _, y in batch])
            labels = labels.repeat((self.num_splits,) + (1,) * (labels.dim() - 1))
        size = len(batch)
        is_augmented = torch.arange(size * self.num_splits) >= size
        op = torch.where(is_augmented, 0, -1)
        return images, SaflexTarget(labels.long() if labels.dim() == 1 else labels, is_augmented, op=op,
                                    op_names=self.op_names)


def create_train_loader(
    dataset: Dataset,
    input_size: int | tuple[int, ...],
    batch_size: int,
    *,
    aug_prob: float = 0.5,
    num_aug_splits: int = 0,
    **kwargs: Any,
) -> DataLoader | PrefetchLoader:
    """``timm.data.create_loader(..., is_training=True)`` whose batches are ``(images, SaflexTarget)``.

    Every ``create_loader`` keyword works as in timm (``use_prefetcher``, ``auto_augment``, ``color_jitter``,
    ``mean``/``std``, ``num_workers``, ``distributed``, ``device``, ...). With the prefetcher the images leave the
    workers as uint8 NCHW (``fast_collate``) and ``PrefetchLoader`` moves them and the target to ``device`` and
    normalises them there; without it they are float and normalised by the dataset transform.

    Args:
        dataset: A dataset from ``timm.data.create_dataset`` (or any dataset returning ``(image, label)`` that
            applies a settable ``.transform``); this function wraps it. An ``AugMixDataset`` (what ``train.py``
            makes for ``--aug-splits``) is used as it is when its ``num_splits`` equals ``num_aug_splits``.
        input_size: As in ``create_loader``.
        batch_size: Samples per batch (per split with ``num_aug_splits``: the batch has ``batch_size * n`` rows).
        aug_prob: Probability that a sample gets timm's secondary augmentation stage (``auto_augment`` or colour
            jitter...) and is tagged augmented. Used when ``num_aug_splits == 0``.
        num_aug_splits: ``0``: per-sample tags, batch size unchanged. ``n >= 2``: timm's aug-splits layout
            ``[clean; augmented x (n-1)]`` (each image once clean, ``n-1`` times augmented), tagged by position.
        **kwargs: Any other ``timm.data.create_loader`` argument (``is_training`` is always ``True``; ``collate_fn``
            is this function's own and cannot be passed).

    Returns:
        timm's loader (``PrefetchLoader`` or ``DataLoader``); ``len``, ``.sampler``, ``.dataset`` are timm's.

    Note:
        Random erasing (``re_prob``) is part of the base pipeline: it hits clean and augmented samples alike
        (``re_split=True`` spares the clean split in the split layout, as in timm). Collate-time mixup
        (``FastCollateMixup``) is not supported; mixed batches come from ``saflex_data.mixing`` on the device.

    Raises:
        ValueError: For ``is_training=False``, a ``collate_fn``, ``no_aug=True``, ``input_size_choices``, a bad
            ``aug_prob``/``num_aug_splits``, or a transform without a secondary augmentation stage.
    """
    if kwargs.get("is_training", True) is not True:
        raise ValueError("create_train_loader builds a training loader; is_training must be True (or omitted).")
    if kwargs.get("collate_fn") is not None:
        raise ValueError(
            "collate_fn cannot be passed to create_train_loader: it installs its own tagging collate "
            "(FastCollateMixup is not supported; mix on the device with saflex_data.mixing.MixUp/CutMix, which tag "
            "the mixed rows)."
        )
    if kwargs.get("no_aug"):
        raise ValueError("no_aug=True leaves nothing to tag; SAFLEX needs an augmentation (drop no_aug).")
    if kwargs.get("input_size_choices") is not None:
        raise ValueError("input_size_choices (scheduled resolutions) is not supported by create_train_loader.")
    if not isinstance(num_aug_splits, int) or num_aug_splits == 1 or num_aug_splits < 0:
        raise ValueError(f"num_aug_splits must be 0 (per-sample tags) or an int >= 2, but got {num_aug_splits!r}.")
    if isinstance(dataset, TaggedAugmentDataset):
        raise TypeError(
            "dataset is already a TaggedAugmentDataset; pass the plain dataset, create_train_loader wraps it."
        )
    if isinstance(dataset, AugMixDataset) and dataset.num_splits != num_aug_splits:
        # train.py wraps the dataset in AugMixDataset itself for --aug-splits; accept that, with matching splits.
        raise ValueError(
            f"dataset is an AugMixDataset with num_splits={dataset.num_splits}, but num_aug_splits={num_aug_splits}; "
            "pass the same number (or the plain dataset)."
        )
    kwargs.pop("is_training", None)
    kwargs.pop("collate_fn", None)
    use_prefetcher = kwargs.get("use_prefetcher", True)
    if num_aug_splits:
        wrapped: Dataset = dataset if isinstance(dataset, AugMixDataset) else AugMixDataset(dataset, num_aug_splits)
    else:
        wrapped = TaggedAugmentDataset(dataset, p=aug_prob)
    # num_aug_splits > 0 makes create_loader assign the (primary, secondary, final) triple to wrapped.transform; for
    # per-sample tags it changes nothing else (RandomErasing splits only follow it with re_split=True, where timm
    # uses 2 splits either way).
    collate: SplitsCollate | SaflexCollate
    if num_aug_splits:
        collate = SplitsCollate(num_aug_splits, uint8=use_prefetcher)
    else:  # pre-tagged samples: SaflexCollate only stacks them (uint8 NCHW for the prefetcher, like fast_collate)
        collate = SaflexCollate(output="uint8" if use_prefetcher else "tensor", op_names=("augment",))
    loader = _timm_create_loader(
        wrapped, input_size, batch_size, is_training=True, num_aug_splits=num_aug_splits or 2,
        collate_fn=collate, **kwargs,
    )
    augmentation = wrapped.augmentation
    if augmentation is None or not getattr(augmentation, "transforms", [augmentation]):
        raise ValueError(
            "the training transform has no secondary augmentation stage to tag: set auto_augment= (e.g. "
            "'rand-m9-mstd0.5') or color_jitter > 0 (timm drops colour jitter when auto_augment is set)."
        )
    collate.op_names = (_stage_name(augmentation),)
    _attach_config(loader, kwargs, use_prefetcher)
    return loader


def _attach_config(loader: Any, kwargs: dict[str, Any], use_prefetcher: bool) -> None:
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = kwargs.get("mean", IMAGENET_DEFAULT_MEAN)
    std = kwargs.get("std", IMAGENET_DEFAULT_STD)
    loader.saflex_config = {
        "mean": tuple(float(m) for m in mean),
        "std": tuple(float(s) for s in std),
        "use_prefetcher": bool(use_prefetcher),
        "device": kwargs.get("device", torch.device("cuda")),
        "img_dtype": kwargs.get("img_dtype", torch.float32),
    }
