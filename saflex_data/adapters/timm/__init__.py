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

from ..._deps import require

timm = require("timm")

from ._holdout import create_holdout_dataset, describe_holdout  # noqa: E402
from ._prepare import ValPrepare, is_channels_last  # noqa: E402
from ._task import SaflexTask, has_task_api, step_stats  # noqa: E402
from ._train_loader import SplitsCollate, TaggedAugmentDataset, create_train_loader  # noqa: E402
from ._train_script import (  # noqa: E402
    TaggedMixup,
    check_train_args,
    log_line,
    mixup_args_from,
    plain_cross_entropy,
)
from ._val_loader import create_val_loader, train_class_map  # noqa: E402

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
    "mixup_args_from",
    "plain_cross_entropy",
    "create_holdout_dataset",
    "describe_holdout",
]
