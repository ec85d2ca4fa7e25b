"""The per-step report and resumable state both SAFLEX losses keep."""

from __future__ import annotations

import ctypes
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["DeviceFlags", "StepRecord", "StepReport"]


class StepRecord(NamedTuple):
    """What a step decided for the augmented rows of its (global) batch, for the statistics."""

    upstream: Tensor | None
    """Upstream labels as probabilities `(N, K)` of the rows (``None`` with ``soft_labels``)."""
    weights: Tensor
    """Their weights `(N,)`."""
    soft_labels: Tensor | None
    """Their soft labels `(N, K)`; ``None``: the upstream labels (a rule that never relabels)."""
    op: Tensor | None
    """Their upstream op ids `(N,)` (``-1``: none), or ``None``."""
    mask: Tensor
    """Bool `(N,)`: the augmented rows (the statistics describe these)."""
    batch_size: int
    """Rows of the whole batch, clean and augmented (of every rank under torch.distributed)."""


StepRecord.__new__.__module__ = __name__  # the generated constructor's annotations resolve in this module (API docs)


class DeviceFlags:
    """Booleans computed on the device that the host reads once they are ready, without waiting for the device.

    ``push(flag)`` queues a 0-dim bool tensor: on a CUDA device it is copied into pinned host memory by a
    non-blocking copy, followed by an event; ``poll()`` counts the queued flags that were set among those whose
    event has completed (``poll(wait=True)``: all of them, waiting). The host reads the flag's memory directly: a
    CPU tensor's memory is host memory, so this is no device synchronisation (and no aten op). Other devices read
    the flag at ``poll``.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Tensor, Any]] = []

    def push(self, flag: Tensor) -> None:
        event = None
        if flag.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flag = host
        self._pending.append((flag, event))

    def poll(self, wait: bool = False) -> int:
        count, waiting = 0, []
        for flag, event in self._pending:
            if event is not None and not wait and not event.query():
                waiting.append((flag, event))
                continue
            if event is not None:
                event.synchronize()
            count += _read_bool(flag)
        self._pending = waiting
        return count


def _read_bool(flag: Tensor) -> bool:
    if flag.device.type != "cpu":
        return bool(flag)
    flag = flag.contiguous()
    return bool(ctypes.c_bool.from_address(flag.data_ptr()).value)


class StepReport:
    """What both SAFLEX losses share: the per-step ``stats``, the warn-once non-finite fallback counter and the
    resumable state (``get_extra_state``/``set_extra_state``, with the saved method and validation-signal shapes
    checked at load time).

    The host sets ``_last`` (tensors of the last step), ``step``, ``method``, ``nonfinite_steps``,
    ``_warned_nonfinite``, ``_fallback_keeps`` (what a fallback step keeps, for the warning), ``_generator``,
    ``_val`` (its ``ValidationStream`` or ``None``), ``_state_signal`` (the state key and attribute of its cached
    validation signal) and ``_signal_shapes()`` (the names and shapes a signal of this model has).
    """

    _last: dict[str, Tensor]
    step: int
    method: str
    nonfinite_steps: int
    _warned_nonfinite: bool
    _fallback_keeps: str
    _generator: torch.Generator
    _val: Any
    _state_signal: tuple[str, str]

    def _signal_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    @property
    def stats(self) -> dict[str, float | int]:
        """Statistics of the last step (fractions of its augmented samples, floats) plus two counts (ints): the
        non-finite fallbacks (``"nonfinite_steps"``) and the training steps so far (``"step"``)."""
        out: dict[str, float | int] = {k: float(v) for k, v in self._last.items()}
        out["nonfinite_steps"] = int(self.nonfinite_steps)
        out["step"] = int(self.step)
        return out

    # A copy would have no live hooks on the model (they hold the original weakly), or a copy of the model that is not
    # the one being trained, and would share or re-open the validation loader. Refuse, and say what works instead.
    def _refuse_copy(self, how: str) -> TypeError:
        return TypeError(
            f"{type(self).__name__} cannot be {how}: it works on the model being trained (through forward hooks or "
            "a reference) and cycles a validation loader, which a copy would not have. Build a new loss on the copy's "
            f"model ({type(self).__name__}(model, val_loader, ...)) and carry the state with "
            "new.load_state_dict(old.state_dict())."
        )

    def __copy__(self) -> StepReport:
        raise self._refuse_copy("copied (copy.copy)")

    def __deepcopy__(self, memo: dict) -> StepReport:
        raise self._refuse_copy("copied (copy.deepcopy)")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise self._refuse_copy("pickled (pickle, torch.save)")

    def _nonfinite_fallback(self) -> None:
        self.nonfinite_steps += 1
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: non-finite inner products (NaN/inf in the validation gradient, the logits or "
                f"their tangent); this step keeps {self._fallback_keeps} with weight 1. Counted in "
                "stats['nonfinite_steps'].",
                RuntimeWarning,
                stacklevel=3,
            )

    # The version of the saved state (``state_dict()['_extra_state']['version']``). Bump it when the layout changes
    # and convert older layouts in ``_upgrade_state`` (0.1 saved no version: version 1).
    STATE_VERSION = 2
    _STATE_REQUIRED = ("step", "generator")

    def get_extra_state(self) -> dict[str, Any]:
        key, attr = self._state_signal
        signal = getattr(self, attr)
        return {
            "version": self.STATE_VERSION,
            "step": self.step,
            "method": self.method,
            # The shapes of the cached signal itself (not of the model's parameters now), so that a state saved
            # after a layer was frozen or unfrozen does not pass the check.
            "signal_shapes": _shapes(signal) if isinstance(signal, dict) else self._signal_shapes(),
            "generator": self._generator.get_state(),
            key: getattr(self, attr),
            "nonfinite_steps": self.nonfinite_steps,
            **(self._val.state() if self._val is not None else {}),
        }

    def _upgrade_state(self, state: dict[str, Any], version: int) -> dict[str, Any]:
        """Convert a state of an older ``version`` to the current layout (subclasses extend it)."""
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        key, attr = self._state_signal
        name = type(self).__name__
        if not isinstance(state, dict):
            raise TypeError(f"{name}.load_state_dict: '_extra_state' must be a dict, but got {type(state).__name__}.")
        version = state.get("version", 1)
        if not isinstance(version, int) or version > self.STATE_VERSION:
            raise ValueError(
                f"{name}.load_state_dict: the state has version {version!r}, newer than this saflex_data reads "
                f"(<= {self.STATE_VERSION}); upgrade saflex_data, or build the loss fresh without loading it."
            )
        origin = "saflex_data 0.1 (state version 1)" if version == 1 else f"state version {version}"
        missing = [k for k in self._STATE_REQUIRED if k not in state]
        if missing:
            raise ValueError(
                f"{name}.load_state_dict: the saved state ({origin}) lacks {missing} (it has {sorted(state)}); pass "
                "the whole state_dict() the loss saved, or build the loss fresh without loading it."
            )
        state = self._upgrade_state(dict(state), version)
        signal = state.get(key)
        if signal is not None and not (isinstance(signal, dict) and all(
                isinstance(k, str) and isinstance(v, Tensor) for k, v in signal.items())):
            hint = (f" (a 0.1 method='last_layer' state; this loss uses method={self.method!r}: build it with "
                    "method='last_layer' to resume)" if version == 1 and isinstance(signal, tuple) else "")
            raise ValueError(
                f"{name}.load_state_dict: the saved validation signal ({origin}) is a {type(signal).__name__}, not "
                f"the {{parameter name: tensor}} dict this version uses{hint}; or build the loss fresh without loading "
                "this state (it recomputes the signal on its first step; only the step counter and noise state are "
                "lost)."
            )
        saved = state.get("method", self.method)
        if saved != self.method:
            raise ValueError(
                f"{name}.load_state_dict: the state was saved by method={saved!r}, but this loss uses "
                f"method={self.method!r}; build the loss with the same method to resume."
            )
        expected = self._signal_shapes()
        # The recorded shapes, and the signal's own (a state saved after a layer was frozen must not pass because the
        # model's shapes were recorded).
        recorded = state.get("signal_shapes")
        mismatched = [s for s in (recorded, _shapes(signal) if signal is not None else None)
                      if s is not None and {n: tuple(v) for n, v in dict(s).items()} != expected]
        shapes = mismatched[0] if mismatched else None
        if signal is not None and shapes is not None:
            missing = sorted(set(expected) - set(shapes))
            extra = sorted(set(shapes) - set(expected))
            changed = sorted(n for n in set(shapes) & set(expected) if tuple(shapes[n]) != tuple(expected[n]))
            raise ValueError(
                f"{name}.load_state_dict: the saved validation signal does not fit this model (missing: "
                f"{missing[:5]}, unexpected: {extra[:5]}, other shape: "
                f"{[(n, tuple(shapes[n]), expected[n]) for n in changed[:5]]}); the state ({origin}) was saved with "
                "another model, another set of trainable parameters"
                + (" or another method (0.1 states do not record it)" if version == 1 else "") + "."
            )
        self.step = int(state["step"])
        self._generator.set_state(state["generator"])
        setattr(self, attr, state.get(key))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        if self._val is not None:
            self._val.load_state(state)  # a fresh iterator, fast-forwarded to where the saved run was


def _shapes(signal: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(v.shape) for n, v in signal.items() if isinstance(v, Tensor)}
