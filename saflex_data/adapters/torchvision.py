"""torchvision.transforms.v2 adapters: per-sample transforms that report what they applied, and tagged MixUp/CutMix.

torchvision v2 transforms return only their output, with no record of which random op fired or whether any did, so:

* :class:`TaggedRandomApply` / :class:`TaggedRandomChoice` own the coin flip (v2's ``RandomApply`` drops it);
* :class:`TaggedAutoAugment` wraps ``RandAugment``, ``TrivialAugmentWide`` or ``AutoAugment`` and records the ops
  each call applied (samples where only ``Identity`` ran, or an AutoAugment sub-policy skipped every op, are
  tagged clean: they are bit-identical to the input);
* :class:`TaggedMixUp` / :class:`TaggedCutMix` subclass ``v2.MixUp``/``v2.CutMix`` and capture ``lam`` (and the
  CutMix box) through the public ``make_params`` hook; pairing is torchvision's ``roll(1, 0)``.

The per-sample classes implement :class:`saflex_data.collate.SampleTransform` and go into
:class:`saflex_data.SaflexCollate` or :class:`saflex_data.sampler.SaflexDataset`::

    collate = SaflexCollate(TaggedAutoAugment(v2.RandAugment()), post_transform=v2.ToDtype(torch.float32, scale=True))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from saflex_data._common import draw_seed, seeded
from saflex_data._deps import require
from saflex_data.batch import SaflexTarget
from saflex_data.device import as_target
from saflex_data.mixing import MixParams

require("torchvision", extra="torchvision")
from torchvision.transforms import v2  # noqa: E402

from saflex_data._common import describe as _describe  # noqa: E402

__all__ = ["TaggedRandomApply", "TaggedRandomChoice", "TaggedAutoAugment", "TaggedMixUp", "TaggedCutMix"]


def _name(transform: Any) -> str:
    return getattr(transform, "__name__", None) or type(transform).__name__


class TaggedRandomApply:
    """Apply a transform with probability ``p`` and report whether it ran (v2's ``RandomApply`` does not).

    Args:
        transform: Any per-sample transform (a ``v2.Compose`` of random ops counts as one op).
        p: Probability of applying it.
        name: Op name (default: the transform's class name).

    Example:
        >>> t = TaggedRandomApply(v2.RandomHorizontalFlip(p=1.0), p=1.0)
        >>> out, op = t.augment(torch.arange(4.0).view(1, 1, 4), torch.Generator().manual_seed(0))
        >>> out.flatten().tolist(), t.op_names[op]
        ([3.0, 2.0, 1.0, 0.0], 'RandomHorizontalFlip')
    """

    def __init__(self, transform: Callable[[Any], Any], p: float = 0.5, *, name: str | None = None) -> None:
        if not callable(transform):
            raise TypeError(f"TaggedRandomApply: transform must be callable, but got {type(transform).__name__}.")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"TaggedRandomApply: p must be a probability in [0, 1], but got {p!r}.")
        self.transform = transform
        self.p = float(p)
        self.op_names = (name or _name(transform),)

    def clean(self, sample: Any) -> Any:
        return sample

    def augment(self, sample: Any, generator: torch.Generator) -> tuple[Any, int]:
        if float(torch.rand((), generator=generator)) >= self.p:
            return sample, -1
        with seeded(draw_seed(generator)):
            return self.transform(sample), 0

    def __repr__(self) -> str:
        return f"TaggedRandomApply({self.transform!r}, p={self.p})"


class TaggedRandomChoice:
    """Apply one of several transforms and report which (its position is the op id).

    Args:
        transforms: Per-sample transforms.
        p: Relative probabilities (uniform by default).
        names: Op names (default: class names).
    """

    def __init__(
        self,
        transforms: Sequence[Callable[[Any], Any]],
        p: Sequence[float] | None = None,
        *,
        names: Sequence[str] | None = None,
    ) -> None:
        if not transforms or not all(callable(t) for t in transforms):
            raise TypeError("TaggedRandomChoice: transforms must be a non-empty sequence of callables.")
        if p is not None and (len(p) != len(transforms) or any(not w >= 0 for w in p) or sum(p) <= 0):
            raise ValueError(
                f"TaggedRandomChoice: p must be {len(transforms)} non-negative weights with a positive sum, "
                f"but got {p}."
            )
        if names is not None and len(names) != len(transforms):
            raise ValueError(f"TaggedRandomChoice: got {len(names)} names for {len(transforms)} transforms.")
        self.transforms = list(transforms)
        self.p = None if p is None else torch.tensor([float(w) for w in p], dtype=torch.float64)
        self.op_names = tuple(names) if names is not None else tuple(_name(t) for t in transforms)

    def clean(self, sample: Any) -> Any:
        return sample

    def augment(self, sample: Any, generator: torch.Generator) -> tuple[Any, int]:
        if self.p is None:
            k = int(torch.randint(len(self.transforms), (), generator=generator))
        else:
            k = int(torch.multinomial(self.p, 1, generator=generator))
        with seeded(draw_seed(generator)):
            return self.transforms[k](sample), k


class TaggedAutoAugment:
    """Per-sample ``RandAugment``/``TrivialAugmentWide``/``AutoAugment`` that records the ops it applied.

    The op id is the first non-``Identity`` op applied (``op_level="op"``, names like ``"RandAugment:Rotate"``) or
    the transform as a whole (``op_level="transform"``). Samples on which only ``Identity`` ran (or every op of an
    AutoAugment sub-policy was skipped) are tagged clean.

    Recording wraps the transform's ``_apply_image_or_video_transform`` for the duration of one call (a private
    torchvision method, present in 0.15-0.29); if it is missing, every call counts as augmented by the transform.

    Args:
        transform: A ``v2.RandAugment``, ``v2.TrivialAugmentWide`` or ``v2.AutoAugment`` instance.
        op_level: ``"op"`` or ``"transform"``.
        p: Probability of calling the transform at all (default 1: the transform always runs).

    Example:
        >>> t = TaggedAutoAugment(v2.TrivialAugmentWide())
        >>> img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
        >>> out, op = t.augment(img, torch.Generator().manual_seed(1))
        >>> out.shape, op == -1 or t.op_names[op].startswith("TrivialAugmentWide:")
        (torch.Size([3, 8, 8]), True)
    """

    def __init__(self, transform: Any, *, op_level: str = "op", p: float = 1.0) -> None:
        space = getattr(transform, "_AUGMENTATION_SPACE", None)
        if not callable(transform) or not isinstance(space, dict):
            raise TypeError(
                "TaggedAutoAugment: transform must be a torchvision v2 RandAugment, TrivialAugmentWide or AutoAugment, "
                f"but got {type(transform).__name__}."
            )
        if op_level not in ("op", "transform"):
            raise ValueError(f"TaggedAutoAugment: op_level must be 'op' or 'transform', but got {op_level!r}.")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"TaggedAutoAugment: p must be a probability in [0, 1], but got {p!r}.")
        self.transform = transform
        self.op_level = op_level
        self.p = float(p)
        cls = type(transform).__name__
        self._recordable = hasattr(type(transform), "_apply_image_or_video_transform")
        if op_level == "op" and self._recordable:
            self.ops = tuple(k for k in space if k != "Identity")
            self.op_names: tuple[str, ...] = tuple(f"{cls}:{k}" for k in self.ops)
        else:
            self.ops = ()
            self.op_names = (cls,)

    def clean(self, sample: Any) -> Any:
        return sample

    def augment(self, sample: Any, generator: torch.Generator) -> tuple[Any, int]:
        if self.p < 1.0 and float(torch.rand((), generator=generator)) >= self.p:
            return sample, -1
        with seeded(draw_seed(generator)):
            if not self._recordable:
                return self.transform(sample), 0
            applied: list[str] = []
            method = type(self.transform)._apply_image_or_video_transform
            transform = self.transform

            def record(image: Any, transform_id: str, magnitude: float, **kwargs: Any) -> Any:
                applied.append(transform_id)
                return method(transform, image, transform_id, magnitude, **kwargs)

            transform._apply_image_or_video_transform = record  # instance attribute, removed below
            try:
                out = transform(sample)
            finally:
                del transform._apply_image_or_video_transform
        effective = [a for a in applied if a != "Identity"]
        if not effective:
            return out, -1
        return out, (self.ops.index(effective[0]) if self.ops else 0)

    def __repr__(self) -> str:
        return f"TaggedAutoAugment({self.transform!r}, op_level={self.op_level!r})"


class _TaggedMixMixin:
    """Capture ``make_params`` and turn torchvision's output into ``(inputs, SaflexTarget)``."""

    op_name: str
    last_params: MixParams | None
    _default_op_name: str

    def __init__(self, *, op_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.op_name = self._default_op_name if op_name is None else op_name
        self.op_names = (self.op_name,)
        self.last_params = None

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        params = super().make_params(flat_inputs)  # type: ignore[misc]
        self._captured.update(params)
        return params

    def forward(self, inputs: Tensor, labels: Tensor | SaflexTarget) -> tuple[Tensor, SaflexTarget]:
        return self._tagged(super().forward, inputs, labels)  # type: ignore[misc]

    def forward_tagged(self, inputs: Tensor, target: SaflexTarget) -> tuple[Tensor, SaflexTarget]:
        return self.forward(inputs, target)

    def _tagged(
        self, parent_forward: Callable[..., Any], inputs: Tensor, labels: Tensor | SaflexTarget
    ) -> tuple[Tensor, SaflexTarget]:
        owner = type(self).__name__
        target = as_target(labels, owner)
        if not isinstance(inputs, Tensor) or inputs.dim() < 4:
            raise TypeError(f"{owner}: inputs must be a batch of shape (B, C, H, W), but got {_describe(inputs)}.")
        if inputs.shape[0] != len(target):
            raise ValueError(f"{owner}: inputs have {inputs.shape[0]} rows but labels have {len(target)}.")
        self._captured: dict[str, Any] = {}
        mixed, soft = parent_forward(inputs, target.labels)
        params = self._captured
        batch = inputs.shape[0]
        lam = float(params["lam_adjusted"] if "lam_adjusted" in params else params["lam"])
        perm = torch.arange(batch).roll(1)
        mask = torch.full((batch,), lam < 1.0 and batch > 1, dtype=torch.bool)
        region = None
        if "box" in params:
            region = torch.as_tensor(params["box"]).flatten().long()[[1, 0, 3, 2]].expand(batch, 4).clone()
        self.last_params = MixParams(perm, torch.where(mask, lam, 1.0), mask, region)
        names = tuple(target.op_names or ())
        op_id = names.index(self.op_name) if self.op_name in names else len(names)
        names = names if op_id < len(names) else names + (self.op_name,)
        device = target.labels.device
        m = mask.to(device)
        index = target.index if target.index is not None else torch.arange(batch, device=device)
        op = target.op if target.op is not None else torch.full((batch,), -1, dtype=torch.long, device=device)
        if not bool(mask.any()):
            mixed, soft = inputs, target.soft_labels(soft.shape[1], soft.dtype)
        return mixed, SaflexTarget(soft, target.is_augmented | m, index, torch.where(m, op_id, op), names)


class TaggedMixUp(_TaggedMixMixin, v2.MixUp):
    """``v2.MixUp`` that returns ``(inputs, SaflexTarget)``; ``last_params`` holds the recovered per-row ``lam``.

    Same arguments as ``v2.MixUp`` (``alpha``, ``num_classes``, ``labels_getter``) plus ``op_name``. One ``lam``
    per call, every row mixed with ``roll(1, 0)``: row ``i`` is ``lam * x_i + (1 - lam) * x_{i-1}``.

    Example:
        >>> mix = TaggedMixUp(num_classes=3)
        >>> x, target = mix(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
        >>> target.labels.shape, target.op_names, mix.last_params.lam.shape
        (torch.Size([4, 3]), ('mixup',), torch.Size([4]))
    """

    _default_op_name = "mixup"


class TaggedCutMix(_TaggedMixMixin, v2.CutMix):
    """``v2.CutMix`` that returns ``(inputs, SaflexTarget)``; ``lam = 1 - box_area / (H * W)`` is recovered.

    ``last_params.region`` holds the box ``(y1, x1, y2, x2)`` pasted from row ``i - 1`` into row ``i``.

    Example:
        >>> mix = TaggedCutMix(num_classes=3)
        >>> x, target = mix(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
        >>> target.labels.shape
        torch.Size([4, 3])
    """

    _default_op_name = "cutmix"
