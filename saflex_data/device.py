"""The GPU path: apply any batch augmentation on the device, after the loader, and return tags.

::

    aug = DeviceAugment(my_batch_fn, mode="subset", p=0.5)
    for x, y in loader:
        x, target = aug(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))
        loss = criterion(model(x), target)

``fn`` is either a plain batch callable ``inputs -> inputs`` (every row it is given counts as augmented) or a
*tagged* batch op with ``forward_tagged(inputs, target) -> (inputs, SaflexTarget)`` that reports per row what it
did (the kornia adapter, :class:`saflex_data.mixing.MixUp`, ...). ``mode`` says which rows ``fn`` sees:

* ``"all"``: the whole batch (the op's own per-sample probability decides, e.g. kornia ``p``);
* ``"subset"``: a random subset, each row with probability ``p`` (for ops that augment the whole batch, like
  kornia's RandAugment/TrivialAugment/AutoAugment or a batched torchvision RandAugment);
* ``"copy"``: a copy of the batch, returned as ``[clean; augmented]`` (twice the rows).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._describe import describe as _describe
from .batch import SaflexTarget

__all__ = ["DeviceAugment", "as_target"]

Mode = Literal["all", "subset", "copy"]


def as_target(labels: Tensor | SaflexTarget, owner: str = "DeviceAugment") -> SaflexTarget:
    """Wrap plain labels `(B,)` (int) or `(B, K)` (float) as an all-clean :class:`SaflexTarget`."""
    if isinstance(labels, SaflexTarget):
        return labels
    if not isinstance(labels, Tensor) or labels.dim() not in (1, 2):
        raise TypeError(
            f"{owner}: labels must be class indices (B,), probabilities (B, K) or a SaflexTarget, but got "
            f"{_describe(labels)}."
        )
    if labels.dim() == 1 and labels.is_floating_point():
        raise TypeError(f"{owner}: labels of shape (B,) must be int class indices, but got dtype {labels.dtype}.")
    if labels.dim() == 2 and not labels.is_floating_point():
        raise TypeError(f"{owner}: labels of shape (B, K) must be float probabilities, but got dtype {labels.dtype}.")
    batch, device = labels.shape[0], labels.device
    return SaflexTarget(
        labels,
        torch.zeros(batch, dtype=torch.bool, device=device),
        torch.arange(batch, device=device),
        torch.full((batch,), -1, dtype=torch.long, device=device),
        (),
    )


class DeviceAugment(nn.Module):
    """Apply a batch augmentation on the device to all rows, a random subset, or a clean copy; return tags.

    Args:
        fn: A batch callable ``inputs -> inputs`` or a tagged op with ``forward_tagged(inputs, target)``.
        mode: ``"all"``, ``"subset"`` or ``"copy"`` (see the module docstring).
        p: Probability that a row is augmented in ``"subset"`` mode.
        op_name: Name of a plain ``fn`` in ``op_names`` (default: its class or function name).
        generator: Optional CPU ``torch.Generator`` for the subset draw.

    Raises:
        ValueError: If ``fn`` returns a different number of rows (or, in ``"subset"`` mode, a different shape or
            dtype), naming ``fn`` and what came back.

    Example:
        >>> aug = DeviceAugment(lambda x: x.flip(-1), mode="copy", op_name="flip")
        >>> x, target = aug(torch.rand(2, 3), torch.tensor([0, 1]))
        >>> x.shape, target.is_augmented.tolist(), target.op_names
        (torch.Size([4, 3]), [False, False, True, True], ('flip',))
    """

    def __init__(
        self,
        fn: Any,
        *,
        mode: Mode = "subset",
        p: float = 0.5,
        op_name: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"DeviceAugment: fn must be callable, but got {type(fn).__name__}.")
        if mode not in ("all", "subset", "copy"):
            raise ValueError(f"DeviceAugment: mode must be 'all', 'subset' or 'copy', but got {mode!r}.")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"DeviceAugment: p must be a probability in [0, 1], but got {p!r}.")
        self.fn = fn  # an nn.Module fn is registered as a submodule, so .to(device) reaches it
        self.mode = mode
        self.p = float(p)
        self.generator = generator
        self.tagged = callable(getattr(fn, "forward_tagged", None))
        if self.tagged:
            self.fn_op_names: tuple[str, ...] = tuple(getattr(fn, "op_names", ()) or ())
        else:
            self.fn_op_names = (op_name or getattr(fn, "__name__", None) or type(fn).__name__,)
        self.name = f"DeviceAugment(fn={getattr(fn, '__name__', None) or type(fn).__name__})"

    @property
    def op_names(self) -> tuple[str, ...]:
        return self.fn_op_names

    def forward(
        self, inputs: Tensor, labels: Tensor | SaflexTarget, rows: Tensor | None = None
    ) -> tuple[Tensor, SaflexTarget]:
        """Augment and tag a batch.

        Args:
            inputs: Batch of shape `(B, ...)` on any device.
            labels: Class indices `(B,)`, probabilities `(B, K)` or a :class:`SaflexTarget` (its tags are kept).
            rows: Optional chosen subset for ``mode="subset"``: a bool mask `(B,)` or row indices; replaces the
                random draw with probability ``p``.

        Returns:
            ``(inputs, target)``; ``2B`` rows ``[clean; augmented]`` in ``"copy"`` mode.
        """
        if not isinstance(inputs, Tensor) or inputs.dim() < 1:
            raise TypeError(f"{self.name}: inputs must be a batched tensor, but got {_describe(inputs)}.")
        target = as_target(labels, self.name)
        if len(target) != inputs.shape[0]:
            raise ValueError(f"{self.name}: inputs have {inputs.shape[0]} rows but labels have {len(target)}.")
        target = _with_names(target, self.fn_op_names)
        if rows is not None and self.mode != "subset":
            raise ValueError(f"{self.name}: rows applies to mode='subset' only, but mode is {self.mode!r}.")
        if self.mode == "all":
            return self._augment_rows(inputs, target, same_shape=False)
        if self.mode == "copy":
            x_aug, t_aug = self._augment_rows(inputs, target, same_shape=False)
            if x_aug.shape[1:] != inputs.shape[1:] or x_aug.dtype != inputs.dtype:
                raise ValueError(
                    f"{self.name}: fn returned shape {tuple(x_aug.shape)} and dtype {x_aug.dtype} for inputs of "
                    f"shape {tuple(inputs.shape)} and dtype {inputs.dtype}; mode='copy' needs the same per-row shape."
                )
            return torch.cat([inputs, x_aug]), SaflexTarget.cat(_common_labels([target, t_aug]))
        if rows is None:
            chosen = torch.rand(inputs.shape[0], generator=self.generator) < self.p
            rows = chosen.nonzero().flatten()
        elif not isinstance(rows, Tensor) or rows.dim() != 1 or rows.is_floating_point():
            raise TypeError(
                f"{self.name}: rows must be a bool mask or int indices of shape (R,), but got {_describe(rows)}."
            )
        elif rows.dtype == torch.bool:
            if rows.shape[0] != inputs.shape[0]:
                raise ValueError(f"{self.name}: the rows mask has {rows.shape[0]} entries for {inputs.shape[0]} rows.")
            rows = rows.nonzero().flatten()
        rows = rows.to(inputs.device)
        if rows.numel() == 0:
            return inputs, target
        x_sub, t_sub = self._augment_rows(inputs[rows], target[rows], same_shape=True)
        out = inputs.clone()
        out[rows] = x_sub
        return out, _scatter(target, rows, t_sub)

    def _augment_rows(self, inputs: Tensor, target: SaflexTarget, *, same_shape: bool) -> tuple[Tensor, SaflexTarget]:
        if self.tagged:
            result = self.fn.forward_tagged(inputs, target)
            if not (isinstance(result, (tuple, list)) and len(result) == 2):
                raise TypeError(
                    f"{self.name}: forward_tagged must return (inputs, SaflexTarget), but got {_describe(result)}."
                )
            out, new_target = result
        else:
            out = self.fn(inputs)
            new_target = None
        if not isinstance(out, Tensor):
            raise TypeError(f"{self.name}: fn must return a tensor, but returned {_describe(out)}.")
        if out.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"{self.name}: fn returned a batch of {out.shape[0]} rows (shape {tuple(out.shape)}) for an input "
                f"batch of {inputs.shape[0]} rows; it must return one row per input row."
            )
        if same_shape and (out.shape != inputs.shape or out.dtype != inputs.dtype):
            raise ValueError(
                f"{self.name}: fn returned shape {tuple(out.shape)} and dtype {out.dtype} for inputs of shape "
                f"{tuple(inputs.shape)} and dtype {inputs.dtype}; mode='subset' writes the rows back, so they must "
                "match."
            )
        if new_target is None:
            op_id = target.op_names.index(self.fn_op_names[0]) if target.op_names else 0
            new_target = SaflexTarget(
                target.labels,
                torch.ones_like(target.is_augmented),
                target.index,
                torch.full_like(target.op, op_id) if target.op is not None else None,
                target.op_names,
            )
        elif not isinstance(new_target, SaflexTarget) or len(new_target) != inputs.shape[0]:
            raise ValueError(
                f"{self.name}: forward_tagged returned target {_describe(new_target)} for {inputs.shape[0]} rows."
            )
        return out, new_target


def _with_names(target: SaflexTarget, names: tuple[str, ...]) -> SaflexTarget:
    """Append ``names`` to the target's op names (ids of existing ops are kept) and fill in index/op."""
    base = tuple(target.op_names or ())
    merged = base + tuple(n for n in names if n not in base)
    batch, device = len(target), target.labels.device
    index = target.index if target.index is not None else torch.arange(batch, device=device)
    op = target.op if target.op is not None else torch.full((batch,), -1, dtype=torch.long, device=device)
    return SaflexTarget(target.labels, target.is_augmented, index, op, merged)


def _common_labels(targets: list[SaflexTarget]) -> list[SaflexTarget]:
    """Make label kinds agree (hard + soft -> soft) so targets can be concatenated or scattered."""
    soft = [t.labels.shape[1] for t in targets if t.labels.dim() == 2]
    if not soft or all(t.labels.dim() == 2 for t in targets):
        return targets
    k = max(soft)
    return [
        t if t.labels.dim() == 2 else SaflexTarget(t.soft_labels(k), t.is_augmented, t.index, t.op, t.op_names)
        for t in targets
    ]


def _scatter(full: SaflexTarget, rows: Tensor, sub: SaflexTarget) -> SaflexTarget:
    full, sub = _common_labels([full, sub])
    labels = full.labels.clone()
    labels[rows] = sub.labels.to(labels.dtype)
    is_aug = full.is_augmented.clone()
    is_aug[rows] = sub.is_augmented
    index = full.index
    if index is not None and sub.index is not None:
        index = index.clone()
        index[rows] = sub.index
    op = full.op
    if op is not None and sub.op is not None:
        op = op.clone()
        op[rows] = sub.op
    return SaflexTarget(labels, is_aug, index, op, sub.op_names or full.op_names)
