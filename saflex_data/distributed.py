"""SAFLEX under ``torch.distributed`` (DDP, ``torchrun``): the collectives :class:`saflex_data.SaflexLoss` runs.

Under ``DistributedDataParallel`` each rank holds a shard of the batch and draws its own validation minibatch. With
``SaflexLoss(..., all_reduce=True)`` (the default) every rank decides exactly as one process would on the
concatenated global batch:

1. **Validation gradient** (every ``val_every`` steps): averaged across ranks with one all-reduce of parameter-sized
   tensors (:func:`all_reduce_mean`). The mean of the ranks' gradients on their ``V``-sample validation batches is
   the gradient on the concatenated ``world_size * V`` batch.
2. **Weights and soft labels** (every step): the augmented rows' ``Π`` and upstream labels are all-gathered
   (:func:`global_saflex_targets`), every rank solves the same global problem with the same Gumbel noise (the loss's
   generator is seeded identically on every rank and advances identically), then keeps its own rows. So
   ``normalize="batch_max"``, ``rule="centered"`` and the noise see the global batch, and ``SaflexLoss.stats``
   describes the global batch and is identical on every rank.
3. **Settings** (once, on the first training call): compared across ranks with ``all_gather_object``
   (:func:`check_consistent`); a mismatch raises the same ``ValueError`` on every rank instead of a hang in
   collectives of different sizes or counts.

Communication cost per step, for ``P`` trainable parameters, ``K`` classes and ``B_aug`` augmented rows per rank:

* ``method="jvp"`` / ``"single_pass"``: an all-reduce of ``P`` floats every ``val_every`` steps -- as large as DDP's
  own gradient all-reduce, and not overlapped with compute (it runs before the JVP). At ``val_every=1`` it doubles
  the bytes a DDP step moves; ``val_every=k`` divides the extra by ``k``. ``method="last_layer"`` reduces only the
  classifier block, ``K * (D + 1)`` floats.
* Every step: an all-gather of 3 integers per rank (:func:`batch_layout`) and one of ``max_rank(B_aug) * (2K + 1)``
  floats per rank (e.g. 256 rows x 1000 classes in float32: 2 MB per rank), small next to the gradient all-reduce.
* ``all_reduce=False`` keeps every decision on its rank (own validation gradient, own normalisation scale, own
  statistics): no collective at all after the one-time settings check.

No collective depends on rank-local data: the counts are exchanged first, and then every rank refreshes the
validation gradient and exchanges ``Π`` exactly when the *global* batch has an augmented row (as one process on the
global batch would). A rank with no augmented sample in its shard, or with a validation loader of another length
(each rank cycles its own), runs the same collectives in the same order as the others, so nothing waits on a
timeout. With the ``nccl`` backend, call ``torch.cuda.set_device(local_rank)`` before the first step (the object
exchange of :func:`check_consistent` uses the current device).

Limits: every rank must run the same number of training steps (``DistributedSampler`` guarantees it; DDP's ``Join``
context for uneven inputs does not shadow SaflexLoss's collectives), and an evaluation call (no grad) runs no
collective, so it may run on one rank only. ``method="single_pass"`` must run its training forward through the DDP
wrapper: see :func:`forward_with_tangent`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as SF
from ._common import as_probabilities

__all__ = [
    "is_distributed",
    "all_reduce_mean",
    "check_consistent",
    "Sync",
    "batch_layout",
    "BatchLayout",
    "global_saflex_targets",
    "GlobalTargets",
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
    num_augmented: list[int]
    """Augmented rows of each rank."""
    batch_sizes: list[int]
    """Rows (clean and augmented) of each rank."""

    @property
    def total_augmented(self) -> int:
        return sum(self.num_augmented)


def batch_layout(
    num_augmented: int, batch_size: int, num_classes: int, *, device: torch.device | str = "cpu", group: Any = None
) -> BatchLayout:
    """Exchange the ranks' batch sizes and augmented counts: one all-gather of 3 integers per rank.

    ``SaflexLoss`` calls it first in every step, before any validation pass, so that every rank knows whether the
    global batch has an augmented row (then every rank refreshes the validation gradient and joins the exchange of
    ``Π``, as one process would) or none (then no rank does, and the validation stream does not advance).

    Raises:
        ValueError: If the ranks' numbers of classes differ (raised on every rank).
    """
    counts = torch.tensor([num_augmented, batch_size, num_classes], dtype=torch.long, device=device)
    gathered = [torch.empty_like(counts) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, counts, group=group)
    table = torch.stack(gathered).tolist()
    if len({row[2] for row in table}) > 1:
        raise ValueError(
            "the ranks' logits have different numbers of classes ("
            + ", ".join(f"rank {r}: {row[2]}" for r, row in enumerate(table))
            + "); every rank must train the same model."
        )
    return BatchLayout(dist.get_rank(group), [row[0] for row in table], [row[1] for row in table])


class GlobalTargets(NamedTuple):
    """Result of :func:`global_saflex_targets`."""

    weights: Tensor
    """This rank's weights `(n,)`."""
    soft_labels: Tensor
    """This rank's soft labels `(n, K)`."""
    finite: bool
    """``False`` when any rank's ``Π`` was non-finite: every rank then keeps the upstream labels with weight 1."""
    record: tuple[Tensor, Tensor, Tensor, Tensor | None, int]
    """The global batch for statistics: ``(upstream (N, K), weights (N,), soft_labels (N, K), op (N,) | None,
    batch size)`` over the augmented rows of all ranks, in rank order, and the number of rows of all ranks."""
    state: dict[str, Tensor] | None = None
    """A stateful rule's state after this step (the same on every rank); ``None`` for the other rules."""


GlobalTargets.__new__.__module__ = __name__  # the generated constructor's annotations resolve in this module (API docs)


def global_saflex_targets(
    pi: Tensor,
    targets: Tensor,
    layout: BatchLayout,
    *,
    rule: SF.Rule | str = "margin",
    op: Tensor | None = None,
    generator: torch.Generator | None = None,
    logits: Tensor | None = None,
    state: dict[str, Tensor] | None = None,
    reference: Tensor | None = None,
    group: Any = None,
) -> GlobalTargets:
    """:func:`saflex_data.functional.saflex_targets` on the augmented rows of all ranks; returns this rank's rows.

    Every rank must call it at the same step (also with zero augmented rows: ``pi`` of shape `(0, K)`) with the
    ``layout`` of that step and a ``generator`` in the same state on every rank. The result equals
    ``saflex_targets`` on the rows concatenated in rank order, sliced to this rank, Gumbel noise included: a 2-rank
    run with batch ``b`` decides exactly like one process with the batch ``[rank 0's b; rank 1's b]``. With a
    one-rank ``layout`` (one process) nothing is exchanged.

    Cost: one all-gather of ``max_rank(n) * (2K + 1)`` floats (none when no rank has an augmented row).

    Args:
        pi: This rank's inner products `(n, K)` of its augmented rows.
        targets: Their upstream labels, class indices `(n,)` or probabilities `(n, K)`.
        layout: This step's :func:`batch_layout`.
        rule: The decision rule (a :class:`saflex_data.functional.Rule` or its name); ``batch_max`` normalisation
            and the column statistics of the margin rules see the global batch.
        op: Optional op ids `(n,)` of the augmented rows, for the per-op statistics.
        generator: Gumbel noise generator, in the same state on every rank.
        logits: Optional detached training logits `(n, K)` of the augmented rows, for rules that use them.
        state: A stateful rule's state (:mod:`saflex_data.rules`), the same on every rank; required by those rules.
        reference: For a stateful rule: ``[Σ yᵀΠ, count]`` `(2,)` of this rank's clean rows (summed over ranks here).
        group: Process group; the default group if ``None``.
    """
    rule = SF.Rule.of(rule)
    n, num_classes = pi.shape
    if n != layout.num_augmented[layout.rank]:
        raise ValueError(f"pi has {n} rows but the layout gives this rank {layout.num_augmented[layout.rank]}.")
    dtype = torch.promote_types(pi.dtype, torch.float32)
    device = pi.device
    sizes, total_aug = layout.num_augmented, layout.total_augmented
    upstream = as_probabilities(targets, num_classes, dtype)
    op_all = op
    if len(sizes) == 1:  # one process: nothing to exchange
        pi_all, up_all, logits_all = pi.to(dtype), upstream, logits
    else:
        columns = [pi.to(dtype), upstream]
        if logits is not None and rule.name in SF._RULES_USING_LOGITS:
            columns.append(logits.to(dtype))
        # Row layout: [Π (K) | upstream label (K) | (logits (K)) | op id (1)], padded to the largest shard.
        width = num_classes * len(columns) + 1
        every = torch.zeros(0, width, dtype=dtype, device=device)
        if total_aug:
            rows = torch.zeros(max(sizes), width, dtype=dtype, device=device)
            rows[:n, :-1] = torch.cat(columns, 1)
            rows[:n, -1] = -1 if op is None else op.to(device=device, dtype=dtype)
            shards = [torch.empty_like(rows) for _ in range(len(sizes))]
            dist.all_gather(shards, rows, group=group)
            every = torch.cat([shard[:size] for shard, size in zip(shards, sizes)])
        pi_all, up_all = every[:, :num_classes], every[:, num_classes : 2 * num_classes]
        logits_all = every[:, 2 * num_classes : 3 * num_classes] if len(columns) == 3 else None
        op_all = every[:, -1].long()
        op_all = op_all if bool((op_all >= 0).any()) else None
    if rule.stateful:  # [gated rules] the clean rows' own-label gain of the global batch
        if state is None or reference is None or logits_all is None:
            raise ValueError(f"rule {rule.name!r} keeps state: pass state=, reference= and logits=, but got "
                             f"state={type(state).__name__}, reference={type(reference).__name__}, "
                             f"logits={type(logits).__name__}.")
        reference = reference.to(device=device, dtype=dtype)
        if len(sizes) > 1:
            reference = reference.clone()
            dist.all_reduce(reference, group=group)
    new_state = state
    # Every rank sees the same gathered Π, so every rank takes the same fallback decision.
    finite = bool(torch.isfinite(pi_all).all())
    if finite and total_aug and rule.stateful:
        from .rules import gated_targets

        weights_all, labels_all, new_state = gated_targets(
            pi_all, up_all, state, rule=rule.name, threshold=rule.beta, decay=rule.decay, reference=reference,
            logits=logits_all)  # fmt: skip
    elif finite and total_aug:
        weights_all, labels_all = rule(pi_all, up_all, generator=generator, logits=logits_all)
        weights_all, labels_all = weights_all.to(device=device, dtype=dtype), labels_all.to(device=device, dtype=dtype)
    else:
        weights_all, labels_all = torch.ones(total_aug, dtype=dtype, device=device), up_all.clone()
    offset = sum(sizes[: layout.rank])
    mine = slice(offset, offset + n)
    record = (up_all, weights_all, labels_all, op_all, sum(layout.batch_sizes))
    return GlobalTargets(weights_all[mine], labels_all[mine], finite, record, new_state)


class Sync:
    """The collectives of a SAFLEX loss, in one place; each is a no-op in one process or with ``all_reduce=False``.

    A loss calls the same methods in the same order whether it runs in one process or on many ranks: ``check_once``
    on its first training call, ``layout`` then ``decide`` every step, ``reduce`` on every validation refresh.
    """

    def __init__(self, all_reduce: bool, name: str) -> None:
        self.all_reduce = all_reduce
        self.name = name
        self.checked = False

    @property
    def active(self) -> bool:
        """Whether the ranks share the validation gradient and decide on the global batch."""
        return self.all_reduce and is_distributed()

    def check_once(self, settings: Mapping[str, Any]) -> None:
        """On the first call under torch.distributed: the same ``ValueError`` on every rank if settings differ."""
        if not self.checked and is_distributed():
            check_consistent(settings, name=self.name)
            self.checked = True

    def reduce(self, signal: Any) -> Any:
        """Average a validation signal (a dict of tensors, or a tuple with ``None`` entries) across ranks."""
        if not self.active:
            return signal
        if isinstance(signal, dict):
            return dict(zip(signal, all_reduce_mean(list(signal.values()))))
        reduced = iter(all_reduce_mean([t for t in signal if t is not None]))
        return tuple(None if t is None else next(reduced) for t in signal)

    def layout(self, num_augmented: int, batch_size: int, num_classes: int, device: torch.device) -> BatchLayout:
        """This step's :func:`batch_layout` (one rank's own counts when not synced)."""
        if self.active:
            return batch_layout(num_augmented, batch_size, num_classes, device=device)
        return BatchLayout(0, [num_augmented], [batch_size])

    def decide(self, pi: Tensor, targets: Tensor, layout: BatchLayout, **kwargs: Any) -> GlobalTargets:
        """:func:`global_saflex_targets` (exchanging only when synced)."""
        return global_saflex_targets(pi, targets, layout, **kwargs)


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
    return SF.forward_with_tangent(model, inputs, val_grad)
