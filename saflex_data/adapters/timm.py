"""timm integration: a tagged training loader, a validation stream and a task, all built from timm's own machinery.

A timm user changes two places to get SAFLEX (Ding et al., ICLR 2024):

* the **loader**: :func:`create_train_loader` is ``timm.data.create_loader`` (same arguments, prefetcher on or off)
  whose batches carry a :class:`saflex_data.SaflexTarget` saying which samples went through the augmentation
  (per-sample tags, stacked by :class:`saflex_data.SaflexCollate`, uint8 NCHW for the prefetcher like
  ``fast_collate``; or timm's ``[clean; augmented]`` split layout with ``num_aug_splits=2``).
  timm's own ``--aug-splits 2`` (``[clean; augmented]`` batches from ``AugMixDataset`` + ``fast_collate``) also
  works unchanged, with ``SaflexLoss(num_splits=2)``;
* the **loss**: ``SaflexLoss(model, val_loader, prepare=ValPrepare.from_model(model))`` with the validation stream
  from :func:`create_val_loader` (``create_loader(is_training=False)``, normalised exactly like the training inputs,
  shuffled and cycled), or, on timm >= 1.0.23, the task :class:`SaflexTask` in place of ``ClassificationTask``.

Tagging follows timm's split of the training transform into ``(primary, secondary, final)``
(``create_transform(separate=True)``, the same split ``AugMixDataset`` uses): every sample gets ``primary``
(RandomResizedCrop + flips) and ``final`` (to tensor / normalise); the ``secondary`` stage (AutoAugment,
RandAugment, ColorJitter, ...) is the augmentation SAFLEX learns to weight and relabel.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, default_collate

from .._deps import require
from ..batch import SaflexTarget
from ..collate import SaflexCollate, TaggedSample
from ..loss import SaflexLoss, unwrap_model

timm = require("timm")
from timm.data import AugMixDataset  # noqa: E402
from timm.data import create_loader as _timm_create_loader  # noqa: E402
from timm.data.loader import PrefetchLoader, fast_collate  # noqa: E402

__all__ = [
    "SaflexTask",
    "TaggedAugmentDataset",
    "SplitsCollate",
    "ValPrepare",
    "create_train_loader",
    "create_val_loader",
    "has_task_api",
    "is_channels_last",
    "step_stats",
    "TaggedMixup",
    "check_train_args",
    "log_line",
    "train_class_map",
]


# ----------------------------------------------------------------------------------------------------------------
# training side: tagged datasets and collates
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# validation side
# ----------------------------------------------------------------------------------------------------------------
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
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6) for x, y in zip(a, b))


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


class ValPrepare:
    """``prepare=`` for ``SaflexLoss``: makes validation inputs look like the training inputs, and checks them.

    Applied after the device move: optional on-device normalisation (for pipelines that normalise after a GPU
    augmentation, e.g. kornia), dtype, then ``channels_last``. The first batch is checked: uint8 inputs (un-normalised
    ``fast_collate`` output without a prefetcher) raise, and inputs whose statistics are far from the training
    batch's (see :meth:`observe_train`; e.g. ``[0, 1]`` or ``0..255`` images against normalised ones) warn.

    Args:
        channels_last: Convert 4-D inputs to ``torch.channels_last`` (do it when the model is channels_last).
        dtype: Cast the inputs to this dtype (``None`` keeps them; ``SaflexLoss`` runs the validation pass in fp32).
        mean: With ``std``: normalise on the device as ``(x - mean) / std`` (per channel, in the input's units).
        std: See ``mean``.
        check: Run the checks on the first validation batch.
    """

    def __init__(
        self,
        *,
        channels_last: bool = False,
        dtype: torch.dtype | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        check: bool = True,
    ) -> None:
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together (or neither).")
        self.channels_last = channels_last
        self.dtype = dtype
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.check = check
        self._checked = False
        self._train_stats: tuple[float, float] | None = None

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: Any) -> ValPrepare:
        """A ``ValPrepare`` whose ``channels_last`` follows the model's memory format (``torch.compile`` and DDP
        wrappers are looked through)."""
        if "channels_last" not in kwargs:
            kwargs["channels_last"] = is_channels_last(model)
        return cls(**kwargs)

    def observe_train(self, inputs: Tensor) -> None:
        """Record the statistics of a training batch for the mismatch check (``SaflexTask`` calls this once)."""
        if self._train_stats is None and inputs.is_floating_point() and inputs.numel():
            with torch.no_grad():
                x = inputs.detach().float()
                self._train_stats = (float(x.mean()), float(x.std()))

    def __call__(self, inputs: Tensor) -> Tensor:
        if inputs.dtype == torch.uint8:
            raise TypeError(
                "validation inputs are uint8 (0..255, not normalised): the validation loader uses fast_collate "
                "without timm's prefetcher. Build it with create_val_loader(..., train_loader=loader_train) so it "
                "normalises like the training loader, or pass use_prefetcher=True."
            )
        if self.mean is not None:
            std = self.std.to(inputs.device)  # type: ignore[union-attr]
            inputs = (inputs.float() - self.mean.to(inputs.device)) / std
        if self.dtype is not None:
            inputs = inputs.to(self.dtype)
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if self.check and not self._checked:
            self._checked = True
            self._check(inputs)
        return inputs

    def _check(self, inputs: Tensor) -> None:
        x = inputs.detach().float()
        mean, std = float(x.mean()), float(x.std())
        reference = self._train_stats
        if reference is not None:
            ratio = std / max(reference[1], 1e-6)
            if not 0.33 < ratio < 3.0 or abs(mean - reference[0]) > 1.5 * max(reference[1], 1e-6):
                warnings.warn(
                    f"validation inputs (mean {mean:.3g}, std {std:.3g}) do not look normalised like the training "
                    f"inputs (mean {reference[0]:.3g}, std {reference[1]:.3g}); build the validation stream with "
                    "create_val_loader(..., train_loader=loader_train) or give ValPrepare(mean=, std=).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        elif float(x.min()) >= 0.0 and (float(x.max()) <= 1.0 or float(x.max()) > 10.0):
            warnings.warn(
                f"validation inputs are all in [{float(x.min()):.3g}, {float(x.max()):.3g}]: they look un-normalised "
                "(timm models expect mean/std normalised inputs); check the validation loader's mean/std or give "
                "ValPrepare(mean=, std=).",
                RuntimeWarning,
                stacklevel=2,
            )


def is_channels_last(model: nn.Module) -> bool:
    """Whether the model's first 4-D parameter (a conv weight) is stored channels_last."""
    for p in unwrap_model(model).parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


# ----------------------------------------------------------------------------------------------------------------
# task (timm >= 1.0.23)
# ----------------------------------------------------------------------------------------------------------------
def has_task_api() -> bool:
    """Whether the installed timm has ``timm.task.ClassificationTask`` (timm >= 1.0.23)."""
    try:
        from timm.task import ClassificationTask  # noqa: F401
    except ImportError:
        return False
    return True


_TAGS_HINT = (
    "build the training loader with saflex_data.adapters.timm.create_train_loader (its targets are SaflexTarget), "
    "or use timm's --aug-splits 2 layout with SaflexLoss(num_splits=2)"
)

if has_task_api():
    from timm.task import ClassificationTask as _TaskBase
else:  # pragma: no cover - exercised only with timm < 1.0.23
    _TaskBase = nn.Module


class SaflexTask(_TaskBase):  # type: ignore[misc, valid-type]
    """timm ``ClassificationTask`` whose criterion is a :class:`saflex_data.SaflexLoss` (timm >= 1.0.23).

    ``result = task(input, target)`` returns ``{'loss', 'output'}`` plus detached SAFLEX statistics of the step
    (``saflex_weight_mean``, ``saflex_kept_fraction``, ``saflex_relabeled_fraction``: tensors, no host sync).
    ``task.compile()`` compiles the model; the loss keeps the raw module (its hooks are traced into the compiled
    graph without graph breaks) and runs its validation pass eagerly. ``prepare_distributed`` wraps the model in
    DDP as usual; the loss's extra passes use the raw module.

    Args:
        model: The timm model.
        val_loader: The validation stream (:func:`create_val_loader`). Ignored when ``criterion`` is given.
        criterion: A ready ``SaflexLoss`` (built on the same model), instead of ``val_loader``/``saflex_kwargs``.
        saflex_kwargs: Keyword arguments of ``SaflexLoss`` (``method``, ``beta``, ``tau``, ``num_splits``,
            ``label_smoothing``, ...). ``prepare`` defaults to ``ValPrepare.from_model(model)``.
        device: Device for task tensors (as in timm).
        dtype: Dtype for task tensors (as in timm).
        verbose: Log the criterion (as in timm).
    """

    def __init__(
        self,
        model: nn.Module,
        val_loader: Any = None,
        *,
        criterion: SaflexLoss | None = None,
        saflex_kwargs: dict[str, Any] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
    ) -> None:
        if not has_task_api():
            raise ImportError(
                f"SaflexTask needs timm >= 1.0.23 (timm.task); timm {timm.__version__} is installed. With older timm "
                "swap the criterion instead: train_loss_fn = SaflexLoss(model, val_loader, ...)."
            )
        if criterion is None:
            if val_loader is None:
                raise ValueError("SaflexTask needs val_loader (a create_val_loader stream) or criterion=SaflexLoss.")
            kwargs = dict(saflex_kwargs or {})
            kwargs.setdefault("prepare", ValPrepare.from_model(model))
            criterion = SaflexLoss(model, val_loader, **kwargs)
        elif not isinstance(criterion, SaflexLoss):
            raise TypeError(f"criterion must be a SaflexLoss, but got {type(criterion).__name__}.")
        elif saflex_kwargs:
            raise ValueError("pass either criterion or saflex_kwargs, not both.")
        if criterion.model is not unwrap_model(model):
            raise ValueError("criterion was built on a different model than the one given to SaflexTask.")
        super().__init__(model, criterion=criterion, device=device, dtype=dtype, verbose=verbose)

    def forward(self, input: Tensor, target: SaflexTarget | Tensor) -> dict[str, Tensor]:  # noqa: A002
        criterion: SaflexLoss = self.criterion
        if not isinstance(target, SaflexTarget) and criterion.num_splits is None:
            shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise TypeError(f"target has no augmentation tags (got {shape}): {_TAGS_HINT}.")
        prepare = criterion.prepare
        if isinstance(prepare, ValPrepare) and prepare._train_stats is None:
            prepare.observe_train(input)
        if criterion.method == "single_pass":
            output = criterion.forward_train(input, model=self.trainable_module)
        else:
            output = self.trainable_module(input)
        loss = criterion(output, target)
        result = {"loss": loss, "output": output}
        result.update(step_stats(criterion))
        return result


@torch.no_grad()
def step_stats(criterion: SaflexLoss) -> dict[str, Tensor]:
    """The last step's SAFLEX statistics as detached tensors (no host sync; ``{}`` before the first step)."""
    last = criterion.last_step
    if not last:
        return {}
    aug = last["is_augmented"]
    weights = last["weights"]
    n = aug.sum().clamp_min(1).float()
    relabeled = (last["targets"].argmax(-1) != last["upstream"]) & aug
    return {
        "saflex_weight_mean": (weights * aug).sum() / n,
        "saflex_kept_fraction": ((weights > 0) & aug).sum().float() / n,
        "saflex_relabeled_fraction": relabeled.sum().float() / n,
    }


# ----------------------------------------------------------------------------------------------------------------
# train.py support: tagged mixing, start-up checks, log line
# ----------------------------------------------------------------------------------------------------------------
class TaggedMixup:
    """Tagged stand-in for timm's ``Mixup``, built from the same ``mixup_args`` (``--mixup``, ``--cutmix``, ...).

    ``input, target = mixup_fn(input, target)`` on the device, with the prefetcher on or off: the mixed rows come
    back tagged augmented with their mixed label distribution (:class:`saflex_data.mixing.MixUp` /
    :class:`saflex_data.mixing.CutMix`), so SAFLEX weighs and relabels them. ``mixup_enabled = False`` (what
    ``train.py`` sets at ``--mixup-off-epoch``) returns the batch unchanged.

    Differences from timm's ``Mixup``: partners are a random permutation (timm: the flipped batch); CutMix boxes are
    drawn per row and their ``lam`` is always the pasted area's (timm's ``correct_lam``); ``mode="elem"`` mixes each
    row with probability ``prob`` (timm: each row with its own ``lam``, the unmixed ones with ``lam = 1``, which is
    the same). ``label_smoothing`` is not applied here: give it to ``SaflexLoss(label_smoothing=...)``, which smooths
    every row's target, mixed or not, as timm's mixup targets are.

    Args:
        mixup_alpha: MixUp's ``Beta(alpha, alpha)``; ``0`` turns MixUp off.
        cutmix_alpha: CutMix's ``Beta(alpha, alpha)``; ``0`` turns CutMix off.
        cutmix_minmax: Not supported (raises unless ``None``).
        prob: Probability of mixing the batch (``mode="batch"``) or each row (``mode="elem"``).
        switch_prob: Probability of CutMix instead of MixUp when both are on (one choice per batch).
        mode: ``"batch"`` (one ``lam`` per batch for MixUp) or ``"elem"`` (per row); ``"pair"`` is not supported.
        correct_lam: Accepted for timm's arguments (CutMix's ``lam`` is always the corrected one).
        label_smoothing: Accepted for timm's arguments; see above.
        num_classes: Number of classes.
        generator: Optional ``torch.Generator`` for the draws (default: torch's global RNG, as timm's ``Mixup`` uses
            NumPy's).

    Raises:
        ValueError: For ``cutmix_minmax``, ``mode="pair"`` or another unknown mode, both alphas ``0``, or a bad
            probability.
    """

    def __init__(
        self,
        mixup_alpha: float = 1.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: Sequence[float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        correct_lam: bool = True,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
        generator: torch.Generator | None = None,
    ) -> None:
        from ..mixing import CutMix, MixUp

        if cutmix_minmax is not None:
            raise ValueError(
                f"cutmix_minmax={tuple(cutmix_minmax)} (--cutmix-minmax) is not supported by SAFLEX's tagged CutMix; "
                "use cutmix_alpha (--cutmix ALPHA) instead."
            )
        if mode not in ("batch", "elem"):
            raise ValueError(
                f"mode={mode!r} (--mixup-mode) is not supported by SAFLEX's tagged mixing; use 'batch' or 'elem'."
            )
        if not mixup_alpha > 0 and not cutmix_alpha > 0:
            raise ValueError(f"mixup_alpha or cutmix_alpha must be > 0, but got {mixup_alpha} and {cutmix_alpha}.")
        for name, value in (("prob", prob), ("switch_prob", switch_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], but got {value!r}.")
        self.prob, self.switch_prob, self.mode = float(prob), float(switch_prob), mode
        self.label_smoothing = label_smoothing
        self.generator = generator
        self.mixup_enabled = True
        row_p = self.prob if mode == "elem" else 1.0
        common = dict(p=row_p, num_classes=num_classes, generator=generator)
        self.mixup = MixUp(alpha=mixup_alpha, same_on_batch=mode == "batch", **common) if mixup_alpha > 0 else None
        self.cutmix = CutMix(alpha=cutmix_alpha, **common) if cutmix_alpha > 0 else None

    def __call__(self, inputs: Tensor, target: SaflexTarget | Tensor) -> tuple[Tensor, SaflexTarget | Tensor]:
        if not self.mixup_enabled:
            return inputs, target
        if self.mode == "batch" and self.prob < 1.0 and not self._coin(self.prob):
            return inputs, target
        op = self.mixup
        if self.cutmix is not None and (op is None or self._coin(self.switch_prob)):
            op = self.cutmix
        assert op is not None
        return op(inputs, target)

    def _coin(self, p: float) -> bool:
        return bool(torch.rand((), generator=self.generator) < p)

    def __repr__(self) -> str:
        return f"TaggedMixup(mixup={self.mixup!r}, cutmix={self.cutmix!r}, prob={self.prob}, mode={self.mode!r})"


def mixup_args_from(args: Any) -> dict[str, Any]:
    """``train.py``'s ``mixup_args`` from its parsed arguments (for :class:`TaggedMixup`)."""
    return dict(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
        num_classes=args.num_classes,
    )


def check_train_args(args: Any) -> None:
    """Raise at start-up for ``train.py`` options SAFLEX would otherwise drop or break mid-run.

    ``--jsd-loss`` (JSD consistency on the clean split: another loss than the weighted cross-entropy SAFLEX
    decides for) and ``--bce-loss`` (SAFLEX's decisions are derived for softmax cross-entropy) raise; so do the
    NaFlex loader and scheduled image sizes (``create_train_loader`` builds neither) and mixing options that
    :class:`TaggedMixup` does not support. Options that are absent from ``args`` are skipped.

    Raises:
        ValueError: Naming the option and what to do instead.
    """
    def flag(name: str) -> Any:
        return getattr(args, name, None)

    if flag("jsd_loss"):
        raise ValueError(
            "--jsd-loss cannot be combined with SAFLEX: JsdCrossEntropy trains the clean split with a consistency "
            "term, and SAFLEX replaces the loss with its weighted, relabelled cross-entropy. Drop --jsd-loss (keep "
            "--aug-splits 2 for [clean; augmented] batches)."
        )
    if flag("bce_loss"):
        raise ValueError(
            "--bce-loss is not supported with SAFLEX: its weights and soft labels are decided for softmax "
            "cross-entropy, and BinaryCrossEntropy would train on them with another loss. Drop --bce-loss."
        )
    if flag("naflex_loader"):
        raise ValueError("--naflex-loader is not supported with SAFLEX (create_train_loader builds timm's standard "
                         "loader); drop it.")
    if flag("train_img_sizes") is not None:
        raise ValueError("--train-img-sizes (scheduled resolutions) is not supported with SAFLEX; drop it.")
    if flag("no_aug"):
        raise ValueError("--no-aug leaves SAFLEX nothing to weigh; drop it.")
    if (flag("mixup") or 0) > 0 or (flag("cutmix") or 0) > 0 or flag("cutmix_minmax") is not None:
        TaggedMixup(**mixup_args_from(args))  # raises for the options it does not support


_LOGGED: weakref.WeakKeyDictionary[nn.Module, tuple[float, float, float]] = weakref.WeakKeyDictionary()


def log_line(criterion: SaflexLoss) -> str:
    """One log line: SAFLEX's kept and relabeled fractions of the augmented samples since the previous call.

    Counted over every step in between (from ``criterion.op_stats()``; the first call counts from the start), plus
    the last step's own fractions and mean weight. Call it where the training loop logs (``train.py``'s
    ``--log-interval``); under DDP the numbers are global and equal on every rank.
    """
    stats = criterion.op_stats()
    count = sum(s["count"] for s in stats.values())
    kept = sum(s["kept"] * s["count"] for s in stats.values())
    relabeled = sum(s["relabeled"] * s["count"] for s in stats.values())
    before = _LOGGED.get(criterion, (0.0, 0.0, 0.0))
    if count < before[0]:  # reset_stats() in between
        before = (0.0, 0.0, 0.0)
    _LOGGED[criterion] = (count, kept, relabeled)
    n = round(count - before[0])
    last = criterion.stats
    if "kept_fraction" not in last:
        return f"SAFLEX: no augmented samples yet (step {int(last['step'])})"
    interval = (
        f"kept {(kept - before[1]) / n:.3f}, relabeled {(relabeled - before[2]) / n:.3f} of {n} augmented samples "
        "since the last log"
        if n > 0
        else "no augmented samples since the last log"
    )
    return (
        f"SAFLEX: {interval} (last step: kept {last['kept_fraction']:.3f}, relabeled "
        f"{last['relabeled_fraction']:.3f}, weight {last['weight_mean']:.3f}, augmented "
        f"{last['augmented_fraction']:.3f}; step {int(last['step'])})"
    )
