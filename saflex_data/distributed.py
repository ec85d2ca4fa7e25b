"""SAFLEX under ``torch.distributed`` (DDP, ``torchrun``): the collectives :class:`~saflex_data.SaflexLoss` runs.

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
import torch.nn.functional as F
from torch import Tensor

from . import functional as SF

__all__ = [
    "is_distributed",
    "all_reduce_mean",
    "check_consistent",
    "loss_settings",
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


def loss_settings(loss: Any) -> dict[str, Any]:
    """The settings of a :class:`~saflex_data.SaflexLoss` that every rank must share (compared on its first training
    call)."""
    params = [p for p in loss.model.parameters() if p.requires_grad]
    return {
        "method": loss.method,
        "beta": float(loss.beta),
        "tau": None if loss.tau is None else float(loss.tau),
        "normalize": loss.normalize,
        "rule": loss.rule,
        "val_every": loss.val_every,
        "val_batches": loss.val_batches,
        "val_ema": loss.val_ema,
        "val_mode": loss.val_mode,
        "val_temperature": loss.val_temperature,
        "enabled": bool(loss.enabled),
        "num_splits": loss.num_splits,
        "label_smoothing": float(loss.label_smoothing),
        "all_reduce": bool(loss.all_reduce),
        # Decisions on the global batch need the same Gumbel noise everywhere; per-rank decisions may differ.
        "seed": loss.seed if loss.all_reduce else None,
        "step": loss.step,
        "precondition": None if loss.precondition is None else type(loss.precondition).__name__,
        "classifier": loss.classifier_name,
        "trainable_parameters": (len(params), sum(p.numel() for p in params)),
    }


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
    record: tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]
    """The global batch for statistics, ``(labels (N, K), is_augmented (N,), op (N,) | None, weights (N,),
    soft_labels (N, K))`` over all ranks' ``N = Σ B`` rows (augmented rows first, then clean rows)."""


def global_saflex_targets(
    pi: Tensor,
    targets: Tensor,
    layout: BatchLayout,
    *,
    op: Tensor | None = None,
    beta: float | None = None,
    tau: float | None = 0.01,
    normalize: SF.Normalize = "batch_max",
    rule: SF.Rule = "margin",
    generator: torch.Generator | None = None,
    group: Any = None,
) -> GlobalTargets:
    """:func:`~saflex_data.functional.saflex_targets` on the augmented rows of all ranks; returns this rank's rows.

    Every rank must call it at the same step (also with zero augmented rows: ``pi`` of shape `(0, K)`) with the
    ``layout`` of that step and a ``generator`` in the same state on every rank. The result equals
    ``saflex_targets`` on the rows concatenated in rank order, sliced to this rank, Gumbel noise included: a 2-rank
    run with batch ``b`` decides exactly like one process with the batch ``[rank 0's b; rank 1's b]``.

    Cost: one all-gather of ``max_rank(n) * (2K + 1)`` floats (none when no rank has an augmented row).

    Args:
        pi: This rank's inner products `(n, K)` of its augmented rows.
        targets: Their upstream labels, class indices `(n,)` or probabilities `(n, K)`.
        layout: This step's :func:`batch_layout`.
        op: Optional op ids `(n,)` of the augmented rows, for the per-op statistics.
        beta: See ``saflex_targets``.
        tau: See ``saflex_targets``.
        normalize: See ``saflex_targets``; ``"batch_max"`` uses the global batch's scale.
        rule: See ``saflex_targets``; ``"centered"`` centres on the global batch's mean.
        generator: Gumbel noise generator, in the same state on every rank.
        group: Process group; the default group if ``None``.
    """
    n, num_classes = pi.shape
    if n != layout.num_augmented[layout.rank]:
        raise ValueError(f"pi has {n} rows but the layout gives this rank {layout.num_augmented[layout.rank]}.")
    dtype = torch.promote_types(pi.dtype, torch.float32)
    device = pi.device
    sizes, total_aug = layout.num_augmented, layout.total_augmented
    upstream = targets.to(dtype) if targets.dim() == 2 else F.one_hot(targets.long(), num_classes).to(dtype)

    width = 2 * num_classes + 1
    if total_aug:
        # Row layout: [Π (K) | upstream label (K) | op id (1)], padded to the largest shard.
        rows = torch.zeros(max(sizes), width, dtype=dtype, device=device)
        rows[:n, :num_classes] = pi.to(dtype)
        rows[:n, num_classes : 2 * num_classes] = upstream
        rows[:n, -1] = -1 if op is None else op.to(device=device, dtype=dtype)
        shards = [torch.empty_like(rows) for _ in range(len(sizes))]
        dist.all_gather(shards, rows, group=group)
        every = torch.cat([shard[:size] for shard, size in zip(shards, sizes)])
    else:
        every = torch.zeros(0, width, dtype=dtype, device=device)
    pi_all, up_all = every[:, :num_classes], every[:, num_classes : 2 * num_classes]
    op_all = every[:, -1].long()
    # Every rank sees the same gathered Π, so every rank takes the same fallback decision.
    finite = bool(torch.isfinite(pi_all).all())
    if finite and total_aug:
        weights_all, labels_all = SF.saflex_targets(
            pi_all, up_all, beta=beta, tau=tau, normalize=normalize, rule=rule, generator=generator
        )
    else:
        weights_all, labels_all = torch.ones(total_aug, dtype=dtype, device=device), up_all.clone()
    offset = sum(sizes[: layout.rank])
    mine = slice(offset, offset + n)

    clean = sum(layout.batch_sizes) - total_aug
    record = (
        torch.cat([up_all, up_all.new_zeros(clean, num_classes)]),
        torch.cat([
            torch.ones(total_aug, dtype=torch.bool, device=device),
            torch.zeros(clean, dtype=torch.bool, device=device),
        ]),
        torch.cat([op_all, op_all.new_full((clean,), -1)]) if bool((op_all >= 0).any()) else None,
        torch.cat([weights_all, weights_all.new_ones(clean)]),
        torch.cat([labels_all, labels_all.new_zeros(clean, num_classes)]),
    )
    return GlobalTargets(weights_all[mine], labels_all[mine], finite, record)


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
        ``(logits, tangent)`` as :func:`~saflex_data.functional.forward_with_tangent`.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        val_grad = {f"module.{name}": grad for name, grad in val_grad.items()}
    return SF.forward_with_tangent(model, inputs, val_grad)
