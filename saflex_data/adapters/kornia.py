"""kornia adapter: tag GPU batch augmentation from ``forward_parameters`` and ``batch_prob``.

For every kornia op or container, :class:`KorniaTagger` samples ``params = module.forward_parameters(x.shape)``,
ORs the ``batch_prob`` leaves of each (nested) ``ParamItem`` into a per-row mask, and runs
``module(x, params=params)`` (the mask equals the rows whose pixels changed; tested). Rows outside the mask
are copied back from the input, so they are bit-identical to it. Mix ops (``RandomMixUpV2``, ``RandomCutMixV2``)
return kornia's label record ``(B, 3)`` / ``(num_mix, B, 3)`` ``(label, partner_label, lam)``; it becomes soft
labels (see :func:`kornia_record_to_soft`).

kornia's ``RandAugment``/``TrivialAugment``/``AutoAugment`` augment the whole batch (``batch_prob`` all ones); use
``KorniaAugment(policy, mode="subset", p=...)`` to augment a random subset, or ``mode="copy"`` for a clean copy::

    aug = KorniaAugment(K.AugmentationSequential(K.RandomHorizontalFlip(), K.ColorJitter(0.2, 0.2, p=0.5)))
    x, target = aug(x.to(dev), y.to(dev))
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from saflex_data._deps import require
from saflex_data.batch import SaflexTarget
from saflex_data.device import DeviceAugment, Mode, _with_names, as_target

kornia = require("kornia")
import kornia.augmentation as K  # noqa: E402
from kornia.augmentation._2d.mix.base import MixAugmentationBaseV2  # noqa: E402

from saflex_data._common import describe as _describe  # noqa: E402

__all__ = ["KorniaTagger", "KorniaAugment", "kornia_record_to_soft", "batch_prob_mask"]


def batch_prob_mask(params: Any, batch: int, device: torch.device | None = None) -> Tensor:
    """OR of the ``batch_prob`` leaves of kornia parameters (a dict, a ``ParamItem`` or a nested list of them).

    A leaf dict without ``batch_prob`` counts as applied to every row.
    """
    if isinstance(params, dict):
        prob = params.get("batch_prob")
        if prob is None:
            return torch.ones(batch, dtype=torch.bool, device=device)
        return (prob.to(device) > 0.5).reshape(batch)
    if hasattr(params, "data") and hasattr(params, "name"):  # ParamItem
        return batch_prob_mask(params.data, batch, device)
    if isinstance(params, (list, tuple)):
        mask = torch.zeros(batch, dtype=torch.bool, device=device)
        for item in params:
            mask |= batch_prob_mask(item, batch, device)
        return mask
    return torch.ones(batch, dtype=torch.bool, device=device)


def kornia_record_to_soft(record: Tensor, labels: Tensor, num_classes: int, *, partner_weight: str = "lam") -> Tensor:
    """Turn kornia's mix record into soft labels of shape `(B, K)`.

    Args:
        record: ``(B, 3)`` or ``(num_mix, B, 3)`` rows ``(label, partner_label, lam)``.
        labels: Class indices `(B,)` (the row's own labels).
        num_classes: ``K``.
        partner_weight: ``"lam"`` when ``lam`` is the partner's share (``RandomMixUpV2``, ``RandomCutMixV2`` by
            default: the pasted area), ``"one_minus_lam"`` when it is the row's own share
            (``RandomCutMixV2(use_correct_lambda=True)``).

    Returns:
        ``(1 - Σ_k w_k) onehot(y) + Σ_k w_k onehot(y_k)``; exact for one mix, kornia's own approximation when
        several boxes overlap.
    """
    rec = record if record.dim() == 3 else record.unsqueeze(0)
    w = rec[..., 2].float()
    if partner_weight == "one_minus_lam":
        w = 1.0 - w
    elif partner_weight != "lam":
        raise ValueError(f"partner_weight must be 'lam' or 'one_minus_lam', but got {partner_weight!r}.")
    own = torch.nn.functional.one_hot(labels.long(), num_classes).float()
    soft = own * (1.0 - w.sum(0))[:, None]
    for k in range(rec.shape[0]):
        soft = soft + w[k][:, None] * torch.nn.functional.one_hot(rec[k, :, 1].round().long(), num_classes).float()
    return soft


class KorniaTagger(nn.Module):
    """A kornia op or container as a tagged batch op (``forward_tagged(x, target) -> (x, SaflexTarget)``).

    Args:
        module: A kornia augmentation, ``AugmentationSequential``/``ImageSequential``, an auto policy
            (``RandAugment``, ``TrivialAugment``, ``AutoAugment``) or a mix op (``RandomMixUpV2``,
            ``RandomCutMixV2``; not inside a container, which kornia does not support with class labels).
        num_classes: Number of classes; required for mix ops.
    """

    def __init__(self, module: nn.Module, *, num_classes: int | None = None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module) or not hasattr(module, "forward_parameters"):
            raise TypeError(
                f"KorniaTagger: module must be a kornia augmentation with forward_parameters, but got "
                f"{type(module).__name__}."
            )
        self.module = module
        self.num_classes = num_classes
        self.last_params: Any = None
        self.is_mix = isinstance(module, MixAugmentationBaseV2)
        if self.is_mix and num_classes is None:
            raise ValueError(f"KorniaTagger({type(module).__name__}): num_classes is required for kornia mix ops.")
        self.per_child = isinstance(module, K.ImageSequential) and not _is_policy(module)
        if self.per_child:
            self.child_names = [name for name, _ in module.named_children()]
            bases = [re.sub(r"_\d+$", "", n) for n in self.child_names]
            self.op_names: tuple[str, ...] = tuple(
                b if bases.count(b) == 1 else n for b, n in zip(bases, self.child_names, strict=True)
            )
        else:
            self.child_names = []
            self.op_names = (type(module).__name__,)

    def forward(self, inputs: Tensor, labels: Tensor | SaflexTarget) -> tuple[Tensor, SaflexTarget]:
        return self.forward_tagged(inputs, _with_names(as_target(labels, self._owner()), self.op_names))

    def _owner(self) -> str:
        return f"KorniaTagger({type(self.module).__name__})"

    def forward_tagged(self, inputs: Tensor, target: SaflexTarget) -> tuple[Tensor, SaflexTarget]:
        batch, device = inputs.shape[0], inputs.device
        names = tuple(target.op_names or ())
        ids = [names.index(n) if n in names else -1 for n in self.op_names]
        if any(i < 0 for i in ids):
            raise ValueError(f"{self._owner()}: target.op_names {names} lack this op's names {self.op_names}.")
        params = self.module.forward_parameters(inputs.shape)
        self.last_params = params  # for inspection; replay with module(x, params=tagger.last_params)
        op = target.op.clone() if target.op is not None else torch.full((batch,), -1, dtype=torch.long, device=device)
        labels = target.labels
        if self.is_mix:
            if target.labels.dim() != 1:
                raise TypeError(
                    f"{self._owner()}: kornia mix ops need class-index labels of shape (B,), but got labels of shape "
                    f"{tuple(target.labels.shape)}."
                )
            result = self.module(inputs, target.labels, params=params, data_keys=["input", "class"])
            if not isinstance(result, (list, tuple)) or len(result) != 2:
                raise TypeError(
                    f"{self._owner()}: expected [image, labels] from the mix op, got {type(result).__name__}."
                )
            out, record = result
            pairs = params.get("mixup_pairs", params.get("mix_pairs"))
            pairs = pairs.to(device).reshape(-1, batch)
            weight = "one_minus_lam" if getattr(self.module, "use_correct_lambda", False) else "lam"
            rec = record if record.dim() == 3 else record.unsqueeze(0)
            w = rec[..., 2].to(device).float()
            w = 1.0 - w if weight == "one_minus_lam" else w
            moved = ((pairs != torch.arange(batch, device=device)) & (w > 0)).any(0)
            mask = batch_prob_mask(params, batch, device) & moved
            assert self.num_classes is not None
            soft = kornia_record_to_soft(record.to(device), target.labels, self.num_classes, partner_weight=weight)
            own = torch.nn.functional.one_hot(target.labels.long(), self.num_classes).float()
            labels = torch.where(mask[:, None], soft, own)
            op = torch.where(mask, ids[0], op)
        else:
            out = self.module(inputs, params=params)
            if self.per_child:
                mask = torch.zeros(batch, dtype=torch.bool, device=device)
                by_name = {item.name: item for item in params}
                for k in reversed(range(len(self.child_names))):  # the first op that fired names the row
                    item = by_name.get(self.child_names[k])
                    if item is None:
                        continue
                    m = batch_prob_mask(item, batch, device)
                    op = torch.where(m, ids[k], op)
                    mask |= m
            else:
                mask = batch_prob_mask(params, batch, device)
                op = torch.where(mask, ids[0], op)
        if not isinstance(out, Tensor) or out.shape[0] != batch:
            raise ValueError(f"{self._owner()}: kornia returned {_describe(out)} for an input batch of {batch} rows.")
        if out.shape == inputs.shape:
            # Rows no op touched are copied back, so they are bit-identical to the input.
            keep = (~mask).view(-1, *([1] * (inputs.dim() - 1)))
            out = torch.where(keep, inputs.to(out.dtype), out)
        index = target.index if target.index is not None else torch.arange(batch, device=device)
        return out, SaflexTarget(labels, target.is_augmented | mask, index, op, names)


class KorniaAugment(DeviceAugment):
    """:class:`saflex_data.device.DeviceAugment` around a kornia module: ``x, target = aug(x, y)``.

    Args:
        module: kornia op/container/policy/mix op (see :class:`KorniaTagger`).
        mode: ``"all"`` (default; kornia's per-sample ``p`` decides), ``"subset"`` (each row with probability
            ``p``; use it for auto policies, which augment every row they see) or ``"copy"``.
        p: Row probability for ``"subset"``.
        num_classes: Number of classes (mix ops).
        generator: Optional CPU generator for the subset draw.

    Example:
        >>> aug = KorniaAugment(K.RandomHorizontalFlip(p=0.5))
        >>> x, target = aug(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))
        >>> x.shape, target.op_names
        (torch.Size([4, 3, 8, 8]), ('RandomHorizontalFlip',))
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        mode: Mode = "all",
        p: float = 0.5,
        num_classes: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(KorniaTagger(module, num_classes=num_classes), mode=mode, p=p, generator=generator)
        self.name = f"KorniaAugment({type(module).__name__})"


def _is_policy(module: nn.Module) -> bool:
    return any(c.__name__ == "PolicyAugmentBase" for c in type(module).__mro__)
