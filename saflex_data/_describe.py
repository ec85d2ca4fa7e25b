"""How error messages describe what came where something else was expected."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["describe"]


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

