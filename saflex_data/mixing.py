"""Pure-torch batch mixing that tells which rows it mixed and with which weight: MixUp, CutMix, TabularCutMix.

timm's ``Mixup`` and torchvision v2's ``MixUp``/``CutMix`` return only the mixed batch and soft targets, not the
per-row mixing weight ``lam`` nor the partner of each row, so SAFLEX draws the mixing parameters itself. Each op
follows kornia's split between sampling and applying::

    params = mix.forward_parameters(x.shape)        # MixParams(perm, lam, mask, region)
    x, target = mix(x, y, params=params)            # target: SaflexTarget with soft labels and tags

A mixed row ``i`` is ``lam_i * x_i + (1 - lam_i) * x_perm[i]`` (CutMix: a box of ``x_perm[i]`` pasted, with
``lam_i = 1 - box_area / (H * W)``), and its label is ``lam_i * y_i + (1 - lam_i) * y_perm[i]``. Rows that are not
mixed (probability ``1 - p``, paired with themselves, or an empty box) stay bit-identical and untagged.
``MixParams.record(labels)`` gives kornia's ``(B, 3)`` record ``(label, partner_label, lam)`` (here ``lam`` is the
weight of the row's own sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ._describe import describe as _describe
from ._math import as_probabilities
from ._seeds import draw_seed, seeded
from .batch import SaflexTarget

__all__ = ["MixParams", "MixUp", "CutMix", "TabularCutMix"]

Pairing = Literal["random", "roll"]


class MixParams(NamedTuple):
    """Sampled mixing parameters of one batch.

    Attributes:
        perm: Partner row of each row, shape `(B,)`.
        lam: Weight of the row's own sample, shape `(B,)` (``1`` for rows left alone).
        mask: Rows that were mixed, shape `(B,)` bool.
        region: CutMix box ``(y1, x1, y2, x2)`` per row `(B, 4)`; TabularCutMix replaced features `(B, D)` bool;
            ``None`` for MixUp.
    """

    perm: Tensor
    lam: Tensor
    mask: Tensor
    region: Tensor | None = None

    def record(self, labels: Tensor) -> Tensor:
        """kornia-style record of shape `(B, 3)`: ``(label, partner_label, lam)`` for hard labels `(B,)`."""
        if labels.dim() != 1:
            raise ValueError(f"record needs class indices of shape (B,), but got shape {tuple(labels.shape)}.")
        perm = self.perm.to(labels.device)
        return torch.stack([labels.float(), labels[perm].float(), self.lam.to(labels.device).float()], dim=1)


MixParams.__new__.__module__ = __name__  # the generated constructor's annotations resolve in this module (API docs)


class _BatchMix:
    """Shared parameter sampling, label mixing and validation."""

    default_name = "mix"

    def __init__(
        self,
        *,
        p: float,
        num_classes: int | None,
        pairing: Pairing,
        generator: torch.Generator | None,
        op_name: str | None,
    ) -> None:
        name = type(self).__name__
        if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
            raise ValueError(f"{name}: p must be a probability in [0, 1], but got {p!r}.")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"{name}: num_classes must be a positive int or None, but got {num_classes!r}.")
        if pairing not in ("random", "roll"):
            raise ValueError(f"{name}: pairing must be 'random' or 'roll', but got {pairing!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{name}: generator must be a torch.Generator or None, but got {type(generator).__name__}.")
        self.p = float(p)
        self.num_classes = num_classes
        self.pairing = pairing
        self.generator = generator
        self.op_name = op_name or self.default_name
        self.op_names: tuple[str, ...] = (self.op_name,)

    # --- sampling (always on CPU, from ``generator`` or the global torch RNG) -----------------------------------
    def _uniform(self, *shape: int) -> Tensor:
        return torch.rand(shape, generator=self.generator)

    def _pairs(self, batch: int) -> Tensor:
        if self.pairing == "roll":
            return torch.arange(batch).roll(1)
        return torch.randperm(batch, generator=self.generator)

    def _beta(self, alpha: float, batch: int) -> Tensor:
        # torch.distributions takes no generator: draw under a fork of the global RNG seeded from ours.
        if self.generator is None:
            return torch.distributions.Beta(alpha, alpha).sample((batch,))
        with seeded(draw_seed(self.generator)):
            return torch.distributions.Beta(alpha, alpha).sample((batch,))

    def _row_mask(self, batch: int, perm: Tensor) -> Tensor:
        chosen = self._uniform(batch) < self.p if self.p < 1.0 else torch.ones(batch, dtype=torch.bool)
        return chosen & (perm != torch.arange(batch))

    def forward_tagged(self, inputs: Tensor, target: SaflexTarget) -> tuple[Tensor, SaflexTarget]:
        """Tagged batch-op protocol used by :class:`saflex_data.device.DeviceAugment`."""
        return self(inputs, target)  # type: ignore[operator]

    # --- applying --------------------------------------------------------------------------------------------
    def _check(
        self, inputs: Tensor, labels: Tensor | SaflexTarget, min_dim: int, need_classes: bool = True
    ) -> SaflexTarget:
        name = type(self).__name__
        if not isinstance(inputs, Tensor) or inputs.dim() < min_dim:
            raise TypeError(
                f"{name}: inputs must be a tensor with at least {min_dim} dims, but got {_describe(inputs)}."
            )
        batch = inputs.shape[0]
        if isinstance(labels, SaflexTarget):
            target = labels
        elif isinstance(labels, Tensor):
            if labels.dim() == 1 and labels.is_floating_point():
                raise TypeError(
                    f"{name}: labels must be int class indices of shape (B,) or float probabilities of shape (B, K), "
                    f"but got a float tensor of shape {tuple(labels.shape)}."
                )
            target = (
                SaflexTarget(labels, torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device))
                if labels.dim() in (1, 2)
                else None
            )  # type: ignore[assignment]
            if target is None:
                raise TypeError(f"{name}: labels must have shape (B,) or (B, K), but got {_describe(labels)}.")
        else:
            raise TypeError(f"{name}: labels must be a tensor or a SaflexTarget, but got {_describe(labels)}.")
        if target.labels.dim() == 2 and not target.labels.is_floating_point():
            raise TypeError(f"{name}: (B, K) labels must be float probabilities, but got dtype {target.labels.dtype}.")
        if target.labels.dim() == 1 and target.labels.is_floating_point():
            raise TypeError(f"{name}: (B,) labels must be int class indices, but got dtype {target.labels.dtype}.")
        if len(target) != batch:
            raise ValueError(f"{name}: inputs have {batch} rows but labels have {len(target)}.")
        if need_classes and target.labels.dim() == 1 and self.num_classes is None:
            raise ValueError(f"{name}: num_classes is required to mix class-index labels; pass num_classes=K.")
        return target

    def _check_params(self, params: MixParams, batch: int) -> MixParams:
        if not isinstance(params, MixParams) or params.perm.shape != (batch,):
            got = tuple(params.perm.shape) if isinstance(params, MixParams) else type(params).__name__
            raise ValueError(f"{type(self).__name__}: params must be MixParams for a batch of {batch}, but got {got}.")
        return params

    def _mixed_target(self, target: SaflexTarget, params: MixParams, soft_labels: bool = True) -> SaflexTarget:
        device = target.labels.device
        perm, lam, mask = (t.to(device) for t in params[:3])
        names = tuple(target.op_names or ())
        op_id = names.index(self.op_name) if self.op_name in names else len(names)
        if op_id == len(names):
            names = names + (self.op_name,)
        if soft_labels:
            y = as_probabilities(target.labels, self.num_classes, torch.float32)
            lam_col = lam.to(y.dtype)[:, None]
            labels = torch.where(mask[:, None], lam_col * y + (1.0 - lam_col) * y[perm], y)
        else:
            labels = target.labels
        batch = len(target)
        index = target.index if target.index is not None else torch.arange(batch, device=device)
        op = target.op if target.op is not None else torch.full((batch,), -1, dtype=torch.long, device=device)
        return SaflexTarget(
            labels,
            target.is_augmented | mask,
            index,
            torch.where(mask, torch.full_like(op, op_id), op),
            names,
        )


class MixUp(_BatchMix):
    """MixUp (Zhang et al., 2018) with a per-row weight, returning tags.

    Args:
        alpha: ``lam ~ Beta(alpha, alpha)``.
        p: Probability that a row is mixed (per row).
        num_classes: Number of classes; required for class-index labels.
        pairing: ``"random"`` permutation or ``"roll"`` (torchvision's ``roll(1, 0)``).
        same_on_batch: One ``lam`` for the whole batch (torchvision/timm batch mode).
        generator: Optional ``torch.Generator`` for the draws (else the global torch RNG). Leave it ``None`` inside a
            ``SaflexCollate`` (the collate seeds the global RNG per batch and per worker; a generator object would
            be copied into every worker with the same state).
        op_name: Name in ``op_names`` (default ``"mixup"``).

    Example:
        >>> mix = MixUp(alpha=1.0, num_classes=3, generator=torch.Generator().manual_seed(0))
        >>> x, target = mix(torch.rand(4, 2), torch.tensor([0, 1, 2, 0]))
        >>> target.labels.shape, target.op_names
        (torch.Size([4, 3]), ('mixup',))
    """

    default_name = "mixup"

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        p: float = 1.0,
        num_classes: int | None = None,
        pairing: Pairing = "random",
        same_on_batch: bool = False,
        generator: torch.Generator | None = None,
        op_name: str | None = None,
    ) -> None:
        super().__init__(p=p, num_classes=num_classes, pairing=pairing, generator=generator, op_name=op_name)
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"MixUp: alpha must be a positive number, but got {alpha!r}.")
        self.alpha = float(alpha)
        self.same_on_batch = same_on_batch

    def forward_parameters(self, shape: torch.Size | Sequence[int]) -> MixParams:
        """Sample ``MixParams`` for a batch of the given shape (only ``shape[0]`` matters)."""
        batch = int(shape[0])
        perm = self._pairs(batch)
        lam = self._beta(self.alpha, 1 if self.same_on_batch else batch).expand(batch).clone()
        mask = self._row_mask(batch, perm)
        return MixParams(perm, torch.where(mask, lam, torch.ones_like(lam)), mask, None)

    def __call__(
        self, inputs: Tensor, labels: Tensor | SaflexTarget, *, params: MixParams | None = None
    ) -> tuple[Tensor, SaflexTarget]:
        target = self._check(inputs, labels, 2)
        params = self._check_params(params or self.forward_parameters(inputs.shape), inputs.shape[0])
        perm, lam, mask = (t.to(inputs.device) for t in params[:3])
        work = inputs if inputs.is_floating_point() else inputs.float()
        lam_b = lam.to(work.dtype).view(-1, *([1] * (inputs.dim() - 1)))
        mixed = lam_b * work + (1.0 - lam_b) * work[perm]
        if not inputs.is_floating_point():  # uint8 images (timm prefetcher path): round like FastCollateMixup
            mixed = mixed.round_().clamp_(torch.iinfo(inputs.dtype).min, torch.iinfo(inputs.dtype).max)
            mixed = mixed.to(inputs.dtype)
        out = torch.where(mask.view(-1, *([1] * (inputs.dim() - 1))), mixed, inputs)
        return out, self._mixed_target(target, params)

    def __repr__(self) -> str:
        return f"MixUp(alpha={self.alpha}, p={self.p}, num_classes={self.num_classes}, pairing={self.pairing!r})"


class CutMix(_BatchMix):
    """CutMix (Yun et al., 2019) with a per-row box, returning tags; ``lam = 1 - box_area / (H * W)``.

    Args:
        alpha: ``lam ~ Beta(alpha, alpha)`` sets the box size (before clipping at the border).
        p: Probability that a row is mixed (per row).
        num_classes: Number of classes; required for class-index labels.
        pairing: ``"random"`` permutation or ``"roll"``.
        generator: Optional ``torch.Generator`` for the draws (else the global torch RNG; leave it ``None`` inside a
            ``SaflexCollate``, see :class:`MixUp`).
        op_name: Name in ``op_names`` (default ``"cutmix"``).

    Example:
        >>> mix = CutMix(num_classes=2, generator=torch.Generator().manual_seed(0))
        >>> x, target = mix(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))
        >>> bool((target.labels.sum(1) - 1).abs().max() < 1e-6)
        True
    """

    default_name = "cutmix"

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        p: float = 1.0,
        num_classes: int | None = None,
        pairing: Pairing = "random",
        generator: torch.Generator | None = None,
        op_name: str | None = None,
    ) -> None:
        super().__init__(p=p, num_classes=num_classes, pairing=pairing, generator=generator, op_name=op_name)
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"CutMix: alpha must be a positive number, but got {alpha!r}.")
        self.alpha = float(alpha)

    def forward_parameters(self, shape: torch.Size | Sequence[int]) -> MixParams:
        """Sample boxes for inputs of shape `(B, ..., H, W)`."""
        if len(shape) < 3:
            raise ValueError(f"CutMix: inputs must have shape (B, ..., H, W), but got {tuple(shape)}.")
        batch, height, width = int(shape[0]), int(shape[-2]), int(shape[-1])
        perm = self._pairs(batch)
        lam = self._beta(self.alpha, batch)
        ratio = torch.sqrt(1.0 - lam)
        cut_h, cut_w = (height * ratio).long(), (width * ratio).long()
        cy = (self._uniform(batch) * height).long()
        cx = (self._uniform(batch) * width).long()
        y1, y2 = (cy - cut_h // 2).clamp(0, height), (cy + cut_h // 2).clamp(0, height)
        x1, x2 = (cx - cut_w // 2).clamp(0, width), (cx + cut_w // 2).clamp(0, width)
        area = (y2 - y1) * (x2 - x1)
        mask = self._row_mask(batch, perm) & (area > 0)
        lam_adj = torch.where(mask, 1.0 - area.float() / float(height * width), torch.ones(batch))
        box = torch.stack([y1, x1, y2, x2], dim=1)
        box = torch.where(mask[:, None], box, torch.zeros_like(box))
        return MixParams(perm, lam_adj, mask, box)

    def __call__(
        self, inputs: Tensor, labels: Tensor | SaflexTarget, *, params: MixParams | None = None
    ) -> tuple[Tensor, SaflexTarget]:
        target = self._check(inputs, labels, 3)
        params = self._check_params(params or self.forward_parameters(inputs.shape), inputs.shape[0])
        assert params.region is not None
        height, width = inputs.shape[-2:]
        box = params.region.to(inputs.device)
        ys = torch.arange(height, device=inputs.device).view(1, -1, 1)
        xs = torch.arange(width, device=inputs.device).view(1, 1, -1)
        # b = batch; pixel (y, x) of row b is pasted when it lies inside the row's box
        inside = (
            (ys >= box[:, 0, None, None])
            & (ys < box[:, 2, None, None])
            & (xs >= box[:, 1, None, None])
            & (xs < box[:, 3, None, None])
        )
        inside = inside.view(inputs.shape[0], *([1] * (inputs.dim() - 3)), height, width)
        perm = params.perm.to(inputs.device)
        return torch.where(inside, inputs[perm], inputs), self._mixed_target(target, params)

    def __repr__(self) -> str:
        return f"CutMix(alpha={self.alpha}, p={self.p}, num_classes={self.num_classes}, pairing={self.pairing!r})"


class TabularCutMix(_BatchMix):
    """Tabular CutMix (SAINT; SAFLEX Table 2): each feature of a row is replaced, with probability ``p``, by the
    same feature of a random partner row.

    Works on one tensor of shape `(B, D)` holding continuous and categorical columns (codes); categorical columns
    are copied as they are (never averaged) and may use their own probability ``p_categorical``.

    Args:
        p: Probability that a feature of a selected row is replaced.
        row_p: Probability that a row is selected for augmentation.
        categorical: Indices of categorical columns.
        p_categorical: Replacement probability for categorical columns (defaults to ``p``).
        num_classes: Number of classes; required when ``label_mode="soft"`` with class-index labels.
        label_mode: ``"hard"`` keeps the row's label (the upstream in the paper); ``"soft"`` mixes labels with
            ``lam = 1 - replaced_features / D``.
        generator: Optional ``torch.Generator`` for the draws (else the global torch RNG; leave it ``None`` inside a
            ``SaflexCollate``, see :class:`MixUp`).
        op_name: Name in ``op_names`` (default ``"tabular_cutmix"``).

    Example:
        >>> mix = TabularCutMix(p=0.5, categorical=[3], generator=torch.Generator().manual_seed(0))
        >>> x, target = mix(torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1]))
        >>> x.shape, target.labels.dtype
        (torch.Size([6, 4]), torch.int64)
    """

    default_name = "tabular_cutmix"

    def __init__(
        self,
        *,
        p: float = 0.3,
        row_p: float = 1.0,
        categorical: Sequence[int] = (),
        p_categorical: float | None = None,
        num_classes: int | None = None,
        label_mode: Literal["hard", "soft"] = "hard",
        generator: torch.Generator | None = None,
        op_name: str | None = None,
    ) -> None:
        super().__init__(p=row_p, num_classes=num_classes, pairing="random", generator=generator, op_name=op_name)
        for arg, value in (("p", p), ("p_categorical", p_categorical)):
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"TabularCutMix: {arg} must be a probability in [0, 1], but got {value!r}.")
        if label_mode not in ("hard", "soft"):
            raise ValueError(f"TabularCutMix: label_mode must be 'hard' or 'soft', but got {label_mode!r}.")
        cats = [int(c) for c in categorical]
        if len(set(cats)) != len(cats):
            raise ValueError(f"TabularCutMix: categorical has duplicate column indices: {cats}.")
        self.feature_p = float(p)
        self.row_p = float(row_p)
        self.categorical = tuple(cats)
        self.p_categorical = float(p) if p_categorical is None else float(p_categorical)
        self.label_mode = label_mode

    def forward_parameters(self, shape: torch.Size | Sequence[int]) -> MixParams:
        """Sample partners and the replaced-feature mask for inputs of shape `(B, D)`."""
        if len(shape) != 2:
            raise ValueError(f"TabularCutMix: inputs must have shape (B, D), but got {tuple(shape)}.")
        batch, dim = int(shape[0]), int(shape[1])
        bad = [c for c in self.categorical if not -dim <= c < dim]
        if bad:
            raise ValueError(f"TabularCutMix: categorical column indices {bad} are out of range for D={dim}.")
        perm = self._pairs(batch)
        rows = self._row_mask(batch, perm)
        col_p = torch.full((dim,), self.feature_p)
        if self.categorical:
            col_p[list(self.categorical)] = self.p_categorical
        features = (self._uniform(batch, dim) < col_p) & rows[:, None]
        mask = features.any(dim=1)
        lam = 1.0 - features.float().mean(dim=1)
        return MixParams(perm, lam, mask, features)

    def __call__(
        self, inputs: Tensor, labels: Tensor | SaflexTarget, *, params: MixParams | None = None
    ) -> tuple[Tensor, SaflexTarget]:
        if isinstance(inputs, Tensor) and inputs.dim() != 2:
            raise TypeError(f"TabularCutMix: inputs must be a tensor of shape (B, D), but got {_describe(inputs)}.")
        target = self._check(inputs, labels, 2, need_classes=self.label_mode == "soft")
        params = self._check_params(params or self.forward_parameters(inputs.shape), inputs.shape[0])
        assert params.region is not None
        features = params.region.to(inputs.device)
        perm = params.perm.to(inputs.device)
        out = torch.where(features, inputs[perm], inputs)
        return out, self._mixed_target(target, params, soft_labels=self.label_mode == "soft")

    def __repr__(self) -> str:
        return (
            f"TabularCutMix(p={self.feature_p}, row_p={self.row_p}, categorical={list(self.categorical)}, "
            f"label_mode={self.label_mode!r})"
        )
