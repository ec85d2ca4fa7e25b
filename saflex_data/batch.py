"""The tagged target that travels with a batch: labels plus which samples are augmented.

Training loops (timm, torchvision references, Lightning) unpack ``(inputs, target)`` and move the target with
``target.to(device, non_blocking=True)``. :class:`SaflexTarget` is a small mutable object that behaves like a
tensor for those calls (``.to``, ``.pin_memory``, ``len``) and carries the per-sample record SAFLEX needs.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._describe import describe as _describe
from ._math import as_probabilities

__all__ = ["SaflexTarget"]


class SaflexTarget:
    """Per-sample labels and augmentation tags of a batch.

    Args:
        labels: Class indices of shape `(B,)` (int) or label distributions of shape `(B, K)` (float, e.g. Mixup).
        is_augmented: Bool tensor of shape `(B,)`; ``True`` marks samples made by an upstream augmentation.
        index: Optional int tensor of shape `(B,)`: index of the source sample in the dataset.
        op: Optional int tensor of shape `(B,)`: id of the upstream op/pipeline that made the sample
            (``-1`` for clean samples). ``op_names[op]`` names it.
        op_names: Optional names of the op ids, used by :class:`saflex_data.SaflexLoss` statistics.

    Example:
        >>> t = SaflexTarget(torch.tensor([3, 1]), torch.tensor([False, True]))
        >>> len(t), t.num_augmented
        (2, 1)
    """

    __slots__ = ("labels", "is_augmented", "index", "op", "op_names")

    def __init__(
        self,
        labels: Tensor,
        is_augmented: Tensor,
        index: Tensor | None = None,
        op: Tensor | None = None,
        op_names: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(labels, Tensor) or labels.dim() not in (1, 2):
            raise TypeError(
                "labels must be a tensor of shape (B,) (class indices) or (B, K) (probabilities), "
                f"but got {_describe(labels)}."
            )
        batch = labels.shape[0]
        if not isinstance(is_augmented, Tensor) or is_augmented.dtype != torch.bool or is_augmented.shape != (batch,):
            raise TypeError(
                f"is_augmented must be a bool tensor of shape ({batch},), but got {_describe(is_augmented)}."
            )
        for name, value in (("index", index), ("op", op)):
            if value is not None and (
                not isinstance(value, Tensor) or value.shape != (batch,) or value.is_floating_point()
            ):
                raise TypeError(
                    f"{name} must be an int tensor of shape ({batch},) or None, but got {_describe(value)}."
                )
        for name, value in (("is_augmented", is_augmented), ("index", index), ("op", op)):
            if value is not None and value.device != labels.device:
                raise ValueError(
                    f"{name} is on {value.device} but labels are on {labels.device}; build the SaflexTarget with "
                    "every tensor on one device (SaflexTarget.to(device) then moves them together)."
                )
        self.labels = labels
        self.is_augmented = is_augmented
        self.index = index
        self.op = op
        self.op_names = tuple(op_names) if op_names is not None else None

    # --- tensor-like protocol used by DataLoader(pin_memory=True), timm's PrefetchLoader and Lightning ---
    def to(self, *args: Any, **kwargs: Any) -> SaflexTarget:
        """Move every tensor, with ``Tensor.to``'s arguments: ``to(device)``, ``to(dtype)``, ``to(device, dtype)``,
        ``to(other_tensor)``, ``non_blocking=``, ``copy=``.

        The device applies to every tensor. A floating dtype (given, or ``other_tensor``'s) applies to soft labels
        only; hard labels, ``is_augmented``, ``index`` and ``op`` keep their dtypes, and a non-floating dtype changes
        nothing (``target.to(images)`` with uint8 images only moves the target).
        """
        copy = bool(kwargs.pop("copy", False))
        try:
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        except (TypeError, RuntimeError) as exc:  # RuntimeError: an unknown device string
            raise TypeError(
                "SaflexTarget.to takes Tensor.to's arguments (a device, a dtype, both, or another tensor; "
                f"non_blocking=, copy=), but got {_describe_args(args, kwargs)}."
            ) from exc

        def move(t: Tensor, cast: bool = False) -> Tensor:
            return t.to(device=device, dtype=dtype if cast else None, non_blocking=non_blocking, copy=copy)

        soft = dtype is not None and dtype.is_floating_point and self.labels.is_floating_point()
        return SaflexTarget(
            move(self.labels, cast=soft),
            move(self.is_augmented),
            None if self.index is None else move(self.index),
            None if self.op is None else move(self.op),
            self.op_names,
        )

    def pin_memory(self, *args: Any, **kwargs: Any) -> SaflexTarget:
        return self._map(lambda t: t.pin_memory(*args, **kwargs))

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, item: Any) -> SaflexTarget:
        """Select samples (a mask, indices or a slice), like indexing a tensor along dim 0.

        An integer (or a 0-d integer tensor) gives a one-sample target: ``target[i]`` is ``target[i:i + 1]``.
        """
        position = _as_position(item)
        if position is not None:
            size = len(self)
            if not -size <= position < size:
                raise IndexError(f"index {position} is out of range for a SaflexTarget of {size} samples.")
            position %= size
            item = slice(position, position + 1)
        return self._map(lambda t: t[item])

    def __repr__(self) -> str:
        kind = "soft" if self.labels.dim() == 2 else "hard"
        return (
            f"SaflexTarget(batch={len(self)}, labels={kind}, augmented={int(self.is_augmented.sum())}, "
            f"device={self.labels.device})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SaflexTarget):
            return NotImplemented
        return all(_tensor_equal(a, b) for a, b in zip(self._tensors(), other._tensors(), strict=False)) and (
            self.op_names == other.op_names
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @property
    def num_augmented(self) -> int:
        return int(self.is_augmented.sum())

    @property
    def is_soft(self) -> bool:
        return self.labels.dim() == 2

    def soft_labels(self, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Labels as a `(B, K)` distribution (one-hot for class indices)."""
        return as_probabilities(self.labels, num_classes, dtype)

    @staticmethod
    def cat(targets: Sequence[SaflexTarget]) -> SaflexTarget:
        """Concatenate targets along the batch (hard labels are kept hard when all are hard)."""
        if not targets:
            raise ValueError("targets must be a non-empty sequence of SaflexTarget.")
        if len({t.labels.dim() for t in targets}) > 1:
            num_classes = max(t.labels.shape[1] for t in targets if t.labels.dim() == 2)
            labels = torch.cat([t.soft_labels(num_classes) for t in targets])
        else:
            labels = torch.cat([t.labels for t in targets])
        names = {t.op_names for t in targets if t.op_names is not None}
        if len(names) > 1:
            raise ValueError(f"cannot concatenate targets with different op_names: {sorted(names)}.")

        def cat_optional(name: str) -> Tensor | None:
            values = [getattr(t, name) for t in targets]
            if any(v is None for v in values):
                return None
            return torch.cat(values)

        return SaflexTarget(
            labels,
            torch.cat([t.is_augmented for t in targets]),
            cat_optional("index"),
            cat_optional("op"),
            names.pop() if names else None,
        )

    def _tensors(self) -> tuple[Tensor | None, ...]:
        return (self.labels, self.is_augmented, self.index, self.op)

    def _map(self, fn: Any) -> SaflexTarget:
        return SaflexTarget(
            fn(self.labels),
            fn(self.is_augmented),
            None if self.index is None else fn(self.index),
            None if self.op is None else fn(self.op),
            self.op_names,
        )


def _tensor_equal(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu()))


def _as_position(item: Any) -> int | None:
    """``item`` as one integer position (a Python/NumPy int or a 0-d integer tensor), else ``None``."""
    if isinstance(item, bool):
        return None
    if isinstance(item, Tensor):
        if item.dim() == 0 and not (item.is_floating_point() or item.is_complex() or item.dtype == torch.bool):
            return int(item)
        return None
    try:
        return operator.index(item)
    except TypeError:
        return None


def _describe_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    parts = [type(a).__name__ if isinstance(a, Tensor) else repr(a) for a in args]
    parts += [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"({', '.join(parts)})"

