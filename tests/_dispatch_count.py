"""Count what a block of code asks of torch: every aten op, and the ones that make the host wait for the device.

``with DispatchCount() as count: ...`` records each aten op that reaches the dispatcher (after autograd, so an op
of the backward counts as well) and each host synchronisation: an op whose result the host must read
(``aten._local_scalar_dense``: every ``.item()``, ``bool(tensor)``, ``int(tensor)``, ``float(tensor)``), an op whose
output shape depends on the data (``aten.nonzero``, ``masked_select``, ``unique``, ...), and the ``Tensor`` methods
that copy to the host without an op (``tolist``, ``numpy``), seen through a ``TorchFunctionMode``. On a CPU tensor
none of these waits, but on a GPU each one stalls the host until the queued kernels have run; counting them on the
CPU is how CI, which has no GPU, keeps the training step free of them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.equal", "aten.is_nonzero",
    "aten.unique_dim", "aten._unique", "aten._unique2", "aten.unique_consecutive", "aten.repeat_interleave",
    "aten.bincount", "aten.histc", "aten.allclose",
})  # fmt: skip
SYNC_METHODS = frozenset({"tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__"})


class _Ops(TorchDispatchMode):
    def __init__(self, owner: DispatchCount) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func.overloadpacket)  # e.g. "aten.add"
        self.owner.ops[name] += 1
        if name in SYNC_OPS:
            self.owner.syncs.append(name)
        return func(*args, **(kwargs or {}))


class _Methods(TorchFunctionMode):
    def __init__(self, owner: DispatchCount) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in ("tolist", "numpy"):  # no aten op behind them
            self.owner.syncs.append(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


class DispatchCount:
    """Context manager: ``ops`` (a ``Counter`` of aten op names) and ``syncs`` (the host synchronisations, in
    order) of the code it wraps."""

    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()
        self.syncs: list[str] = []
        self._modes = (_Methods(self), _Ops(self))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __enter__(self) -> DispatchCount:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def count(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, DispatchCount]:
    """``fn(*args, **kwargs)`` and its :class:`DispatchCount`."""
    with DispatchCount() as counted:
        out = fn(*args, **kwargs)
    return out, counted


__all__ = ["DispatchCount", "count", "SYNC_OPS", "torch"]
