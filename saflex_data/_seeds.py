"""Seeds for the collate, the sampler and the mixing ops: stable hashes, draws from a generator, a seeded block."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch

__all__ = ["MASK63", "mix_seed", "draw_seed", "seeded"]

_MASK64 = (1 << 64) - 1
MASK63 = (1 << 63) - 1


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
    return h & MASK63


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

