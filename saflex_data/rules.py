"""Stateful decision rules: a gate that decides *whether* the augmented rows hurt, soft weights that decide *how much*.

Pure maths: tensors in, tensors out; the state is a small dict of 0-d tensors that the caller keeps (``SaflexLoss``
holds it in its ``state_dict``). Nothing here reads a tensor back to Python (no ``.item()``, no data-dependent
branches), so the gate stays on the device.

The gate (docs/method.md, "The gated rules"). Each step, with ``Π`` the inner products of the augmented rows and
``y`` their upstream labels, the own-label gain of a row is ``yᵢᵀΠᵢ`` (``Π[i, yᵢ]`` for a hard label). The step's
statistic compares the augmented rows with the same batch's clean rows, whose gain comes from the same ``Π``
formula::

    d_t = (mean_aug yᵀΠ − mean_clean yᵀΠ) / mean_aug |yᵀΠ|

``d_t < 0``: by the validation signal, the augmented rows help less than the clean rows of the same step. The
state keeps exponentially weighted sums of ``d`` and ``d²`` (decay ``ρ``) and of the weights themselves, so that
the mean is bias-corrected (``Σw d / Σw``) and its standard error uses the effective number of steps
``n_eff = (Σw)² / Σw²``: ``SE = sqrt(var / (n_eff − 1))``. The evidence is ``z = −mean / SE``; the gate is on
while ``z > β`` (β standard errors; ``gated_soft``: a strength that grows linearly from 0 at ``z = β/2`` to 1 at
``z = 3β/2``). Off, every augmented row keeps weight 1 and its label; on, the weights are soft, in ``[0, 1]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "GATED_RULES",
    "DEFAULT_DECAY",
    "init_state",
    "check_state",
    "gate_statistic",
    "update_gate",
    "gate_evidence",
    "gate_strength",
    "soft_weights",
    "gated_targets",
]

# rule name -> (weights while on, continuous gate)
_GATED = {
    "gated": ("p", False),  # the model's p[y]
    "gated_prior": ("p", False),  # p[y], on until the evidence has a verdict (then as "gated")
    "gated_hold": ("p", False),  # p[y], on until the evidence says the augmented rows help (hysteresis)
    "gated_latch": ("p", False),  # as gated_hold, but once the evidence said "harmful" it stays on
    "gated_margin": ("margin", False),  # a sigmoid of SAFLEX's standardised margin
    "gated_product": ("product", False),  # their product
    "gated_soft": ("p", True),  # p[y], mixed in with a strength that grows with the evidence
}
# Measured and removed (0.2): "gated_relabel"/"gated_prior_relabel" also moved each label towards the class with
# the best standardised Π by a = s (1 - w_margin); on the suite's class-conditional streams it lost to the same gate
# without relabelling (mean -1.46 points; docs/when_to_use.md#gated).
GATED_RULES: tuple[str, ...] = tuple(_GATED)
DEFAULT_DECAY = 0.95
DEFAULT_THRESHOLD = 2.0
MARGIN_CENTRE = 1.5  # the margin rule's β: a row whose label trails the best class by 1.5 batch SDs gets weight 1/2
MARGIN_WIDTH = 0.5
MIN_EFFECTIVE_STEPS = 8.0  # no verdict before the EMA holds the weight of 8 steps (an SE from 2 steps means nothing)
_STATE_KEYS = ("weight", "weight_sq", "mean", "square", "strength", "latched")


def init_state(device: torch.device | str | None = None) -> dict[str, Tensor]:
    """A fresh gate: no evidence yet (the gate is off). 0-d float32 tensors on ``device``."""
    return {k: torch.zeros((), dtype=torch.float32, device=device) for k in _STATE_KEYS}


def check_state(state: object, name: str = "state") -> dict[str, Tensor]:
    """``state`` if it is a gate state (the keys of :func:`init_state`, 0-d float tensors); a ``ValueError`` else."""
    if not isinstance(state, dict) or set(state) != set(_STATE_KEYS):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{name} must be a gate state with keys {sorted(_STATE_KEYS)}, but got {got}.")
    for k, v in state.items():
        if not isinstance(v, Tensor) or v.dim() != 0 or not v.is_floating_point():
            raise ValueError(f"{name}[{k!r}] must be a 0-d float tensor, but got {v!r}.")
    return state


def gate_statistic(pi: Tensor, upstream: Tensor, reference: Tensor | None = None,
                   mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(d, valid)``: this step's normalised difference of own-label gains, augmented minus clean rows.

    Args:
        pi: Inner products `(n, K)`: of the augmented rows, or of the whole batch with ``mask``.
        upstream: Their upstream labels as probabilities `(n, K)`.
        reference: ``[Σ_clean yᵀΠ, number of clean rows]`` `(2,)`; ``None``: from the rows outside ``mask``.
        mask: Bool `(n,)`: the augmented rows (``None``: every row is one).

    Returns:
        0-d tensors: ``d`` (0 where not valid) and ``valid`` (bool: augmented and clean rows, a finite ``d``).
    """
    dtype = torch.promote_types(pi.dtype, torch.float32)
    gain = (upstream.to(dtype) * pi.to(dtype)).sum(-1)
    aug = torch.ones_like(gain) > 0 if mask is None else mask
    zero = torch.zeros_like(gain)
    if reference is None:
        clean = ~aug
        reference = torch.stack([torch.where(clean, gain, zero).sum(), clean.sum(dtype=dtype)])
    n = aug.sum(dtype=dtype)
    aug_mean = torch.where(aug, gain, zero).sum() / n.clamp_min(1)
    scale = torch.where(aug, gain.abs(), zero).sum() / n.clamp_min(1)
    ref = reference.to(device=gain.device, dtype=dtype)
    clean_mean = ref[0] / ref[1].clamp_min(1)
    d = (aug_mean - clean_mean) / scale.clamp_min(torch.finfo(dtype).tiny)
    valid = (n > 0) & (ref[1] > 0) & (scale > 0) & torch.isfinite(d)
    return torch.where(valid, d, torch.zeros_like(d)), valid


def update_gate(state: dict[str, Tensor], d: Tensor, valid: Tensor, decay: float) -> dict[str, Tensor]:
    """The state after one step with statistic ``d`` (unchanged where ``valid`` is False). ``strength`` is kept."""
    new = {
        "weight": decay * state["weight"] + (1 - decay),
        "weight_sq": decay**2 * state["weight_sq"] + (1 - decay) ** 2,
        "mean": decay * state["mean"] + (1 - decay) * d,
        "square": decay * state["square"] + (1 - decay) * d * d,
    }
    out = {k: torch.where(valid, v.to(state[k].dtype), state[k]) for k, v in new.items()}
    out["strength"], out["latched"] = state["strength"], state["latched"]
    return out


def gate_evidence(state: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, se, z)``: the bias-corrected EMA of ``d``, its standard error and ``z = −mean / se``.

    ``se`` is infinite (and ``z`` 0) until the effective number of steps ``n_eff`` reaches
    :data:`MIN_EFFECTIVE_STEPS`.
    """
    w, w2 = state["weight"], state["weight_sq"]
    tiny = torch.finfo(w.dtype).tiny
    mean = state["mean"] / w.clamp_min(tiny)
    var = (state["square"] / w.clamp_min(tiny) - mean * mean).clamp_min(0)
    n_eff = w * w / w2.clamp_min(tiny)
    enough = (w > 0) & (n_eff >= MIN_EFFECTIVE_STEPS)
    se = torch.where(enough, (var / (n_eff - 1).clamp_min(1e-6)).sqrt(), torch.full_like(w, math.inf))
    z = torch.where(enough, -mean / se.clamp_min(tiny), torch.zeros_like(mean))
    return mean, se, z


def gate_strength(z: Tensor, threshold: float, continuous: bool) -> Tensor:
    """How much the soft weights apply, in ``[0, 1]``: ``1[z > β]``, or ``clamp((z − β/2) / β, 0, 1)``."""
    if continuous:
        return ((z - threshold / 2) / threshold).clamp(0, 1)
    return (z > threshold).to(z.dtype)


def soft_weights(kind: str, pi: Tensor, upstream: Tensor, logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """The soft weights in ``[0, 1]`` of the augmented rows (the rows ``mask`` of a batch: the margin's column
    statistics over those rows only).

    ``kind``: ``"p"`` (the model's ``p[y] = yᵀ softmax(logits)``), ``"margin"`` (``σ((m + 1.5) / 0.5)`` of the
    standardised margin ``m = yᵀZ − max_k Z_k ≤ 0``, ``Z`` the column z-score of ``Π``) or ``"product"``.
    """
    from ._math import standardize_inner_products

    dtype = torch.promote_types(pi.dtype, torch.float32)
    y = upstream.to(dtype)
    p = (y * torch.softmax(logits.detach().to(dtype), -1)).sum(-1)
    raw = pi.to(dtype)
    z = standardize_inner_products(raw) if mask is None else standardize_inner_products(
        torch.where(mask[:, None], raw, 0), mask=mask)
    margin = (y * z).sum(-1) - z.amax(-1)
    w_margin = torch.sigmoid((margin + MARGIN_CENTRE) / MARGIN_WIDTH)
    if kind == "p":
        return p
    if kind == "margin":
        return w_margin
    if kind == "product":
        return p * w_margin
    raise ValueError(f"kind must be 'p', 'margin' or 'product', but got {kind!r}.")


def gated_targets(
    pi: Tensor,
    upstream: Tensor,
    state: dict[str, Tensor],
    *,
    rule: str,
    threshold: float,
    decay: float,
    logits: Tensor,
    reference: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One step of a gated rule: ``(weights (n,), soft labels (n, K), new state)``.

    The state is first updated with this step's statistic (:func:`gate_statistic`), then the gate's strength ``s``
    (:func:`gate_strength`, and the rule's own mode: ``gated_prior`` on before the first verdict, ``gated_hold``
    and ``gated_latch`` as their names say) mixes the soft weights in: ``w = (1 − s) + s · w_soft``. The labels stay
    the upstream ones.

    Args:
        pi: Inner products of the augmented rows `(n, K)` (of the global batch).
        upstream: Their upstream labels as probabilities `(n, K)`.
        state: The gate state (:func:`init_state`), on ``pi``'s device.
        rule: One of :data:`GATED_RULES`.
        threshold: ``β``, in standard errors of the gate's mean.
        decay: ``ρ`` of the exponential weights, in ``(0, 1)``.
        logits: The augmented rows' detached training logits `(n, K)`.
        reference: ``[Σ_clean yᵀΠ, number of clean rows]`` of the same batch; ``None`` with ``mask``.
        mask: Bool `(n,)`: ``pi``, ``upstream`` and ``logits`` are the whole batch and these its augmented rows
            (what ``SaflexLoss`` passes: fixed shapes, no host synchronisation); the other rows' weights are 1.
    """
    if rule not in _GATED:
        raise ValueError(f"rule must be one of {GATED_RULES}, but got {rule!r}.")
    kind, continuous = _GATED[rule]
    prior_on = rule in ("gated_prior", "gated_hold", "gated_latch")
    previous = state["strength"]
    dtype = torch.promote_types(pi.dtype, torch.float32)
    d, valid = gate_statistic(pi, upstream, reference, mask)
    state = {k: v.to(device=pi.device) for k, v in state.items()}
    state = update_gate(state, d.to(state["mean"].dtype), valid, decay)
    _, se, z = gate_evidence(state)
    s = gate_strength(z, threshold, continuous)
    if rule in ("gated_hold", "gated_latch"):  # on until z < -β (augmented rows help), off until z > β; else held
        held = torch.where(state["weight"] > 0, previous.to(z.dtype), torch.ones_like(z))  # fresh state: on
        s = torch.where(z > threshold, torch.ones_like(z), torch.where(z < -threshold, torch.zeros_like(z), held))
    if rule == "gated_latch":  # once z > β was seen, on for good (until the user resets the state)
        latched = (state["latched"] > 0) | (z > threshold)
        state["latched"] = latched.to(state["latched"].dtype)
        s = torch.where(latched, torch.ones_like(s), s)
    if prior_on:  # no verdict yet (too few steps): on
        s = torch.where(torch.isinf(se), torch.ones_like(s), s)
    state["strength"] = s.to(state["strength"].dtype)
    s = s.to(dtype)
    y = upstream.to(dtype)
    w_soft = soft_weights(kind, pi, y, logits, mask)
    weights = (1 - s) + s * w_soft
    if mask is not None:
        weights = torch.where(mask, weights, torch.ones_like(weights))
    return weights, y.clone(), state
