"""saflex_data: repair any upstream data augmentation with SAFLEX sample weights and soft labels.

Ding et al., "SAFLEX: Self-Adaptive Augmentation via Feature Label Extrapolation", ICLR 2024.
"""

from . import functional
from .batch import SaflexTarget
from .loss import SaflexLoss

__version__ = "0.1.0"

__all__ = ["SaflexLoss", "SaflexTarget", "functional", "__version__"]
