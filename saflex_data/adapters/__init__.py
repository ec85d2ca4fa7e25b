"""Adapters for upstream augmentation libraries; the only place optional dependencies are imported.

Import each one qualified, so that nothing optional is imported before it is needed::

    from saflex_data.adapters.torchvision import TaggedAutoAugment, TaggedRandomApply, TaggedMixUp, TaggedCutMix
    from saflex_data.adapters.albumentations import AlbumentationsTransform, AlbumentationsWorkerInit
    from saflex_data.adapters.kornia import KorniaAugment, KorniaTagger

A missing extra raises ``ModuleNotFoundError("saflex_data.adapters.kornia needs kornia; pip install
'saflex-data[kornia]'")``.
"""

__all__: list[str] = []
