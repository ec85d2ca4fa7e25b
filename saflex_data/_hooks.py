"""Forward hooks that neither keep their owner alive nor travel with the model, and the mark of SAFLEX's own passes
(every SAFLEX hook ignores them)."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

__all__ = ["internal_pass", "in_internal_pass", "WeakHook", "register_weak_hooks"]

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
