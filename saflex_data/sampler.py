"""SaflexBatchSampler: decide in the main process which samples are augmented; SaflexDataset applies it.

Follows timm's ``ScheduledBatchSampler``/``ScheduledTransformDataset``: the batch sampler runs in the main
process and yields ``(index, flag)`` pairs, the DataLoader sends them to the workers, and the dataset wrapper
applies the upstream transform where ``flag`` says so. Because every decision is made in the main process from
``torch.Generator().manual_seed(mix_seed(seed, epoch))``:

* schedules (e.g. a warm-up of the augmented fraction, ``p=lambda epoch: min(1.0, epoch / 5)``) take effect even
  with ``persistent_workers=True``;
* batches and tags do not depend on the number of workers: the flag of an augmented sample is a positive
  62-bit integer that also seeds the transform's randomness (``0`` means clean; ``bool(flag)`` is the tag);
* every rank of a distributed job draws the same flags: the same seed, epoch and sampler length give the same
  flag pattern (and batch lengths) on every rank, whatever indices ``DistributedSampler`` hands each rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from ._seeds import mix_seed
from .collate import AugmentPipeline, SaflexCollate, TaggedSample

__all__ = ["SaflexBatchSampler", "SaflexDataset", "split_key"]


class SaflexBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler yielding ``(index, flag)`` pairs; ``flag == 0`` is clean, ``flag > 0`` augment (and seed).

    Two modes, like :class:`saflex_data.collate.SaflexCollate`: in-place (``p``: each sample augmented with
    probability ``p``) or copies (``num_copies``: each sample once clean, then ``num_copies`` augmented copies,
    laid out ``[clean; copy_1; ...]``).

    Args:
        sampler: Sampler (or iterable) of dataset indices, e.g. ``RandomSampler`` or ``DistributedSampler``.
        batch_size: Source samples per batch (a batch has ``batch_size * (keep_clean + num_copies)`` rows in
            copies mode).
        drop_last: Drop the last incomplete batch.
        p: Probability of augmenting a sample in place, or a schedule ``epoch -> p`` (e.g. a warm-up).
        num_copies: Augmented copies per sample (copies mode); exclusive with ``p``.
        keep_clean: In copies mode, also yield the clean sample.
        seed: Seed of the flags; the generator of epoch ``e`` is seeded with ``mix_seed(seed, e)``.

    Example:
        >>> bs = SaflexBatchSampler(range(4), batch_size=2, p=0.5, seed=0)
        >>> [[(i, bool(f)) for i, f in b] for b in bs]
        [[(0, True), (1, False)], [(2, False), (3, True)]]
    """

    def __init__(
        self,
        sampler: Sampler[int] | Iterable[int],
        batch_size: int,
        *,
        drop_last: bool = False,
        p: float | Callable[[int], float] | None = None,
        num_copies: int | None = None,
        keep_clean: bool = True,
        seed: int = 0,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"SaflexBatchSampler: batch_size must be a positive int, but got {batch_size!r}.")
        if p is not None and num_copies is not None:
            raise ValueError(
                f"SaflexBatchSampler: pass either p (in-place mode) or num_copies (copies mode), but got p={p!r} "
                f"and num_copies={num_copies!r}."
            )
        if p is None and num_copies is None:
            p = 0.5
        if num_copies is not None and (not isinstance(num_copies, int) or num_copies < 0):
            raise ValueError(f"SaflexBatchSampler: num_copies must be a non-negative int, but got {num_copies!r}.")
        if num_copies == 0 and not keep_clean:
            raise ValueError("SaflexBatchSampler: num_copies=0 with keep_clean=False would yield no samples.")
        if p is not None and not callable(p):
            _check_p(p)
        if not hasattr(sampler, "__iter__"):
            raise TypeError(f"SaflexBatchSampler: sampler must be iterable, but got {type(sampler).__name__}.")
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.p = p
        self.num_copies = num_copies
        self.keep_clean = keep_clean
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (new flags) and forward it to the wrapped sampler (e.g. ``DistributedSampler``)."""
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def current_p(self) -> float | None:
        """The in-place augmentation probability of the current epoch (``None`` in copies mode)."""
        if self.p is None:
            return None
        return _check_p(
            self.p(self.epoch) if callable(self.p) else self.p, f"p({self.epoch})" if callable(self.p) else "p"
        )

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        p = self.current_p()
        batch: list[int] = []
        for index in self.sampler:
            batch.append(int(index))
            if len(batch) == self.batch_size:
                yield self._tag(batch, generator, p)
                batch = []
        if batch and not self.drop_last:
            yield self._tag(batch, generator, p)

    def _tag(self, batch: list[int], generator: torch.Generator, p: float | None) -> list[tuple[int, int]]:
        n = len(batch)
        if p is not None:
            # Same number of draws per position whatever p is, so ranks and schedules stay aligned.
            coins = torch.rand(n, generator=generator) < p
            seeds = torch.randint(1, 1 << 62, (n,), generator=generator)
            return [(i, int(s) if c else 0) for i, c, s in zip(batch, coins.tolist(), seeds.tolist(), strict=True)]
        copies = self.num_copies or 0
        seeds = torch.randint(1, 1 << 62, (copies, n), generator=generator).tolist()
        out = [(i, 0) for i in batch] if self.keep_clean else []
        for k in range(copies):
            out.extend(zip(batch, seeds[k], strict=True))
        return out

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __repr__(self) -> str:
        mode = f"p={self.p!r}" if self.p is not None else f"num_copies={self.num_copies}, keep_clean={self.keep_clean}"
        return f"SaflexBatchSampler(batch_size={self.batch_size}, {mode}, drop_last={self.drop_last}, seed={self.seed})"


class SaflexDataset(Dataset):
    """Dataset wrapper that applies the upstream transform to the samples a :class:`SaflexBatchSampler` flagged.

    ``dataset[(index, flag)]`` returns a :class:`saflex_data.collate.TaggedSample`: the clean sample
    (``pre -> fixed part -> post``) when ``flag == 0``, else the augmented one with the transform's randomness
    seeded by ``mix_seed(flag, index)``. A plain int index gives the clean sample. Stack the samples with
    :meth:`collate_fn` (a :class:`saflex_data.collate.SaflexCollate` that knows the op names).

    Args:
        dataset: Map-style dataset of ``(input, label)`` items, unchanged.
        transform: Per-sample transform(s), as for :class:`saflex_data.collate.SaflexCollate`.
        pre_transform: Fixed callable applied first to every sample.
        post_transform: Fixed callable applied last to every sample.
        weights: Relative probabilities of the transforms when several are given.

    Example:
        >>> ds = SaflexDataset([(torch.zeros(2), 0)], lambda x: x + 1)
        >>> ds[(0, 7)].op, ds[(0, 0)].op
        (0, -1)
    """

    def __init__(
        self,
        dataset: Any,
        transform: Any | Sequence[Any],
        *,
        pre_transform: Callable[[Any], Any] | None = None,
        post_transform: Callable[[Any], Any] | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.dataset = dataset
        self.pipeline = AugmentPipeline(
            transform,
            pre_transform=pre_transform,
            post_transform=post_transform,
            weights=weights,
            owner="SaflexDataset",
        )
        self.op_names = self.pipeline.op_names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> TaggedSample:
        index, flag = split_key(key, "SaflexDataset")
        item = self.dataset[index]
        x, y = item[0], item[1]
        if not flag:
            return TaggedSample(self.pipeline.clean(x), y, index, -1)
        out, op = self.pipeline.augment(x, torch.Generator().manual_seed(mix_seed(flag, index)))
        return TaggedSample(out, y, index, op)

    def collate_fn(self, **kwargs: Any) -> SaflexCollate:
        """A :class:`SaflexCollate` that stacks this dataset's tagged samples (kwargs: ``output``,
        ``target_format``, ``batch_transform``)."""
        return SaflexCollate(op_names=self.op_names, **kwargs)

    def __repr__(self) -> str:
        return f"SaflexDataset(len={len(self)}, transform={self.pipeline.describe()})"


def split_key(key: Any, owner: str) -> tuple[int, int]:
    """``(index, flag)`` of a dataset key from :class:`SaflexBatchSampler` (an ``(index, augment flag)`` pair, or a
    plain index: flag 0), as ints; a ``TypeError`` naming ``owner`` for anything else."""
    if isinstance(key, (tuple, list)) and len(key) == 2:
        index, flag = key
    else:
        index, flag = key, 0
    try:
        return int(index), int(flag)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: index must be an int or an (index, flag) pair of ints, but got {key!r}.") from None


def _check_p(p: Any, name: str = "p") -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"SaflexBatchSampler: {name} must be a probability in [0, 1], but got {p!r}.")
    return float(p)
