"""saflex_data: repair any upstream data augmentation with SAFLEX sample weights and soft labels.

Ding et al., "SAFLEX: Self-Adaptive Augmentation via Feature Label Extrapolation", ICLR 2024.
Core modules import torch only; optional libraries live in ``saflex_data.adapters.*`` and are imported there.
"""

from . import functional
from .batch import SaflexTarget
from .collate import CallableTransform, IndexedDataset, SaflexCollate, SampleTransform, TaggedSample
from .contrastive import SaflexContrastiveLoss
from .device import DeviceAugment
from .loss import SaflexLoss
from .mixing import CutMix, MixParams, MixUp, TabularCutMix
from .offline import OfflineAugmentations, OfflineAugmentedDataset
from .sampler import SaflexBatchSampler, SaflexDataset

__version__ = "0.1.0"

__all__ = [
    "CallableTransform",
    "CutMix",
    "DeviceAugment",
    "IndexedDataset",
    "MixParams",
    "MixUp",
    "OfflineAugmentations",
    "OfflineAugmentedDataset",
    "SaflexBatchSampler",
    "SaflexCollate",
    "SaflexContrastiveLoss",
    "SaflexDataset",
    "SaflexLoss",
    "SaflexTarget",
    "SampleTransform",
    "TabularCutMix",
    "TaggedSample",
    "__version__",
    "functional",
]
