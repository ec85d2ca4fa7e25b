"""The validation stream both SAFLEX losses draw from: a loader cycled forever, resumable from a state dict."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from .batch import SaflexTarget

# Tried in order when a validation batch is a dict and no val_keys are given (torchvision/timm/HF conventions).
INPUT_KEYS = ("image", "images", "input", "inputs", "pixel_values", "x")
TARGET_KEYS = ("label", "labels", "target", "targets", "y")


class ValidationStream:
    """Cycle ``loader`` forever; yield ``(inputs, targets)`` on a device, after ``prepare``.

    A batch is ``(inputs, targets, *extra)`` or a dict, read through ``keys=(input_key, target_key)`` or, without
    them, the first of the common names in ``INPUT_KEYS`` and ``TARGET_KEYS``. A fresh iterator is started when the
    loader is exhausted; a loader that yields nothing right after a restart (empty, ``drop_last=True`` with fewer
    samples than one batch) raises, and so does a one-shot iterator that has run out. The state
    (batches drawn, the loader's generator state at the start of its current epoch) lets a resumed run fast-forward
    to the same batch: exact for a loader whose order is reproducible (no shuffle, or ``generator=``).
    """

    def __init__(self, loader: Iterable[Any], owner: str, keys: tuple[str, str] | None = None) -> None:
        if keys is not None and not (
            isinstance(keys, (tuple, list)) and len(keys) == 2 and all(isinstance(k, str) for k in keys)
        ):
            raise TypeError(
                f"val_keys must be None or a pair of dict keys (input_key, target_key), but got {keys!r}."
            )
        self.loader = loader
        self.owner = owner
        self.keys = None if keys is None else (keys[0], keys[1])
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
            batch = self._from_dict(batch)
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            got = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            raise TypeError(
                f"val_loader must yield (inputs, targets) pairs, but it yielded {got}; (inputs, targets, *extra) "
                "tuples and dicts (read through val_keys=) work too."
            )
        inputs, targets = batch[0], batch[1]
        if isinstance(targets, SaflexTarget):
            targets = targets.labels
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise TypeError(
                "val_loader must yield tensors (inputs, targets), but got "
                f"({type(inputs).__name__}, {type(targets).__name__})."
            )
        if inputs.dim() == 0 or targets.dim() == 0 or len(inputs) == 0 or len(inputs) != len(targets):
            raise ValueError(
                f"val_loader yielded a batch of {tuple(inputs.shape)} inputs and {tuple(targets.shape)} targets: every "
                "validation batch needs at least one sample and one target per input (an empty batch would give a "
                "zero or undefined validation signal); drop empty batches (e.g. DataLoader(drop_last=True))."
            )
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if prepare is not None:
            inputs = prepare(inputs)
        return inputs, targets

    def _from_dict(self, batch: Mapping[Any, Any]) -> tuple[Any, Any]:
        found = list(batch.keys())
        if self.keys is not None:
            missing = [k for k in self.keys if k not in batch]
            if missing:
                raise ValueError(
                    f"val_loader yielded a dict without the key(s) {missing} named by val_keys={self.keys}; its keys "
                    f"are {found}."
                )
            return batch[self.keys[0]], batch[self.keys[1]]
        input_key = next((k for k in INPUT_KEYS if k in batch), None)
        target_key = next((k for k in TARGET_KEYS if k in batch), None)
        if input_key is None or target_key is None:
            lacking = f"input key among {INPUT_KEYS}" if input_key is None else f"target key among {TARGET_KEYS}"
            raise ValueError(
                f"val_loader yielded a dict with keys {found}, but no {lacking}; name them with "
                f"{self.owner}(..., val_keys=(input_key, target_key))."
            )
        return batch[input_key], batch[target_key]

    @contextlib.contextmanager
    def model_call(self, inputs: Tensor) -> Iterator[None]:
        """Wrap the model's forward on a validation batch: torch's errors name the loader and ``prepare=``.

        A model that took the training batch and fails on a validation batch almost always got inputs of another
        dtype, layout or feature size; the raw torch message names neither the validation loader nor the fix.
        """
        try:
            yield
        except torch.cuda.OutOfMemoryError:  # not the batch's fault
            raise
        except RuntimeError as exc:
            raise RuntimeError(
                f"{self.owner}: the model failed on a validation batch from val_loader (inputs of shape "
                f"{tuple(inputs.shape)}, dtype {inputs.dtype}, on {inputs.device}): {exc}\nThe validation inputs must "
                "look like the training inputs (dtype, feature size, normalisation, memory format): fix val_loader, "
                f"or pass {self.owner}(..., prepare=fn), which is applied to each validation batch after the move "
                "to the model's device."
            ) from exc

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
                if isinstance(self.loader, Iterator) and self.drawn:
                    raise ValueError(
                        f"val_loader is a one-shot iterator ({type(self.loader).__name__}) and it has run out after "
                        f"{self.drawn} batches: {self.owner} draws validation batches for the whole run, so pass "
                        "something it can iterate again (a DataLoader, a list of batches), or itertools.cycle(...) "
                        "around the iterator."
                    ) from None
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
