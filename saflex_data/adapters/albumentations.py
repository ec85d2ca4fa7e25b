"""albumentations adapter: read ``applied_transforms`` to tag each sample; reseed per worker.

``A.Compose(..., save_applied_params=True)`` lists, per call, the transforms that actually fired. A
sample is augmented when any of them lies outside a no-op set of fixed transforms (``Normalize``, ``ToTensorV2``,
deterministic resizes and crops); its op id is the first such transform. The clean sample is the compose's
top-level fixed transforms alone, so a sample tagged clean is bit-identical to it.

albumentations 2.0.8 with ``seed=None`` repeats the same augmentations in every DataLoader worker (verified;
AlbumentationsX #266). :class:`AlbumentationsTransform` reseeds the compose from the collate's generator on every
call, so each sample (and each worker) draws its own augmentation; for transforms used in your own dataset, pass
:class:`AlbumentationsWorkerInit` (or :func:`albumentations_worker_init_fn`) as the DataLoader's
``worker_init_fn``.

The dependency is duck-typed: only ``Compose.__call__``, ``applied_transforms``, ``transforms`` and
``set_random_seed`` are used, never an AlbumentationsX-only API.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import get_worker_info

from saflex_data._common import draw_seed
from saflex_data._deps import require

A = require("albumentations")

__all__ = [
    "AlbumentationsTransform",
    "AlbumentationsWorkerInit",
    "albumentations_worker_init_fn",
    "reseed_albumentations",
    "DEFAULT_NOOP",
]

#: Fixed (deterministic at ``p=1``) transforms that do not count as augmentation.
DEFAULT_NOOP: frozenset[str] = frozenset(
    {
        "ToTensorV2",
        "Normalize",
        "ToFloat",
        "FromFloat",
        "Resize",
        "LongestMaxSize",
        "SmallestMaxSize",
        "PadIfNeeded",
        "CenterCrop",
        "ToRGB",
        "ToGray",
    }
)


def _leaves(transforms: Iterable[Any]) -> Iterator[Any]:
    for t in transforms:
        children = getattr(t, "transforms", None)
        if children is not None and not isinstance(t, type):
            yield from _leaves(children)
        else:
            yield t


class AlbumentationsTransform:
    """Wrap ``A.Compose(..., save_applied_params=True)`` as a :class:`saflex_data.collate.SampleTransform`.

    Args:
        compose: The albumentations pipeline; it must be built with ``save_applied_params=True``.
        noop: Names of transforms that do not count as augmentation (default :data:`DEFAULT_NOOP`). Top-level
            ones make the clean pipeline; they must be deterministic (``p=1``).
        image_key: Keyword of the image in the compose call.
        reseed: Reseed the compose from the collate's generator before every call (default ``True``): the
            same DataLoader seed gives the same batches, and workers never repeat each other.

    Raises:
        ValueError: If ``compose`` was not built with ``save_applied_params=True``.

    Example:
        >>> import numpy as np
        >>> t = AlbumentationsTransform(A.Compose([A.HorizontalFlip(p=1.0)], save_applied_params=True))
        >>> img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
        >>> out, op = t.augment(img, torch.Generator().manual_seed(0))
        >>> t.op_names[op], bool((out == img[:, ::-1]).all())
        ('HorizontalFlip', True)
    """

    def __init__(
        self,
        compose: Any,
        *,
        noop: Iterable[str] = DEFAULT_NOOP,
        image_key: str = "image",
        reseed: bool = True,
    ) -> None:
        if not callable(compose) or not hasattr(compose, "transforms"):
            raise TypeError(
                f"AlbumentationsTransform: compose must be an albumentations Compose, but got {type(compose).__name__}."
            )
        if not getattr(compose, "save_applied_params", False):
            raise ValueError(
                "AlbumentationsTransform: the compose must record what it applied; build it with "
                "A.Compose([...], save_applied_params=True)."
            )
        self.compose = compose
        self.noop = frozenset(noop)
        self.image_key = image_key
        self.reseed = reseed
        names: list[str] = []
        for t in _leaves(compose.transforms):
            name = type(t).__name__
            if name not in self.noop and name not in names:
                names.append(name)
        self.op_names: tuple[str, ...] = tuple(names)
        fixed = [copy.deepcopy(t) for t in compose.transforms if type(t).__name__ in self.noop]
        self._clean = A.Compose(fixed, p=1.0) if fixed else None

    def clean(self, sample: Any) -> Any:
        image = _as_numpy(sample)
        if self._clean is None:
            return image
        return self._clean(**{self.image_key: image})[self.image_key]

    def augment(self, sample: Any, generator: torch.Generator) -> tuple[Any, int]:
        image = _as_numpy(sample)
        if self.reseed:
            self.compose.set_random_seed(draw_seed(generator) % 2**32)
        out = self.compose(**{self.image_key: image})
        applied = out.get("applied_transforms")
        if applied is None:
            raise ValueError(
                "AlbumentationsTransform: the compose returned no 'applied_transforms'; build it with "
                "save_applied_params=True."
            )
        fired = [name for name, _ in applied if name not in self.noop]
        if not fired:
            return out[self.image_key], -1
        return out[self.image_key], self.op_names.index(fired[0]) if fired[0] in self.op_names else 0

    def __repr__(self) -> str:
        return f"AlbumentationsTransform(ops={self.op_names})"


def reseed_albumentations(obj: Any, seed: int, *, depth: int = 4) -> int:
    """Reseed every albumentations compose reachable from ``obj`` (attributes, lists, dicts) up to ``depth``.

    Returns:
        How many composes were reseeded.
    """
    seen: set[int] = set()

    def visit(o: Any, level: int) -> int:
        if id(o) in seen or level < 0 or isinstance(o, (str, bytes, int, float, torch.Tensor)):
            return 0
        seen.add(id(o))
        if hasattr(o, "set_random_seed") and hasattr(o, "transforms"):
            o.set_random_seed(seed)
            return 1
        children: Iterable[Any]
        if isinstance(o, dict):
            children = o.values()
        elif isinstance(o, (list, tuple)):
            children = o
        else:
            children = getattr(o, "__dict__", {}).values()
        return sum(visit(c, level - 1) for c in children)

    return visit(obj, depth)


def albumentations_worker_init_fn(worker_id: int) -> None:
    """``worker_init_fn`` that reseeds every albumentations compose found in the worker's dataset copy.

    The seed is ``torch.initial_seed() % 2**32``, which the DataLoader sets per worker from its ``generator``.
    """
    info = get_worker_info()
    if info is not None:
        reseed_albumentations(info.dataset, torch.initial_seed() % 2**32)


class AlbumentationsWorkerInit:
    """Picklable ``worker_init_fn``: reseed the given composes (and those in the dataset) per worker, then chain.

    Args:
        transforms: albumentations composes to reseed (they travel to the worker with the dataset).
        chain: Optional ``worker_init_fn`` to call afterwards.
    """

    def __init__(self, *transforms: Any, chain: Any | None = None) -> None:
        self.transforms = transforms
        self.chain = chain

    def __call__(self, worker_id: int) -> None:
        seed = torch.initial_seed() % 2**32
        for t in self.transforms:
            t.set_random_seed(seed)
        albumentations_worker_init_fn(worker_id)
        if self.chain is not None:
            self.chain(worker_id)


def _as_numpy(sample: Any) -> Any:
    import numpy as np  # albumentations depends on numpy

    if isinstance(sample, np.ndarray):
        return sample
    if isinstance(sample, torch.Tensor):
        raise TypeError(
            "AlbumentationsTransform: expected a numpy HWC image (or PIL image), but got a tensor of shape "
            f"{tuple(sample.shape)}; albumentations works on numpy arrays."
        )
    try:
        return np.asarray(sample)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise TypeError(f"AlbumentationsTransform: cannot convert {type(sample).__name__} to a numpy image.") from err
