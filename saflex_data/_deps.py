"""Availability probes for optional dependencies and a helpful error when one is missing.

Core modules never import an optional library at import time; adapters call :func:`require` at the top of
their module so that ``import saflex_data.adapters.kornia`` fails with an install hint instead of a bare
``ModuleNotFoundError``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

__all__ = ["is_available", "require"]


@functools.cache
def is_available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it.

    Example:
        >>> is_available("torch"), is_available("surely_not_a_module_name")
        (True, False)
    """
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str | None = None, *, feature: str | None = None) -> ModuleType:
    """Import and return an optional dependency, or raise an error that says how to install it.

    Args:
        module: Importable module name, e.g. ``"kornia"`` or ``"albumentations"``.
        extra: Name of the ``saflex-data`` extra that installs it (defaults to ``module``).
        feature: What needs it, for the message (defaults to ``saflex_data.adapters.<extra>``).

    Returns:
        The imported module.

    Raises:
        ModuleNotFoundError: ``"saflex_data.adapters.kornia needs kornia; install the 'kornia' extra (...)"``.

    Example:
        >>> require("torch").__name__
        'torch'
    """
    extra = extra or module
    feature = feature or f"saflex_data.adapters.{extra}"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        # Only translate the error when the optional package itself is missing, not one of its own imports.
        if err.name is not None and err.name.split(".")[0] != module.split(".")[0]:
            raise
        raise ModuleNotFoundError(
            f"{feature} needs {module}; install the {extra!r} extra (pip install '.[{extra}]' in a clone of "
            f"saflex_data, or pip install 'saflex-data[{extra}]' where it is published) or the package itself"
        ) from err
