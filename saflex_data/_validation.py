"""The validation stream both SAFLEX losses draw from: a loader cycled forever, resumable from a state dict."""

from __future__ import annotations

import contextlib

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from .batch import SaflexTarget


class ValidationStream:
    """Cycle ``loader`` forever; yield ``(inputs, targets)`` on a device, after ``prepare``.

    A fresh iterator is started when the loader is exhausted; a loader that yields nothing right after a restart
    (empty, ``drop_last=True`` with fewer samples than one batch, an exhausted one-shot iterator) raises. The state
    (batches drawn, the loader's generator state at the start of its current epoch) lets a resumed run fast-forward
    to the same batch: exact for a loader whose order is reproducible (no shuffle, or ``generator=``).
    """

    def __init__(self, loader: Iterable[Any], owner: str, keys: tuple[str, str] | None = None) -> None:
        self.loader = loader
        self.keys = keys
        self.owner = owner
        self.drawn = 0  # batches drawn so far
        self._iter: Iterator[Any] | None = None
        self._skip = 0
        self._epoch_rng: Tensor | None = None

    def next(self, device: torch.device, prepare: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """The next validation batch as tensors on ``device``; ``SaflexTarget`` labels are unwrapped."""
        batch = self._draw()
        while self._skip > 0:  # fast-forward after load_state
            self._skip -= 1
            batch = self._draw()
        if isinstance(batch, Mapping):
            batch = (batch.get("image", batch.get("inputs")), batch.get("label", batch.get("labels")))
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"val_loader must yield (inputs, targets) pairs, but it yielded {type(batch).__name__}.")
        inputs, targets = batch[0], batch[1]
        if isinstance(targets, SaflexTarget):
            targets = targets.labels
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise TypeError(
                "val_loader must yield tensors (inputs, targets), but got "
                f"({type(inputs).__name__}, {type(targets).__name__})."
            )
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if prepare is not None:
            inputs = prepare(inputs)
        return inputs, targets

    @contextlib.contextmanager
    def model_call(self) -> Iterator[None]:
        """Around the model's validation forward (errors there are explained in terms of the loader)."""
        yield

    def _draw(self) -> Any:
        for _ in range(2):
            if self._iter is None:
                generator = getattr(self.loader, "generator", None)  # to replay this epoch's order on resume
                self._epoch_rng = generator.get_state() if isinstance(generator, torch.Generator) else None
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                continue
            self.drawn += 1
            return batch
        raise ValueError(
            f"val_loader yielded no batches: {self.owner} needs a non-empty validation loader (check its dataset "
            "length, and drop_last=True with a dataset smaller than one batch)."
        )

    def state(self) -> dict[str, Any]:
        return {"val_drawn": self.drawn, "val_rng": self._epoch_rng}

    def load_state(self, state: Mapping[str, Any]) -> None:
        drawn = int(state.get("val_drawn", 0))
        try:
            length = len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            length = 0
        self._iter = None
        rng = state.get("val_rng")
        generator = getattr(self.loader, "generator", None)
        if rng is not None and isinstance(generator, torch.Generator):
            generator.set_state(rng)  # a shuffled DataLoader(generator=...) replays the saved epoch's order
        self._skip = drawn % length if length else 0
        self.drawn = drawn - self._skip
