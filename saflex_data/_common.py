"""What the package's modules share (private): input descriptions, label helpers, model unwrapping, hooks that hold
their owner weakly, the random-state guard, and the per-step report both SAFLEX losses keep."""

from __future__ import annotations

import contextlib
import functools
import inspect
import random
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# Constructor arguments removed in 0.2, and what replaced each (one line of CHANGELOG.md, 0.2.0, per entry).
_RULE_SETTINGS = ("beta", "tau", "normalize")
_REMOVED_IN_0_2 = {
    "precondition": "the Adam-preconditioned tangent measured worse (weight AUROC 0.82 vs 0.90, accuracy -0.13 "
    "points) and was removed; the plain validation gradient is used",
    "val_mode": "the validation pass always runs in eval mode (train-mode BatchNorm there measured worse: AUROC 0.77, "
    "accuracy -0.36 points)",
    "val_batches": "pass a validation loader with a larger batch (the same mean gradient for equal-size batches) or "
    "use val_ema=0.9",
}


def rejects_removed_arguments(rule: str = "margin") -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate an ``__init__`` so that the arguments 0.2 removed raise a ``TypeError`` naming what replaced each.

    The signature stays the decorated one (``functools.wraps``); a keyword the signature lacks that is not a removed
    argument gets Python's own message. ``rule`` is the rule named in the replacement (the loss's default).

    Example:
        >>> class Loss:
        ...     @rejects_removed_arguments()
        ...     def __init__(self, *, rule="margin"):
        ...         self.rule = rule
        >>> Loss(beta=2.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: Loss(beta=2.0) was removed in 0.2: ... rule=Rule("margin", beta=2.0) (from saflex_data import Rule).
    """

    def decorate(init: Callable[..., None]) -> Callable[..., None]:
        accepted = set(inspect.signature(init).parameters)

        @functools.wraps(init)
        def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
            unknown = {k: v for k, v in kwargs.items() if k not in accepted}
            if unknown:
                _reject(type(self).__name__, unknown, rule)
            init(self, *args, **kwargs)

        return checked_init

    return decorate


def _reject(owner: str, unknown: dict[str, Any], rule: str) -> None:
    settings = {k: unknown[k] for k in _RULE_SETTINGS if k in unknown}
    if settings:
        given = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        rule = "paper" if {"tau", "normalize"} & set(settings) else rule  # only the paper-style rules use them
        raise TypeError(
            f"{owner}({given}) was removed in 0.2: a rule and its settings are one value, "
            f'rule=Rule("{rule}", {given}) (from saflex_data import Rule).'
        )
    for name, replacement in _REMOVED_IN_0_2.items():
        if name in unknown:
            raise TypeError(f"{owner}({name}=...) was removed in 0.2: {replacement}. See CHANGELOG.md, 0.2.0.")
    raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {next(iter(unknown))!r}")


_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def mix_seed(*values: int) -> int:
    """Hash integers into one non-negative 63-bit seed (splitmix64 finalizer), stable across processes.

    Example:
        >>> mix_seed(1, 2) == mix_seed(1, 2) != mix_seed(2, 1)
        True
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h & _MASK63


def draw_seed(generator: torch.Generator) -> int:
    """Draw a 62-bit seed from ``generator``."""
    return int(torch.randint(0, 1 << 62, (), generator=generator))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the CPU torch RNG and Python's ``random`` seeded, restoring both afterwards.

    Upstream transforms (torchvision v1/v2, user callables) draw from these global states; seeding them per call
    from the collate's own generator makes the result independent of whatever else used the global state.
    Only the CPU generator is touched, so a CUDA RNG in the main process is never changed.
    """
    with torch.random.fork_rng(devices=[]):
        py_state = random.getstate()
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


def describe(value: Any) -> str:
    """A short description of a value for error messages: what came, where something else was expected."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if type(value).__module__ == "numpy" and hasattr(value, "shape"):
        return f"a numpy array of shape {value.shape} and dtype {value.dtype}"
    if type(value).__name__ == "SaflexTarget":
        return repr(value)
    text = f"an object of type {type(value).__name__}"
    if isinstance(value, (tuple, list)):
        return f"{text} of length {len(value)}"
    if isinstance(value, (str, int, float)):
        return f"{text} ({repr(value)[:60]})"
    return text


def as_probabilities(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32, copy: bool = False) -> Tensor:
    """Class indices `(B,)` (any integer dtype) as one-hot rows, or probabilities `(B, K)` in ``dtype`` (``copy``:
    never the caller's own tensor)."""
    if labels.dim() == 2:
        return labels.to(dtype, copy=copy)
    return F.one_hot(labels.long(), num_classes).to(dtype)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The raw module behind ``DistributedDataParallel``/``DataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------------------------------------------
# Hooks that neither keep their owner alive nor travel with the model
# ---------------------------------------------------------------------------------------------------------------
_internal = threading.local()


@contextlib.contextmanager
def internal_pass() -> Iterator[None]:
    """Mark SAFLEX's own forwards (validation, tangent passes): every SAFLEX hook ignores them."""
    depth = getattr(_internal, "depth", 0)
    _internal.depth = depth + 1
    try:
        yield
    finally:
        _internal.depth = depth


def in_internal_pass() -> bool:
    return getattr(_internal, "depth", 0) > 0


def _disarmed(*args: Any, **kwargs: Any) -> None:
    """What a copied or unpickled model keeps of a SAFLEX hook: nothing that runs, nothing of the loss."""
    return None


def _disarmed_hook() -> Callable[..., None]:
    return _disarmed


class WeakHook:
    """A forward (pre-)hook that calls ``owner.<method>(module, *args)`` while the owner is alive.

    The model holds the hook, the hook holds its owner (the loss) and the module only weakly: deleting the loss frees
    it and its validation data, and removes its hooks. ``copy.deepcopy(model)`` (EMA copies) and pickling
    (``torch.save(model)``) see a no-op function instead, so the copy neither carries the loss nor feeds it.
    """

    def __init__(self, owner: Any, method: str, module: nn.Module) -> None:
        self._owner = weakref.ref(owner)
        self._method = method
        self._module = weakref.ref(module)

    def __call__(self, module: nn.Module, *args: Any) -> None:
        owner = self._owner()
        if owner is None or module is not self._module() or in_internal_pass():
            return None
        getattr(owner, self._method)(module, *args)
        return None

    def __reduce__(self) -> tuple[Any, tuple]:
        return _disarmed_hook, ()

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _disarmed


def register_weak_hooks(owner: Any, hooks: list[tuple[nn.Module, str, str]]) -> weakref.finalize:
    """Register ``(module, "pre"|"post", owner method name)`` hooks; returns a finalizer that removes them (called
    on ``finalizer()`` or when ``owner`` is garbage collected)."""
    handles = []
    for module, kind, method in hooks:
        hook = WeakHook(owner, method, module)
        register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
        handles.append(register(hook))
    return weakref.finalize(owner, _remove_all, handles)


def _remove_all(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()


@contextlib.contextmanager
def rng_preserved(device: torch.device) -> Iterator[None]:
    """Leave torch's global random state (CPU, and ``device``'s when it is a CUDA device) as it was."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield


@contextlib.contextmanager
def validation_pass(model: nn.Module, device: torch.device) -> Iterator[None]:
    """SAFLEX's own validation forward: ``model`` in eval mode (every submodule's flag restored one by one
    afterwards, so a frozen submodule stays in eval), ignored by SAFLEX's hooks, outside autocast, and torch's global
    random state left as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with internal_pass(), rng_preserved(device), torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        for module, training in modes:
            module.training = training


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Torch's global random state for a forward on ``device`` (CPU, plus the CUDA generator there)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def same_rng_state(a: tuple[Tensor, Tensor | None], b: tuple[Tensor, Tensor | None]) -> bool:
    return torch.equal(a[0], b[0]) and (a[1] is None or b[1] is None or torch.equal(a[1], b[1]))


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# The per-step report and resumable state of both SAFLEX losses
# ---------------------------------------------------------------------------------------------------------------
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

    def get_extra_state(self) -> dict[str, Any]:
        key, attr = self._state_signal
        return {
            "step": self.step,
            "method": self.method,
            "signal_shapes": self._signal_shapes(),
            "generator": self._generator.get_state(),
            key: getattr(self, attr),
            "nonfinite_steps": self.nonfinite_steps,
            **(self._val.state() if self._val is not None else {}),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        key, attr = self._state_signal
        name = type(self).__name__
        saved = state.get("method", self.method)
        if saved != self.method:
            raise ValueError(
                f"{name}.load_state_dict: the state was saved by method={saved!r}, but this loss uses "
                f"method={self.method!r}; build the loss with the same method to resume."
            )
        shapes, expected = state.get("signal_shapes"), self._signal_shapes()
        if state.get(key) is not None and shapes is not None and dict(shapes) != expected:
            missing = sorted(set(expected) - set(shapes))
            extra = sorted(set(shapes) - set(expected))
            changed = sorted(n for n in set(shapes) & set(expected) if tuple(shapes[n]) != tuple(expected[n]))
            raise ValueError(
                f"{name}.load_state_dict: the saved validation signal does not fit this model (missing: "
                f"{missing[:5]}, unexpected: {extra[:5]}, other shape: "
                f"{[(n, tuple(shapes[n]), expected[n]) for n in changed[:5]]}); the state was saved with another "
                "model or another set of trainable parameters."
            )
        self.step = int(state["step"])
        self._generator.set_state(state["generator"])
        setattr(self, attr, state.get(key))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        if self._val is not None:
            self._val.load_state(state)  # a fresh iterator, fast-forwarded to where the saved run was
