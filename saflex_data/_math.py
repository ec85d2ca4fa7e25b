"""SAFLEX's pure maths: tensors in, tensors out (no module, no hook, no global state).

Ding et al., "SAFLEX: Self-Adaptive Augmentation via Feature Label Extrapolation", ICLR 2024
(https://arxiv.org/abs/2410.02512); the derivation is in the repository's ``docs/method.md``::

    Π_ik = <∇θ ℓ_k(x_i), g> = u_ik - Σ_j p_ij u_ij,     u_i = J_z(x_i) · (-g),     w_i = 1[y_iᵀ Π_i ≥ 0]

This module holds the input checks, the validation residual and the closed-form last-layer gradient, ``Π`` from a
tangent or from penultimate features, and the decision rules (:func:`saflex_targets`, :class:`Rule`). The autodiff
on live modules (JVPs, validation gradients, BatchNorm statistics) is in :mod:`saflex_data._autodiff`; both are
re-exported by :mod:`saflex_data.functional`, the public surface.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor

from . import rules as _rules

__all__ = [
    "as_probabilities",
    "one_hot",
    "solve_dtype",
    "check_targets",
    "check_temperature",
    "check_logits",
    "validation_residual",
    "last_layer_validation_gradient",
    "inner_products_from_tangent",
    "last_layer_inner_products",
    "last_layer_logit_tangents",
    "normalize_inner_products",
    "standardize_inner_products",
    "own_label_gain",
    "weight_scores",
    "adaptive_keep",
    "default_beta",
    "saflex_targets",
    "rule_targets",
    "Rule",
    "RuleName",
    "Normalize",
    "RULES",
    "RULES_USING_LOGITS",
]

RuleName = Literal["paper", "centered", "margin", "margin_relabel", "margin_fix", "gain", "gain_auto", "gain_loss"]
Normalize = Literal["batch_max", "row_max", "none"]

RULES = ("paper", "centered", "margin", "margin_relabel", "margin_fix", "gain", "gain_auto", "gain_loss")
_RULES = RULES
_MARGIN_RULES = ("margin", "margin_relabel", "margin_fix")
_GAIN_RULES = ("gain", "gain_auto", "gain_loss")
# Rules that read saflex_targets(..., logits=) (and the gated rules' p[y]); their logits are exchanged under DDP.
RULES_USING_LOGITS: tuple[str, ...] = ("gain_loss", *_rules.GATED_RULES)
_NORMALIZE = ("batch_max", "row_max", "none")


def as_probabilities(
    labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32, copy: bool = False
) -> Tensor:
    """Class indices `(B,)` (any integer dtype) as one-hot rows, or probabilities `(B, K)` in ``dtype`` (``copy``:
    never the caller's own tensor)."""
    if labels.dim() == 2:
        return labels.to(dtype, copy=copy)
    return one_hot(labels, num_classes, dtype)


def solve_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """``torch.promote_types(*dtypes, torch.float32)`` for float and integer dtypes (float64 if any is float64),
    without a call into torch (each call of ``torch.promote_types`` is an aten op on the hot path)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def one_hot(index: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``F.one_hot(index, num_classes).to(dtype)`` without its host-side range check (a device synchronisation on
    the CPU): the caller has checked ``index``."""
    out = torch.zeros((*index.shape, num_classes), dtype=dtype, device=index.device)
    return out.scatter_(-1, index.long().unsqueeze(-1), 1)


# ---------------------------------------------------------------------------------------------------------------
# Input checks (one place; the rest of the module trusts its inputs)
# ---------------------------------------------------------------------------------------------------------------
def check_targets(
    targets: Tensor, batch_size: int, num_classes: int, name: str = "targets", *, values: bool = True
) -> None:
    """Raise a clear error unless ``targets`` are class indices `(B,)` in ``[0, K)`` or probabilities `(B, K)`.

    ``values=False`` checks the type, shape and dtype only: the value checks read the targets on the host (a
    device synchronisation), which ``SaflexLoss`` does once per target shape and dtype, not every step.
    """
    if not isinstance(targets, Tensor):
        raise TypeError(f"{name} must be a tensor, but got {type(targets).__name__}.")
    if targets.dim() == 1 and not targets.is_floating_point() and targets.dtype != torch.bool:
        if targets.shape[0] != batch_size:
            raise ValueError(
                f"{name} must have shape ({batch_size},) to match logits of shape ({batch_size}, {num_classes}), "
                f"but got {tuple(targets.shape)}."
            )
        if values and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
            raise ValueError(
                f"{name} must be class indices in [0, {num_classes}) for a model with {num_classes} outputs, "
                f"but got values in [{int(targets.min())}, {int(targets.max())}]."
            )
        return
    if targets.dim() == 2 and targets.is_floating_point():
        if tuple(targets.shape) != (batch_size, num_classes):
            raise ValueError(
                f"{name} given as probabilities must have shape ({batch_size}, {num_classes}) to match the logits, "
                f"but got {tuple(targets.shape)}."
            )
        if not values:
            return
        sums = targets.sum(-1)
        if targets.numel() and (
            bool((targets < -1e-6).any()) or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3)
        ):
            raise ValueError(
                f"{name} given as probabilities must be non-negative and sum to 1 over classes, but got row sums "
                f"in [{float(sums.min()):.4g}, {float(sums.max()):.4g}] and minimum {float(targets.min()):.4g}."
            )
        return
    raise ValueError(
        f"{name} must be class indices of shape ({batch_size},) (int) or probabilities of shape "
        f"({batch_size}, {num_classes}) (float), but got a tensor of shape {tuple(targets.shape)} and dtype "
        f"{targets.dtype}."
    )


def check_temperature(temperature: float, name: str = "temperature") -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{name} must be a float > 0 (math.inf allowed), but got {temperature!r}.")


def check_logits(logits: Tensor, name: str = "logits") -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"shape {tuple(logits.shape)} and dtype {logits.dtype}" if isinstance(logits, Tensor) else type(logits)
        raise ValueError(f"{name} must be a float tensor of shape (B, K), but got {got}.")



# ---------------------------------------------------------------------------------------------------------------
# Validation residual and the last layer's closed-form gradient
# ---------------------------------------------------------------------------------------------------------------
def validation_residual(logits: Tensor, targets: Tensor, temperature: float = 1.0, *, check: bool = True) -> Tensor:
    """``softmax(z / T) - y``: what the validation loss pushes on each logit (``T = inf``: ``1/K - y``).

    ``T = 1`` is the cross-entropy gradient w.r.t. the logits. For ``T > 1`` it is the gradient of the tempered
    loss ``T · CE(z / T, y)`` (not in the paper): once the model fits the validation samples, ``softmax(z) - y``
    fades to zero and with it every inner product ``Π``, except for the few misclassified validation samples;
    a tempered residual stays of order one, so each validation sample keeps voting for its class. ``T = inf`` is
    the limit ``1/K - y`` (the gradient of the linear loss ``-(z_y - mean_k z_k)``).

    Args:
        logits: Logits `(V, K)`.
        targets: Class indices `(V,)` or probabilities `(V, K)`.
        temperature: ``T > 0``; ``math.inf`` allowed.
        check: ``False`` skips the checks of the targets' values (see :func:`check_targets`).

    Returns:
        The residual `(V, K)`, float32 or wider.
    """
    check_temperature(temperature)
    check_logits(logits)
    check_targets(targets, logits.shape[0], logits.shape[1], "targets", values=check)
    dtype = solve_dtype(logits.dtype)  # never below float32, keep float64
    if math.isinf(temperature):
        y = as_probabilities(targets, logits.shape[1], dtype)
        return torch.full_like(y, 1.0 / logits.shape[1]) - y
    z = _detached(logits).to(dtype)
    p = torch.softmax(z if temperature == 1.0 else z / temperature, -1)
    if targets.dim() == 2:
        return p - targets.to(dtype)
    # p - onehot(y) in one op: the same numbers (p - 1 at the label, p - 0 elsewhere).
    return p.scatter_(1, targets.long().unsqueeze(1), -1.0, reduce="add")


def _detached(t: Tensor) -> Tensor:
    """``t.detach()`` only when needed (each detach is an aten op on the hot path)."""
    return t.detach() if t.requires_grad and torch.is_grad_enabled() else t



def last_layer_validation_gradient(
    features: Tensor,
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    check: bool = True,
) -> tuple[Tensor, Tensor]:
    """Closed-form gradient of the mean CE w.r.t. the last linear layer ``z = W h + b``.

    ``G_W = (p - y)ᵀ h / V`` and ``G_b = mean(p - y)``; no backward pass is needed. With ``temperature`` ``T``,
    ``p - y`` is the tempered residual of :func:`validation_residual`.

    Args:
        features: Penultimate features `(V, D)`.
        logits: Logits `(V, K)`.
        targets: Class indices `(V,)` or probabilities `(V, K)`.
        temperature: ``T > 0`` (``math.inf`` allowed); ``1`` is the plain cross-entropy.
        mask: Bool `(V,)`: the gradient of the mean over these rows only (zeros when there is none), with the shapes
            of the whole batch (no host synchronisation).
        check: ``False`` skips the checks of the targets' values (see :func:`check_targets`).

    Returns:
        ``(grad_weight (K, D), grad_bias (K,))``.
    """
    residual = validation_residual(logits, targets, temperature, check=check)  # checks logits and targets
    count: Tensor | int = logits.shape[0]
    if mask is not None:
        residual = torch.where(mask[:, None], residual, 0)
        count = mask.sum().clamp_min(1).to(residual.dtype)
    # (K, V) x (V, D): G_W = Rᵀ H (one mm; einsum's permute/bmm route is a dozen aten ops)
    grad_weight = residual.t().mm(features.to(residual.dtype)) / count
    return grad_weight, residual.mean(0) if mask is None else residual.sum(0) / count



# ---------------------------------------------------------------------------------------------------------------
# Gradient inner products Π from a tangent or from features
# ---------------------------------------------------------------------------------------------------------------
def inner_products_from_tangent(logits: Tensor, tangent: Tensor) -> Tensor:
    """``Π = u - (p·u) 1ᵀ`` from logits and their directional derivative ``u = J_z · (-g)``.

    Args:
        logits: Logits `(B, K)`.
        tangent: Tangent of the logits along ``-g``, shape `(B, K)`.

    Returns:
        ``Π`` of shape `(B, K)` in float32 (float64 when the inputs are float64).
    """
    dtype = solve_dtype(logits.dtype, tangent.dtype)
    p = torch.softmax(logits.detach().to(dtype), -1)
    u = tangent.detach().to(dtype)
    return u - (p * u).sum(-1, keepdim=True)


def last_layer_logit_tangents(
    features: Tensor, logits: Tensor, grad_weight: Tensor, grad_bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(s, p)``: ``s_i = G_W h_i + G_b`` `(B, K)` (minus the logits' tangent along ``-g``) and ``p = softmax(z)``,
    from which :func:`last_layer_inner_products` forms ``Π_ik = p_iᵀ s_i - s_ik``."""
    dtype = solve_dtype(logits.dtype, grad_weight.dtype)
    # s = h G_Wᵀ + G_b, (B, D) x (D, K): one matrix product (a plain mm; einsum's bmm route measured ~35% slower)
    h, gw = _detached(features).to(dtype), grad_weight.to(dtype)
    s = h @ gw.T if grad_bias is None else torch.addmm(grad_bias.to(dtype), h, gw.T)
    return s, torch.softmax(_detached(logits).to(dtype), -1)


def last_layer_inner_products(
    features: Tensor, logits: Tensor, grad_weight: Tensor, grad_bias: Tensor | None = None
) -> Tensor:
    """``Π`` restricted to the last linear layer: ``s_i = G_W h_i + G_b``, ``Π_ik = p_iᵀ s_i - s_ik``
    (``docs/method.md#computing-pi``).

    Args:
        features: Penultimate features `(B, D)` (the classifier's input).
        logits: Logits `(B, K)`.
        grad_weight: Validation gradient of the classifier weight `(K, D)`.
        grad_bias: Validation gradient of the classifier bias `(K,)`, or ``None`` (no or frozen bias).
    """
    s, p = last_layer_logit_tangents(features, logits, grad_weight, grad_bias)
    # The logit tangent along -g is u = -s, and Π = u - (p·u) = (p·s) - s (the same numbers, one op fewer).
    return (p * s).sum(-1, keepdim=True) - s


# ---------------------------------------------------------------------------------------------------------------
# Weights and soft labels
# ---------------------------------------------------------------------------------------------------------------
def normalize_inner_products(pi: Tensor, normalize: Normalize = "batch_max", *, mask: Tensor | None = None) -> Tensor:
    """Put ``Π`` on a unit scale before the β bonus and the Gumbel noise are added.

    ``Π`` scales with ``‖g‖``, and with Gumbel noise its scale acts as an inverse temperature, so a fixed β only
    means something after normalising. ``"batch_max"``: ``Π / mean_i max_k |Π_ik|`` (one scale per batch, keeps
    the ranking across samples); ``"row_max"``: each row by its own ``max_k |Π_ik|``; ``"none"``: raw. ``mask``
    (bool `(B,)`): the batch is these rows (the others come back unspecified).
    """
    if normalize == "none":
        return pi
    eps = torch.finfo(pi.dtype).tiny
    row = pi.abs().amax(-1, keepdim=True)
    if normalize == "batch_max":
        scale = row.mean() if mask is None else _masked_mean(row, mask)
        return pi / scale.clamp_min(eps)
    if normalize == "row_max":
        return pi / row.clamp_min(eps)
    raise ValueError(f"normalize must be one of {_NORMALIZE}, but got {normalize!r}.")


def standardize_inner_products(pi: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Column-wise z-score of ``Π`` over the batch: ``(Π_ik - mean_j Π_jk) / std_j Π_jk`` (not in the paper).

    The validation gradient has a batch-global class direction (post-ReLU features share a common mean component,
    so ``h_iᵀh_v`` is large for every pair): one class then wins ``argmax_k Π_ik`` for most of the batch.
    Centring each class column removes that direction; scaling it puts every class on the same unit, so a fixed
    margin (``beta``) means "so many batch standard deviations". A batch of one sample gives zeros.

    Args:
        pi: Inner products `(B, K)`.
        mask: Bool `(B,)`: standardise over these rows only (the others come back zero), with no host
            synchronisation.

    Returns:
        The standardised scores `(B, K)`, same dtype.
    """
    if mask is not None:
        return _masked_zscore(pi, mask)
    centred = pi - pi.mean(0, keepdim=True)
    if pi.shape[0] < 2:
        return centred
    eps = torch.finfo(pi.dtype).eps
    scale = centred.pow(2).mean(0, keepdim=True).sqrt()
    # A constant column (no information) stays zero instead of being blown up.
    return centred / scale.clamp_min(eps * (1.0 + pi.abs().amax()))


def own_label_gain(pi: Tensor, targets: Tensor) -> Tensor:
    """Each sample's gain from its own label against an average label: ``y_iᵀΠ_i - mean_k Π_ik`` (not in the paper).

    With ``u_i = J_z(x_i)·(-g)`` (see the module docstring), ``Π_ik = u_ik - p_iᵀu_i``, so this is
    ``y_iᵀu_i - mean_k u_ik``: the first-order change of the validation loss when the step pushes the logits toward
    ``y_i`` rather than toward no class in particular. Unlike ``y_iᵀΠ_i`` (Ren et al.'s meta-gradient weight), it
    does not fade once the model fits the sample (``p_i → y_i``): it is the limit ``T → ∞`` of a tempered
    training-side loss, as the tempered validation loss is for the validation samples.

    Args:
        pi: Inner products `(B, K)`.
        targets: Upstream labels, class indices `(B,)` or probabilities `(B, K)`.

    Returns:
        `(B,)`, float32 (float64 for float64 ``pi``).
    """
    check_logits(pi, "pi")
    check_targets(targets, pi.shape[0], pi.shape[1], "targets")
    dtype = solve_dtype(pi.dtype)
    raw = pi.to(dtype)
    return _own_label_gain(raw, as_probabilities(targets, pi.shape[1], dtype))


def _own_label_gain(raw: Tensor, y: Tensor) -> Tensor:
    return (y * raw).sum(-1) - raw.mean(-1)


def _zscore(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """``(v - mean) / std`` over the batch (population std); zeros for one sample or a constant vector."""
    if mask is not None:
        return _masked_zscore(torch.where(mask, values, 0)[:, None], mask)[:, 0]
    centred = values - values.mean()
    if values.shape[0] < 2:
        return centred
    scale = centred.pow(2).mean().sqrt()
    return centred / scale.clamp_min(torch.finfo(values.dtype).eps * (1.0 + values.abs().amax()))


# Fixed-shape statistics over the rows of a mask: the same formulas as over the rows themselves, with the count on
# the device, so that no host synchronisation is needed to know how many rows there are.
def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the rows ``mask`` of ``x`` `(B, ...)` (all dimensions), ``x`` zero elsewhere; 0 when there is
    none."""
    return x.sum() / (mask.sum() * (x[0].numel() if x.dim() > 1 else 1)).clamp_min(1)


def _masked_zscore(x: Tensor, mask: Tensor) -> Tensor:
    """Column z-scores of ``x`` `(B, K)` over the rows ``mask`` (zeros elsewhere, and for fewer than two rows).

    ``x`` must be zero outside the mask (:func:`rule_targets` sees to it). One row gives zeros, as the unmasked
    formula does: its centred value ``x - x / 1`` is exactly zero.
    """
    n = mask.sum(dtype=x.dtype).clamp_min(1)
    centred = (x - x.sum(0, keepdim=True) / n) * mask[:, None]
    scale = (centred.pow(2).sum(0, keepdim=True) / n).sqrt()
    # A constant column (no information) stays zero instead of being blown up.
    return centred / scale.clamp_min((x.abs().amax() + 1.0) * torch.finfo(x.dtype).eps)


def _check_rule_logits(rule: str, logits: Tensor | None, pi: Tensor) -> None:
    if logits is None:
        if rule == "gain_loss":
            raise ValueError(
                "rule='gain_loss' combines Π with the model's own loss and needs logits=<the augmented rows' detached "
                f"logits, shape {tuple(pi.shape)}>, but got logits=None."
            )
        return
    if not isinstance(logits, Tensor) or tuple(logits.shape) != tuple(pi.shape) or not logits.is_floating_point():
        got = f"shape {tuple(logits.shape)} and dtype {logits.dtype}" if isinstance(logits, Tensor) else type(logits)
        raise ValueError(f"logits must be a float tensor of the shape of pi {tuple(pi.shape)}, but got {got}.")


def weight_scores(pi: Tensor, targets: Tensor, *, rule: RuleName = "margin", logits: Tensor | None = None) -> Tensor:
    """The continuous score behind each sample's keep/drop weight; higher = keep (for AUROC and diagnostics).

    ``paper``/``centered``: the gain of the upstream label ``y_iᵀΠ_i`` (Ren et al.'s meta-gradient; the weight is
    ``1[score ≥ 0]`` when the upstream label is kept). ``margin``/``margin_relabel``/``margin_fix``: the margin
    ``m_i = y_iᵀZ_i - max_k Z_ik ≤ 0`` with ``Z`` from :func:`standardize_inner_products` (``margin``: the
    weight is ``1[m_i ≥ -beta]``). ``gain``/``gain_auto``: the batch z-score of :func:`own_label_gain`.
    ``gain_loss``: that z-score plus the batch z-score of the model's own log-likelihood ``log p_i[y_i]``
    (from ``logits``).

    Args:
        pi: Inner products `(B, K)`.
        targets: Upstream labels, class indices `(B,)` or probabilities `(B, K)`.
        rule: Which rule's score.
        logits: The augmented rows' (detached) training logits `(B, K)`; required by ``gain_loss`` only.

    Returns:
        Scores `(B,)`, float32 (float64 for float64 ``pi``).
    """
    check_logits(pi, "pi")
    check_targets(targets, pi.shape[0], pi.shape[1], "targets")
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {_RULES}, but got {rule!r}.")
    _check_rule_logits(rule, logits, pi)
    dtype = solve_dtype(pi.dtype)
    return _scores(pi.to(dtype), as_probabilities(targets, pi.shape[1], dtype), rule, logits)


def _scores(raw: Tensor, y: Tensor, rule: str, logits: Tensor | None, mask: Tensor | None = None) -> Tensor:
    if rule in _MARGIN_RULES:
        z = standardize_inner_products(raw, mask=mask)
        return (y * z).sum(-1) - z.amax(-1)
    if rule in _GAIN_RULES:
        score = _zscore(_own_label_gain(raw, y), mask)  # (rows outside the mask zeroed there)
        if rule == "gain_loss":
            own = (y * torch.log_softmax(logits.detach().to(raw.dtype), -1)).sum(-1)
            score = score + _zscore(own, mask)
        return score
    return (y * raw).sum(-1)


def adaptive_keep(scores: Tensor, min_separation: float, *, mask: Tensor | None = None) -> Tensor:
    """Keep mask from a threshold that adapts to the share of bad samples (Otsu's split of the batch's scores).

    The scores are split into a low and a high group where the between-group variance ``σ_b²`` is largest (Otsu,
    1979). The low group is dropped only if the split explains at least ``min_separation`` of the total variance
    (``η = σ_b² / σ² ∈ [0, 1]``); otherwise every sample is kept. For reference, ``η ≈ 0.64`` for a normal sample
    and ``0.75`` for a uniform one, so ``min_separation`` above those only fires on two clearly separated groups.

    Args:
        scores: `(B,)`, higher = keep.
        min_separation: ``η`` needed to drop anything, in ``[0, 1]``.
        mask: Bool `(B,)`: split these rows only (the others come back unspecified).

    Returns:
        Bool `(B,)`.
    """
    batch = scores.shape[0]
    if batch < 2:
        return torch.ones(batch, dtype=torch.bool, device=scores.device)
    low = torch.arange(1, batch, device=scores.device, dtype=scores.dtype)  # size of the low group
    if mask is None:
        ordered, order = scores.sort()
        total = ordered.var(unbiased=False)
        count: Tensor | int = batch
        valid = None
    else:
        ordered, order = torch.where(mask, scores, math.inf).sort()  # the rows of the mask first (ascending)
        count = mask.sum().to(scores.dtype)
        ordered = torch.where(torch.arange(batch, device=scores.device) < count, ordered, 0)
        mean = ordered.sum() / count.clamp_min(1)
        total = torch.where(torch.arange(batch, device=scores.device) < count, ordered - mean, 0)
        total = total.pow(2).sum() / count.clamp_min(1)
        valid = low < count
    cum = ordered.cumsum(0)[:-1]
    mean_low = cum / low
    mean_high = (ordered.sum() - cum) / (count - low)
    between = (low / count) * (1 - low / count) * (mean_low - mean_high) ** 2
    if valid is not None:
        between = torch.where(valid, between, -math.inf)
    top, best = between.max(0)
    # Decided on the device (no host synchronisation): drop the low group when the split explains enough.
    split = (total > 0) & (top / total >= min_separation)
    if valid is not None:
        split = split & (count >= 2)
    drop = (torch.arange(batch, device=scores.device) <= best) & split
    return torch.empty_like(drop).scatter_(0, order, ~drop)


# margin: 1.5 was the best of {1, 1.5} on both benchmark streams (and 0.5 dropped too many good samples).
# gain/gain_loss: batch standard deviations; gain_auto: the separation Otsu's split needs (see adaptive_keep).
_DEFAULT_BETA = {"paper": 0.5, "centered": 0.5, "margin": 1.5, "margin_relabel": 1.0, "margin_fix": 1.5,
                 "gain": 1.5, "gain_auto": 0.7, "gain_loss": 2.0}  # fmt: skip


def default_beta(rule: RuleName) -> float:
    """The β that ``saflex_targets(..., beta=None)`` uses for ``rule`` (a gated rule: its gate threshold in SEs)."""
    if rule in _rules.GATED_RULES:
        return _rules.DEFAULT_THRESHOLD
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {_RULES}, but got {rule!r}.")
    return _DEFAULT_BETA[rule]


def _check_gate_settings(rule: str, beta: float | None, decay: float | None) -> tuple[float, float]:
    """The gated rules' settings: ``beta`` (threshold in standard errors, > 0) and ``decay`` in ``(0, 1)``."""
    beta = _rules.DEFAULT_THRESHOLD if beta is None else beta
    decay = _rules.DEFAULT_DECAY if decay is None else decay
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta of rule {rule!r} is the gate's threshold in standard errors, a finite float > 0, "
                         f"but got {beta!r}.")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
        raise ValueError(f"decay of rule {rule!r} must be a float in (0, 1), but got {decay!r}.")
    return float(beta), float(decay)


def _check_rule_settings(rule: str, beta: float | None, tau: float | None, normalize: str) -> float:
    """Check a rule's settings (the one place that does); returns ``beta`` with ``None`` resolved to the default."""
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {_RULES}, but got {rule!r}.")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < math.inf):
        # tau = inf makes every relabelled label uniform (and, for "paper", every weight 0).
        raise ValueError(f"tau must be a finite positive float (0, inf) or None (argmax), but got {tau!r}.")
    if beta is None:
        beta = _DEFAULT_BETA[rule]
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite float or None (the rule's default), but got {beta!r}.")
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE}, but got {normalize!r}.")
    if rule == "gain_auto" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta for rule='gain_auto' is a share of variance in [0, 1], but got {beta!r}.")
    if beta < 0:
        # A negative margin drops (margin, gain) or relabels (margin_fix) samples whose upstream label is the best
        # class; a negative bonus (paper, centered, margin_relabel) pushes every label away from the upstream one.
        raise ValueError(
            f"beta for rule={rule!r} is a margin or bonus in [0, inf) (default {_DEFAULT_BETA[rule]}); a negative "
            f"beta makes the rule drop or relabel samples whose label is right, but got {beta!r}."
        )
    return float(beta)


def saflex_targets(
    pi: Tensor,
    targets: Tensor,
    *,
    beta: float | None = None,
    tau: float | None = 0.01,
    normalize: Normalize = "batch_max",
    rule: RuleName = "margin",
    generator: torch.Generator | None = None,
    logits: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample weights and soft labels of augmented samples from their inner products (``docs/method.md#rules``).

    Default: ``rule="margin"`` (drop, never relabel), the library default;
    ``rule="paper"`` is the paper's exact rule, for comparisons with the paper.

    Rules:

    - ``"paper"`` (the paper's exact rule): ``S_i = Π̂_i + β y_i^aug`` with ``Π̂`` normalised (see
      :func:`normalize_inner_products`), ``y_i = softmax((S_i + G_i) / τ)`` with ``G ~ Gumbel(0, 1)``
      (``tau=None``: ``onehot(argmax S_i)``), and ``w_i = 1[y_iᵀ Π_i ≥ 0]`` on the raw ``Π``.
    - ``"centered"``: as ``paper`` on ``Π - mean_batch(Π)`` per class for the labels (removes the batch-global
      class direction of the validation gradient); the weight still uses the raw ``Π``.
    - ``"margin"`` (drop, never relabel): ``Z`` = column-wise z-score of ``Π`` over the batch
      (:func:`standardize_inner_products`), margin ``m_i = y_iᵀZ_i - max_k Z_ik ≤ 0``; ``w_i = 1[m_i ≥ -β]`` and
      the upstream label is kept. ``tau`` and ``normalize`` are not used.
    - ``"margin_relabel"``: same ``Z``; the label is the paper's bonus rule on ``Z``:
      ``y_i = softmax((Z_i + β y_i^aug + G_i) / τ)`` (argmax for ``tau=None``), which changes the label exactly
      when another class beats the upstream one by more than ``β`` batch standard deviations; all weights are 1.
      ``normalize`` is not used.
    - ``"margin_fix"``: the samples ``"margin"`` drops (``m_i < -β``) are relabelled to their best class instead
      when it also leads the runner-up class by at least ``β / 2`` (a clear winner), and dropped otherwise. Fewer
      relabels than ``"margin_relabel"``, but more of them right. ``tau`` and ``normalize`` are not used.

    - ``"gain"`` (drop, never relabel; acts when the labels are right but a sample does not help): the score is the
      batch z-score of the own-label gain ``y_iᵀΠ_i - mean_k Π_ik`` (:func:`own_label_gain`, which does not fade
      once the model fits the sample); ``w_i = 1[score_i ≥ -β]``.
    - ``"gain_auto"``: the ``gain`` score with a threshold that adapts to the share of bad samples: Otsu's split
      of the batch's scores, applied only when it explains at least ``β`` of their variance
      (:func:`adaptive_keep`; ``β ∈ [0, 1]``).
    - ``"gain_loss"``: the ``gain`` z-score plus the batch z-score of the model's own log-likelihood
      ``log p_i[y_i]`` (needs ``logits``); ``w_i = 1[score_i ≥ -β]``.

    Decision-quality measurements of the rules against the alternatives: ``benchmarks/suite``.

    Args:
        pi: Inner products `(B, K)`.
        targets: Upstream labels, class indices `(B,)` or probabilities `(B, K)` (Mixup/CutMix).
        beta: Bonus on (``paper``/``centered``: in units of the normalised ``Π``) or margin for (margin rules: in
            batch standard deviations) the upstream label. ``None``: 0.5 for ``paper``/``centered``, 1.5 for
            ``margin`` and ``margin_fix``, 1.0 for ``margin_relabel``, 1.5 for ``gain``, 2.0 for ``gain_loss``;
            for ``gain_auto`` the separation needed to drop anything (default 0.7).
        tau: Gumbel-softmax temperature; ``None`` means a deterministic argmax.
        normalize: How ``Π`` is scaled before the bonus and the noise (``paper``/``centered``).
        rule: ``"margin"`` (default), ``"paper"``, ``"centered"``, ``"margin_relabel"``, ``"margin_fix"``, ``"gain"``,
            ``"gain_auto"`` or ``"gain_loss"``.
        generator: Random generator for the Gumbel noise (drawn on the generator's device).
        logits: The augmented rows' detached training logits `(B, K)`, for the rules that combine ``Π`` with the
            model's own prediction (``gain_loss``); the other rules ignore them.

    Returns:
        ``(weights (B,), soft_labels (B, K))``, float32 (float64 for float64 ``pi``).

    Example:
        >>> pi = torch.tensor([[0.2, -0.1, -0.1], [-0.3, 0.4, -0.1]])
        >>> w, y = saflex_targets(pi, torch.tensor([0, 0]), beta=0.5, tau=None, rule="paper")
        >>> w.tolist(), y.argmax(1).tolist()
        ([1.0, 1.0], [0, 1])
        >>> pi = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.1, -0.1], [-2.0, 2.0]])
        >>> w, y = saflex_targets(pi, torch.tensor([0, 0, 0, 0]), rule="margin")  # the last label loses clearly
        >>> w.tolist(), y.argmax(1).tolist()
        ([1.0, 1.0, 1.0, 0.0], [0, 0, 0, 0])
    """
    check_logits(pi, "pi")
    check_targets(targets, pi.shape[0], pi.shape[1], "targets")
    beta = _check_rule_settings(rule, beta, tau, normalize)
    _check_rule_logits(rule, logits, pi)
    dtype = solve_dtype(pi.dtype)
    return rule_targets(pi.to(dtype), as_probabilities(targets, pi.shape[1], dtype), rule=rule, beta=beta, tau=tau,
                        normalize=normalize, generator=generator, logits=logits)


def rule_targets(
    pi: Tensor,
    upstream: Tensor,
    *,
    rule: str,
    beta: float,
    tau: float | None,
    normalize: str,
    generator: torch.Generator | None = None,
    logits: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`saflex_targets` on checked inputs: ``pi`` `(B, K)` in float32 or wider, ``upstream`` probabilities in
    its dtype, ``beta`` resolved. ``mask`` (bool `(B,)`) decides for these rows only, as if the batch were them, with
    the shapes of the whole batch: no host synchronisation, except the Gumbel rules (``tau`` set), which draw
    exactly one noise row per masked row (one synchronisation for their count), as :func:`saflex_targets` does.
    Rows outside ``mask`` must be zero (``torch.where(mask[:, None], pi, 0)``) and come back unspecified.
    """
    dtype, num_classes = pi.dtype, pi.shape[1]
    raw = pi
    if rule in _GAIN_RULES:
        score = _scores(raw, upstream, rule, logits, mask)
        keep = adaptive_keep(score, beta, mask=mask) if rule == "gain_auto" else score >= -beta
        return keep.to(dtype), upstream
    if rule in ("margin", "margin_fix"):
        z = standardize_inner_products(raw, mask=mask)
        margin = (upstream * z).sum(-1) - z.amax(-1)
        keep = margin >= -beta
        if rule == "margin":
            return keep.to(dtype), upstream
        top2 = z.topk(min(2, num_classes), -1).values
        lead = top2[:, 0] - top2[:, -1] if num_classes > 1 else torch.full_like(margin, math.inf)
        relabel = ~keep & (lead >= beta / 2)
        labels = torch.where(relabel[:, None], one_hot(z.argmax(-1), num_classes, dtype), upstream)
        return (keep | relabel).to(dtype), labels
    if rule == "margin_relabel":
        score = standardize_inner_products(raw, mask=mask) + beta * upstream
    else:
        score = raw
        if rule == "centered" and mask is not None:
            score = torch.where(mask.sum() > 1, (raw - _masked_column_mean(raw, mask)) * mask[:, None], raw)
        elif rule == "centered" and raw.shape[0] > 1:
            score = raw - raw.mean(0, keepdim=True)
        score = normalize_inner_products(score, normalize, mask=mask) + beta * upstream
    if tau is None:
        soft_labels = one_hot(score.argmax(-1), num_classes, dtype)
    else:
        device = generator.device if generator is not None else pi.device
        rows = None if mask is None else mask.nonzero().squeeze(1)  # the Gumbel rules' one synchronisation
        shape = score.shape if rows is None else (rows.numel(), num_classes)
        uniform = torch.rand(shape, generator=generator, device=device, dtype=dtype).to(pi.device)
        if rows is not None:
            uniform = torch.full_like(score, 0.5).index_copy_(0, rows, uniform)
        tiny = torch.finfo(dtype).tiny
        gumbel = -torch.log(-torch.log(uniform.clamp(tiny, 1.0 - 1e-7)))
        soft_labels = torch.softmax((score + gumbel) / tau, -1)
    if rule == "margin_relabel":
        return torch.ones(pi.shape[0], dtype=dtype, device=pi.device), soft_labels
    weights = ((soft_labels * raw).sum(-1) >= 0).to(dtype)
    return weights, soft_labels


def _masked_column_mean(x: Tensor, mask: Tensor) -> Tensor:
    return x.sum(0, keepdim=True) / mask.sum().clamp_min(1)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A decision rule and its settings, checked when it is made: ``Rule("margin", beta=1.0)``.

    ``SaflexLoss(rule=...)`` takes a ``Rule`` or just its name (``rule="paper"`` is ``Rule("paper")``).
    See :func:`saflex_targets` for what each rule does and what its settings mean.

    The gated rules (:mod:`saflex_data.rules`: ``"gated_prior"``, ``"gated"``, ``"gated_hold"``, ``"gated_latch"``,
    ``"gated_soft"``, ``"gated_margin"``, ``"gated_product"``) keep state across steps: they run inside
    ``SaflexLoss``, which holds their state (``docs/method.md#gated-rules``); calling such a ``Rule`` directly
    raises ``TypeError``.

    Args:
        name: ``"margin"`` (default), ``"paper"``, ``"centered"``, ``"margin_relabel"``, ``"margin_fix"``,
            ``"gain"``, ``"gain_auto"``, ``"gain_loss"`` or a gated rule.
        beta: The rule's margin or bonus (the gated rules: the gate's threshold in standard errors, default 2);
            ``None`` takes the rule's default (:func:`default_beta`). Stored resolved.
        tau: Gumbel-softmax temperature of the relabelling rules; ``None`` for a deterministic argmax.
        normalize: Scaling of ``Π`` before the bonus and the noise (``"paper"``/``"centered"``).
        decay: The gated rules only: decay of the gate's exponential weights (default 0.95); ``None`` elsewhere.

    Example:
        >>> Rule("margin")
        Rule(name='margin', beta=1.5, tau=0.01, normalize='batch_max')
        >>> Rule("margin", beta=1.0).beta
        1.0
        >>> Rule("margin", beta=-1.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: beta for rule='margin' is a margin or bonus in [0, inf) (default 1.5); ... but got -1.0.
        >>> Rule("median")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: rule must be one of ('paper', 'centered', ..., 'gain_loss'), but got 'median'.
    """

    name: str = "margin"
    beta: float | None = None
    tau: float | None = 0.01
    normalize: str = "batch_max"
    decay: float | None = None

    def __post_init__(self) -> None:
        if self.name in _rules.GATED_RULES:  # stateful: beta = the gate's threshold in SEs, decay = its EMA's
            beta, decay = _check_gate_settings(self.name, self.beta, self.decay)
            object.__setattr__(self, "beta", beta)
            object.__setattr__(self, "decay", decay)
            return
        if self.decay is not None:
            raise ValueError(f"decay is a setting of the gated rules {_rules.GATED_RULES}; rule {self.name!r} takes "
                             f"decay=None, but got {self.decay!r}.")
        object.__setattr__(self, "beta", _check_rule_settings(self.name, self.beta, self.tau, self.normalize))

    def __repr__(self) -> str:
        extra = "" if self.decay is None else f", decay={self.decay!r}"
        return (f"Rule(name={self.name!r}, beta={self.beta!r}, tau={self.tau!r}, normalize={self.normalize!r}"
                f"{extra})")

    @property
    def stateful(self) -> bool:
        """Whether the rule keeps state across steps (the gated rules: :mod:`saflex_data.rules`)."""
        return self.name in _rules.GATED_RULES

    @property
    def relabels(self) -> bool:
        """Whether the rule may give a label other than the upstream one (the margin and gain rules only drop)."""
        return self.name not in ("margin", "gain", "gain_auto", "gain_loss", *_rules.GATED_RULES)

    @classmethod
    def of(cls, rule: Rule | str) -> Rule:
        """``rule`` itself, or the rule of that name with its default settings."""
        if isinstance(rule, cls):
            return rule
        if isinstance(rule, str):
            return cls(rule)
        raise TypeError(f"rule must be a Rule or a rule name (str), but got {type(rule).__name__}.")

    def __call__(
        self, pi: Tensor, targets: Tensor, *, generator: torch.Generator | None = None, logits: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``saflex_targets(pi, targets, ...)`` with this rule's settings."""
        if self.stateful:
            raise TypeError(f"rule {self.name!r} keeps state across steps: use it through SaflexLoss, or call "
                            "saflex_data.rules.gated_targets with its state.")
        return saflex_targets(pi, targets, beta=self.beta, tau=self.tau, normalize=self.normalize, rule=self.name,
                              generator=generator, logits=logits)

    def decide(
        self,
        pi: Tensor,
        upstream: Tensor,
        mask: Tensor,
        *,
        generator: torch.Generator | None = None,
        logits: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The rule for the rows ``mask`` of a batch, on checked inputs (:func:`rule_targets`): what
        :class:`saflex_data.SaflexLoss` calls every step, without a host synchronisation.

        Args:
            pi: Inner products `(B, K)`, float32 or wider (rows outside ``mask`` may hold anything finite).
            upstream: Upstream labels as probabilities `(B, K)`, in the dtype of ``pi``.
            mask: Bool `(B,)`: the augmented rows, decided as if the batch were them.
            generator: Gumbel noise generator.
            logits: Detached training logits `(B, K)` (``gain_loss``).

        Returns:
            ``(weights (B,), soft_labels (B, K))``; rows outside ``mask`` unspecified.
        """
        if self.stateful:
            raise TypeError(f"rule {self.name!r} keeps state: SaflexLoss decides it with saflex_data.rules.")
        _check_rule_logits(self.name, logits, pi)
        return rule_targets(pi, upstream, rule=self.name, beta=self.beta, tau=self.tau, normalize=self.normalize,
                            generator=generator, logits=logits, mask=mask)
