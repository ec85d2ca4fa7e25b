"""SAFLEX under ``torch.distributed`` (DDP, ``torchrun``): the collectives :class:`saflex_data.SaflexLoss` runs.

Under ``DistributedDataParallel`` each rank holds a shard of the batch and draws its own validation minibatch. With
``SaflexLoss(..., all_reduce=True)`` (the default) every rank decides exactly as one process would on the
concatenated global batch:

1. **Validation gradient** (every ``val_every`` steps): averaged across ranks with one all-reduce of parameter-sized
   tensors (:func:`all_reduce_mean`). The mean of the ranks' gradients on their ``V``-sample validation batches is
   the gradient on the concatenated ``world_size * V`` batch.
2. **Weights and soft labels** (every step): the rows' ``Π``, upstream labels and augmented flags are all-gathered
   (:func:`gather_rows`), every rank solves the same global problem with the same Gumbel noise (the loss's
   generator is seeded identically on every rank and advances identically), then keeps its own rows. So
   ``normalize="batch_max"``, ``rule="centered"`` and the noise see the global batch, and ``SaflexLoss.stats``
   describes the global batch and is identical on every rank.
3. **Settings** (once, on the first training call): compared across ranks with ``all_gather_object``
   (:func:`check_consistent`); a mismatch raises the same ``ValueError`` on every rank instead of a hang in
   collectives of different sizes or counts.

Communication cost per step, for ``P`` trainable parameters, ``K`` classes and ``B`` rows per rank:

* ``method="jvp"`` / ``"single_pass"``: an all-reduce of ``P`` floats every ``val_every`` steps -- as large as DDP's
  own gradient all-reduce, and not overlapped with compute (it runs before the JVP). At ``val_every=1`` it doubles
  the bytes a DDP step moves; ``val_every=k`` divides the extra by ``k``. ``method="last_layer"`` reduces only the
  classifier block, ``K * (D + 1)`` floats.
* Every step: an all-gather of 3 integers per rank (:func:`batch_layout`, the one host read of a distributed step)
  and one of the rows: ``max_rank(B) * 4`` floats per rank with the default rule (each row's own-label gain, ``p[y]``,
  op id and augmented flag: the ``p[y]``-weighted gated rules need no more), ``max_rank(B) * (2K + 2)`` with the
  others (e.g. 256 rows x 1000 classes in float32: 2 MB per rank), small next to the gradient all-reduce.
* ``all_reduce=False`` keeps every decision on its rank (own validation gradient, own normalisation scale, own
  statistics): no collective at all after the one-time settings check.

No collective depends on rank-local data: every rank exchanges its rows every step, and refreshes the validation
gradient every ``val_every`` steps; the JVP methods, which count their augmented rows on the host anyway, skip the
refresh when the *global* batch has none (as one process on the global batch does). A rank
with no augmented sample in its shard, or with a validation loader of another length
(each rank cycles its own), runs the same collectives in the same order as the others, so nothing waits on a
timeout. With the ``nccl`` backend, call ``torch.cuda.set_device(local_rank)`` before the first step (the object
exchange of :func:`check_consistent` uses the current device).

Limits: every rank must run the same number of training steps (``DistributedSampler`` guarantees it; DDP's ``Join``
context for uneven inputs does not shadow SaflexLoss's collectives), and an evaluation call (no grad) runs no
collective, so it may run on one rank only. ``method="single_pass"`` must run its training forward through the DDP
wrapper: see :func:`forward_with_tangent`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import _autodiff

__all__ = [
    "is_distributed",
    "all_reduce_mean",
    "check_consistent",
    "Sync",
    "batch_layout",
    "BatchLayout",
    "gather_rows",
    "GatheredRows",
    "forward_with_tangent",
]

# Elements per all-reduce bucket: bounds the extra memory of flattening (DDP's default bucket is 25 MB).
_BUCKET_NUMEL = 1 << 23


def is_distributed(group: Any = None) -> bool:
    """``True`` when ``torch.distributed`` is initialised with more than one rank (in ``group``)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_mean(tensors: Sequence[Tensor], *, group: Any = None, bucket_numel: int = _BUCKET_NUMEL) -> list[Tensor]:
    """Average tensors across ranks; returns new tensors (the inputs are left alone).

    Tensors are flattened into buckets of at most ``bucket_numel`` elements per dtype and device, so a model's whole
    validation gradient costs ``ceil(P / bucket_numel)`` all-reduces and at most one bucket of extra memory.

    Args:
        tensors: The same list (same shapes, dtypes and order) on every rank.
        group: Process group; the default group if ``None``.
        bucket_numel: Upper bound on the elements of one all-reduce.

    Returns:
        The averaged tensors, in the input order, with the input shapes and dtypes.
    """
    world = dist.get_world_size(group)
    out: list[Tensor | None] = [None] * len(tensors)
    by_kind: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.dtype, t.device), []).append(i)
    for indices in by_kind.values():
        bucket: list[int] = []
        numel = 0
        for i in [*indices, None]:
            if i is not None and (not bucket or numel + tensors[i].numel() <= bucket_numel):
                bucket.append(i)
                numel += tensors[i].numel()
                continue
            flat = torch.cat([tensors[j].reshape(-1) for j in bucket])
            dist.all_reduce(flat, group=group)
            flat /= world
            offset = 0
            for j in bucket:
                out[j] = flat[offset : offset + tensors[j].numel()].view_as(tensors[j])
                offset += tensors[j].numel()
            if i is not None:
                bucket, numel = [i], tensors[i].numel()
    return out  # type: ignore[return-value]


def check_consistent(settings: Mapping[str, Any], *, name: str = "SaflexLoss", group: Any = None) -> None:
    """Raise the same ``ValueError`` on every rank if the ranks' ``settings`` differ.

    One ``all_gather_object``: every rank sends its settings and sees all of them, so every rank takes the same
    decision (raise or go on) and no rank is left waiting in a later collective. Call it at the same point on every
    rank (``SaflexLoss`` does, on its first call).

    Args:
        settings: Picklable, comparable values (numbers, strings, tuples) keyed by setting name.
        name: What the settings belong to, for the message.
        group: Process group; the default group if ``None``.

    Raises:
        ValueError: Naming each differing setting with its value on every rank.
    """
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, dict(settings), group=group)
    keys = sorted({k for s in gathered for k in s}, key=str)
    missing = object()
    diffs = [k for k in keys if any(s.get(k, missing) != gathered[0].get(k, missing) for s in gathered[1:])]
    if diffs:
        lines = "; ".join(
            f"{k}: " + ", ".join(f"rank {r} = {s.get(k, '<missing>')!r}" for r, s in enumerate(gathered)) for k in diffs
        )
        raise ValueError(
            f"{name} settings differ across ranks ({lines}). Every rank must build {name} with the same settings: "
            "the ranks exchange validation gradients and SAFLEX decisions at the same steps."
        )


class BatchLayout(NamedTuple):
    """How the global batch is split across ranks (from :func:`batch_layout`)."""

    rank: int
    batch_sizes: list[int]
    """Rows (clean and augmented) of each rank."""
    num_augmented: list[int]
    """Augmented rows of each rank, where the loss counted them on the host (``-1``: not counted)."""

    @property
    def total_augmented(self) -> int:
        """Augmented rows of the global batch, or ``-1`` when a rank did not count them."""
        return -1 if min(self.num_augmented) < 0 else sum(self.num_augmented)


def batch_layout(
    batch_size: int,
    num_classes: int,
    num_augmented: int = -1,
    *,
    device: torch.device | str = "cpu",
    group: Any = None,
) -> BatchLayout:
    """Exchange the ranks' batch sizes (and augmented counts, ``-1`` when not counted): one all-gather of 3 integers
    per rank (and one host read of them).

    Raises:
        ValueError: If the ranks' numbers of classes differ (raised on every rank).
    """
    counts = torch.tensor([batch_size, num_classes, num_augmented], dtype=torch.long, device=device)
    gathered = [torch.empty_like(counts) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, counts, group=group)
    table = torch.stack(gathered).tolist()
    if len({row[1] for row in table}) > 1:
        raise ValueError(
            "the ranks' logits have different numbers of classes ("
            + ", ".join(f"rank {r}: {row[1]}" for r, row in enumerate(table))
            + "); every rank must train the same model."
        )
    return BatchLayout(dist.get_rank(group), [row[0] for row in table], [row[2] for row in table])


class GatheredRows(NamedTuple):
    """The rows of the global batch, in rank order (from :func:`gather_rows`)."""

    pi: Tensor
    """``Π`` `(N, K)` of every rank's rows."""
    upstream: Tensor | None
    """Their upstream labels as probabilities `(N, K)` (``None``: not exchanged)."""
    mask: Tensor
    """Bool `(N,)`: the augmented rows."""
    logits: Tensor | None
    """Their detached training logits `(N, K)`, when exchanged."""
    op: Tensor | None
    """Their op ids `(N,)` (``-1``: none), or ``None`` when this rank gave none."""
    mine: slice
    """This rank's rows of the ``N``."""


GatheredRows.__new__.__module__ = __name__  # the generated constructor's annotations resolve in this module (API docs)


def gather_rows(
    pi: Tensor,
    upstream: Tensor | None,
    mask: Tensor,
    layout: BatchLayout,
    *,
    logits: Tensor | None = None,
    op: Tensor | None = None,
    group: Any = None,
) -> GatheredRows:
    """All-gather every rank's rows (``Π``, upstream labels, augmented mask, logits, op ids), in rank order.

    Every rank must call it at the same step with the ``layout`` of that step. The loss then applies its rule to the
    rows of the global batch (the same Gumbel noise on every rank, as the generators are seeded alike) and keeps
    ``rows.mine``: a 2-rank run with batch ``b`` decides exactly like one process with the batch
    ``[rank 0's b; rank 1's b]``. With a one-rank ``layout`` nothing is exchanged. Whole batches travel (fixed
    shapes, no count of the augmented rows on the host).

    Cost: one all-gather of ``max_rank(B) * (C + 2)`` floats, ``C`` the columns sent (``2K``: ``Π`` and the labels;
    ``3K`` with logits).

    Args:
        pi: This rank's inner products `(B, K)` (only the augmented rows matter), or any per-row columns `(B, C)`
            (``SaflexLoss`` with a ``p[y]``-weighted gated rule sends only each row's own-label gain and ``p[y]``).
        upstream: The upstream labels as probabilities `(B, K)`, or ``None`` (not exchanged).
        mask: Bool `(B,)`: the augmented rows.
        layout: This step's :func:`batch_layout`.
        logits: Optional detached training logits `(B, K)` (for rules that use them).
        op: Optional op ids `(B,)`, for the per-op statistics.
        group: Process group; the default group if ``None``.
    """
    size = pi.shape[0]
    if size != layout.batch_sizes[layout.rank]:
        raise ValueError(f"pi has {size} rows but the layout gives this rank {layout.batch_sizes[layout.rank]}.")
    sizes = layout.batch_sizes
    offset = sum(sizes[: layout.rank])
    mine = slice(offset, offset + size)
    if len(sizes) == 1:  # one process: nothing to exchange
        return GatheredRows(pi, upstream, mask, logits, op, mine)
    dtype = torch.promote_types(pi.dtype, torch.float32)
    columns = [t for t in (pi, upstream, logits) if t is not None]
    # Row layout: [Π | upstream label | logits (each when given) | op id (1) | augmented (1)], padded to the
    # largest batch.
    widths = [t.shape[1] for t in columns]
    rows = torch.zeros(max(sizes), sum(widths) + 2, dtype=dtype, device=pi.device)
    rows[:size, :-2] = torch.cat([t.to(dtype) for t in columns], 1)
    rows[:size, -2] = -1 if op is None else op.to(device=pi.device, dtype=dtype)
    rows[:size, -1] = mask.to(dtype)
    shards = [torch.empty_like(rows) for _ in range(len(sizes))]
    dist.all_gather(shards, rows, group=group)
    every = torch.cat([shard[:n] for shard, n in zip(shards, sizes, strict=False)])
    parts = iter(every[:, :-2].split(widths, 1))
    return GatheredRows(
        next(parts),
        None if upstream is None else next(parts),
        every[:, -1] > 0,
        None if logits is None else next(parts),
        None if op is None else every[:, -2].long(),
        mine,
    )


class Sync:
    """The collectives of a SAFLEX loss, in one place; each is a no-op in one process or with ``all_reduce=False``.

    A loss calls the same methods in the same order whether it runs in one process or on many ranks: ``check_once``
    on its first training call, ``layout`` then ``gather`` every step, ``reduce`` on every validation refresh.
    """

    def __init__(self, all_reduce: bool, name: str) -> None:
        self.all_reduce = all_reduce
        self.name = name
        self.checked = False

    @property
    def active(self) -> bool:
        """Whether the ranks share the validation gradient and decide on the global batch."""
        return self.all_reduce and is_distributed()

    def check_once(self, settings: Mapping[str, Any] | Callable[[], Mapping[str, Any]]) -> None:
        """On the first call under torch.distributed: the same ``ValueError`` on every rank if settings differ.
        ``settings`` may be a callable, called only then (gathering them costs more than a small step's loss)."""
        if not self.checked and is_distributed():
            check_consistent(settings() if callable(settings) else settings, name=self.name)
            self.checked = True

    def reduce(self, signal: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Average a validation signal (``{parameter name: gradient}``) across ranks."""
        if not self.active:
            return dict(signal)
        return dict(zip(signal, all_reduce_mean(list(signal.values())), strict=False))

    def layout(self, batch_size: int, num_classes: int, num_augmented: int, device: torch.device) -> BatchLayout:
        """This step's :func:`batch_layout` (one rank's own batch when not synced)."""
        if self.active:
            return batch_layout(batch_size, num_classes, num_augmented, device=device)
        return BatchLayout(0, [batch_size], [num_augmented])

    def gather(self, pi: Tensor, upstream: Tensor | None, mask: Tensor, layout: BatchLayout,
               **kwargs: Any) -> GatheredRows:
        """:func:`gather_rows` (exchanging only when synced)."""
        return gather_rows(pi, upstream, mask, layout, **kwargs)


def forward_with_tangent(
    model: torch.nn.Module, inputs: Tensor, val_grad: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """:func:`saflex_data.functional.forward_with_tangent` through a ``DistributedDataParallel`` wrapper.

    ``method="single_pass"`` makes the training forward itself carry the tangent. Under DDP that forward must go
    through the wrapper: DDP arms its gradient all-reduce in ``forward`` (``prepare_for_backward``), so a forward of
    the raw module is followed by a backward whose gradients are silently *not* averaged across ranks. The dual
    parameters are passed to the wrapper under its own names (``module.<name>``); their gradients still reach the
    real parameters and fire DDP's hooks. Any other model is forwarded as is.

    Args:
        model: The model as the training loop calls it (``DistributedDataParallel`` or not).
        inputs: The training batch.
        val_grad: ``{name: gradient}`` keyed by the raw module's parameter names.

    Returns:
        ``(logits, tangent)`` as :func:`saflex_data.functional.forward_with_tangent`.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        val_grad = {f"module.{name}": grad for name, grad in val_grad.items()}
    return _autodiff.forward_with_tangent(model, inputs, val_grad)
