"""saflex_data: SAFLEX for PyTorch. The augmented samples of any upstream augmentation are tagged, and at each
training step the loss weights them (and, if asked, relabels them) by how their gradient agrees with a validation
gradient. It scores labels against the validation data and does not detect destroyed images. Where it helped, and
where the model's own confidence did better, is measured in the README's verdict (``docs/results.md``: the tables).

Ding et al., "SAFLEX: Self-Adaptive Augmentation via Feature Label Extrapolation", ICLR 2024.
Core modules import torch only; optional libraries live in ``saflex_data.adapters.*`` and are imported there.
"""

from . import functional
from .batch import SaflexTarget
from .collate import CallableTransform, IndexedDataset, SaflexCollate, SampleTransform, TaggedSample
from .contrastive import SaflexContrastiveLoss
from .device import DeviceAugment
from .functional import Rule
from .loss import SaflexLoss
from .mixing import CutMix, MixParams, MixUp, TabularCutMix
from .offline import OfflineAugmentations, OfflineAugmentedDataset
from .sampler import SaflexBatchSampler, SaflexDataset

__version__ = "0.2.0"

__all__ = [
    "CallableTransform",
    "CutMix",
    "DeviceAugment",
    "IndexedDataset",
    "MixParams",
    "MixUp",
    "OfflineAugmentations",
    "OfflineAugmentedDataset",
    "Rule",
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
