"""Stateful decision rules: a gate that decides *whether* the augmented rows hurt, soft weights that decide *how much*.

Pure maths: tensors in, tensors out; the state is six numbers that the caller keeps, as a dict of 0-d tensors
(:func:`init_state`, what ``SaflexLoss.rule_state`` and its ``state_dict`` show) or packed in one tensor
(:func:`pack_state`, what the per-step functions :func:`gate_step` and :func:`gated_weights` take: a handful of ops a
step). Nothing here reads a tensor back to Python (no ``.item()``, no data-dependent branches), so the gate stays on
the device.

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
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GATED_RULES",
    "P_WEIGHTED_RULES",
    "DEFAULT_DECAY",
    "init_state",
    "check_state",
    "pack_state",
    "unpack_state",
    "gate_statistic",
    "update_gate",
    "gate_evidence",
    "gate_strength",
    "gate_step",
    "soft_weights",
    "gated_targets",
    "gated_weights",
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
P_WEIGHTED_RULES: tuple[str, ...] = tuple(r for r, (kind, _) in _GATED.items() if kind == "p")
"""The gated rules whose soft weights are the model's ``p[y]``: they need only each row's own-label gain ``yᵀΠ``,
not the whole ``Π`` (:func:`gated_weights`; ``SaflexLoss`` with ``method="last_layer"`` then never forms ``Π``)."""
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


def pack_state(state: dict[str, Tensor]) -> Tensor:
    """A gate state as one float32 tensor `(6,)` (in the order of :func:`init_state`'s keys): what the per-step
    functions work on, so that a step updates it with a handful of ops instead of a handful per entry."""
    return torch.stack([state[k].to(torch.float32) for k in _STATE_KEYS])


def unpack_state(packed: Tensor) -> dict[str, Tensor]:
    """The dict of :func:`init_state` from a packed state (0-d views of ``packed``)."""
    return dict(zip(_STATE_KEYS, packed.unbind(), strict=True))


def _masked_sums(gain: Tensor, mask: Tensor | None, reference: Tensor | None) -> tuple[Tensor, Tensor]:
    """``([Σ_aug g, Σ_aug |g|, Σ_clean g], [n_aug, n_aug, n_clean])`` of the own-label gains ``g``."""
    dtype = gain.dtype
    if mask is None:  # every row is augmented
        aug, n = gain, torch.full((), len(gain), dtype=dtype, device=gain.device)
    else:
        aug, n = gain.masked_fill(~mask, 0), mask.sum(dtype=dtype)
    if reference is not None:
        clean_sum, n_clean = reference.to(device=gain.device, dtype=dtype).unbind()
        return torch.stack([aug.sum(), aug.abs().sum(), clean_sum]), torch.stack([n, n, n_clean])
    if mask is None:  # no clean row: no statistic
        zero = torch.zeros((), dtype=dtype, device=gain.device)
        return torch.stack([aug.sum(), aug.abs().sum(), zero]), torch.stack([n, n, zero])
    # the clean rows: the others of the batch; three row sums in one reduction
    return torch.stack([aug, aug.abs(), gain.masked_fill(mask, 0)]).sum(1), torch.stack([n, n, len(gain) - n])


def _statistic(gain: Tensor, mask: Tensor | None = None, reference: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """This step's ``d`` from the own-label gains (NaN or ±inf when the step has no valid statistic) and whether
    every augmented row's gain was finite (a device bool)."""
    sums, counts = _masked_sums(gain, mask, reference)
    # [aug mean, aug mean |g|, clean mean]: without a clamp, so that a step without augmented or clean rows (0 / 0)
    # or with a zero scale (x / 0) gives a non-finite d: the one test of validity.
    aug_mean, scale, clean_mean = (sums / counts).unbind()
    return (aug_mean - clean_mean) / scale, sums[1] < math.inf


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
    d, _ = _statistic(_own_gain(pi, upstream), mask, reference)
    valid = d.abs() < math.inf
    return torch.where(valid, d, 0), valid


def _own_gain(pi: Tensor, upstream: Tensor) -> Tensor:
    dtype = torch.promote_types(pi.dtype, torch.float32)
    return (upstream.to(dtype) * pi.to(dtype)).sum(-1)


# The per-step constants, made once per device (and decay). The update: x ← a·x + c·u₁·u₂ with u₁ = [1, 1, d, d, 1, 1]
# and u₂ = [1, 1, 1, d, 1, 1] for the entries [weight, weight_sq, mean, square, strength, latched]: the same roundings
# as decay·x + (1 − decay)·d·d, entry by entry.
class _Constants(NamedTuple):
    uses_d: Tensor  # bool (2, 6): where u₁ and u₂ are d
    ones: Tensor  # (2, 6)
    one: Tensor  # 0-d constants: torch.where with a Python number is two ops
    zero: Tensor
    inf: Tensor
    strength_entry: Tensor  # bool (6,)


_CONSTANTS: dict[torch.device, _Constants] = {}
_FACTORS: dict[tuple[float, torch.device], tuple[Tensor, Tensor]] = {}


def _constants(device: torch.device) -> _Constants:
    if device not in _CONSTANTS:
        f32 = {"dtype": torch.float32, "device": device}
        _CONSTANTS[device] = _Constants(
            torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool, device=device),
            torch.ones(2, 6, **f32),
            torch.tensor(1.0, **f32),
            torch.tensor(0.0, **f32),
            torch.tensor(math.inf, **f32),
            torch.arange(6, device=device) == 4,
        )
    return _CONSTANTS[device]


def _factors(decay: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """The update's ``a`` (factors of the old state) and ``c`` (of u₁·u₂) for ``decay``."""
    key = (decay, device)
    if key not in _FACTORS:
        c = 1 - decay
        f32 = {"dtype": torch.float32, "device": device}
        _FACTORS[key] = (torch.tensor([decay, decay**2, decay, decay, 1.0, 1.0], **f32),
                         torch.tensor([c, c**2, c, c, 0.0, 0.0], **f32))
    return _FACTORS[key]


def _update(packed: Tensor, d: Tensor, valid: Tensor, decay: float) -> Tensor:
    a, c = _factors(decay, packed.device)
    k = _constants(packed.device)
    u1, u2 = torch.where(k.uses_d, d.to(packed.dtype), k.ones).unbind()
    new = a * packed + c * u1 * u2
    return torch.where(valid, new, packed)  # strength and latched: a = 1, c = 0, kept


def update_gate(state: dict[str, Tensor], d: Tensor, valid: Tensor, decay: float) -> dict[str, Tensor]:
    """The state after one step with statistic ``d`` (unchanged where ``valid`` is False). ``strength`` is kept."""
    return {k: v.clone() for k, v in unpack_state(_update(pack_state(state), d, valid, decay)).items()}


def _evidence(packed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    k = _constants(packed.device)
    zero, inf = k.zero, k.inf
    w, w2 = packed[:2].unbind()
    tiny = torch.finfo(packed.dtype).tiny
    mean, second = (packed[2:4] / w.clamp_min(tiny)).unbind()  # Σw d / Σw, Σw d² / Σw
    var = (second - mean * mean).clamp_min(0)
    n_eff = w * w / w2.clamp_min(tiny)
    enough = (w > 0) & (n_eff >= MIN_EFFECTIVE_STEPS)
    se = torch.where(enough, (var / (n_eff - 1).clamp_min(1e-6)).sqrt(), inf)
    z = torch.where(enough, -mean / se.clamp_min(tiny), zero)
    return mean, se, z


def gate_evidence(state: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, se, z)``: the bias-corrected EMA of ``d``, its standard error and ``z = −mean / se``.

    ``se`` is infinite (and ``z`` 0) until the effective number of steps ``n_eff`` reaches
    :data:`MIN_EFFECTIVE_STEPS`.
    """
    return _evidence(pack_state(state))


def gate_strength(z: Tensor, threshold: float, continuous: bool) -> Tensor:
    """How much the soft weights apply, in ``[0, 1]``: ``1[z > β]``, or ``clamp((z − β/2) / β, 0, 1)``."""
    if continuous:
        return ((z - threshold / 2) / threshold).clamp(0, 1)
    return (z > threshold).to(z.dtype)


def gate_step(gain: Tensor, state: Tensor, *, rule: str, threshold: float, decay: float, mask: Tensor | None = None,
              reference: Tensor | None = None, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the gate from the rows' own-label gains: ``(strength s, new packed state, finite)``.

    The state (:func:`pack_state`) is first updated with this step's statistic (:func:`gate_statistic`; unchanged
    when the step has none), then the gate's strength comes from the evidence (:func:`gate_evidence`,
    :func:`gate_strength`) and the rule's own mode: ``gated_prior`` on before the first verdict, ``gated_hold``
    and ``gated_latch`` as their names say. A step with a non-finite gain on an augmented row (``finite`` False),
    or with ``valid`` False, leaves the whole state as it was.

    Args:
        gain: The rows' own-label gains ``yᵀΠ`` `(n,)`, float32 or wider.
        state: The packed gate state `(6,)` on ``gain``'s device.
        rule: One of :data:`GATED_RULES`.
        threshold: ``β``, in standard errors of the gate's mean.
        decay: ``ρ`` of the exponential weights, in ``(0, 1)``.
        mask: Bool `(n,)`: the augmented rows (``None``: every row, with ``reference``).
        reference: ``[Σ_clean yᵀΠ, number of clean rows]``; ``None``: the rows outside ``mask``.
        valid: Optional 0-d bool: ``False`` keeps the state (``SaflexLoss(reference="batch")`` on a batch without a
            clean row).

    Returns:
        0-d tensors ``s`` (in ``[0, 1]``) and ``finite`` (bool), and the new state `(6,)`.
    """
    if rule not in _GATED:
        raise ValueError(f"rule must be one of {GATED_RULES}, but got {rule!r}.")
    one, zero, inf, strength_entry = _constants(state.device)[2:]
    continuous = _GATED[rule][1]
    old = state
    d, finite = _statistic(gain, mask, reference)
    state = _update(state, d, d.abs() < inf, decay)
    _, se, z = _evidence(state)
    s = gate_strength(z, threshold, continuous)
    if rule in ("gated_hold", "gated_latch"):  # on until z < -β (augmented rows help), off until z > β; else held
        held = torch.where(state[0] > 0, old[4], one)  # fresh state: on
        s = torch.where(z > threshold, one, torch.where(z < -threshold, zero, held))
    if rule == "gated_latch":  # once z > β was seen, on for good (until the user resets the state)
        on = (state[5] > 0) | (z > threshold)
        state = torch.cat([state[:5], on.to(state.dtype)[None]])
        s = torch.where(on, one, s)
    if rule in ("gated_prior", "gated_hold", "gated_latch"):  # no verdict yet (too few steps): on
        s = torch.where(se == inf, one, s)
    keep = finite if valid is None else finite & valid
    return s, torch.where(keep, torch.where(strength_entry, s, state), old), finite


def gated_weights(gain: Tensor, p_own: Tensor, state: Tensor, *, rule: str, threshold: float, decay: float,
                  mask: Tensor | None = None, reference: Tensor | None = None,
                  valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A gated rule whose soft weights are ``p[y]`` (:data:`P_WEIGHTED_RULES`), from the rows' own-label gains:
    ``(weights (n,), new packed state, finite)``; the labels stay the upstream ones.

    What :func:`gated_targets` computes for these rules, without ``Π`` itself: ``w = (1 − s) + s · p[y]``, ``s``
    the gate's strength (:func:`gate_step`). Rows outside ``mask`` get weight 1, and so does every row of a step
    with a non-finite gain on an augmented row (``finite`` False: ``SaflexLoss``'s fallback) or with ``valid``
    False.

    Args:
        gain: The rows' own-label gains ``yᵀΠ`` `(n,)`, float32 or wider.
        p_own: The model's probability of each row's label, ``yᵀ softmax(logits)`` `(n,)`.
        state, rule, threshold, decay, mask, reference, valid: As :func:`gate_step`.
    """
    if rule not in P_WEIGHTED_RULES:
        raise ValueError(f"rule must be one of {P_WEIGHTED_RULES} (the p[y]-weighted gated rules), but got {rule!r}.")
    s, state, finite = gate_step(gain, state, rule=rule, threshold=threshold, decay=decay, mask=mask,
                                 reference=reference, valid=valid)
    s = s.to(p_own.dtype)
    weights = (1 - s) + s * p_own
    ok = finite if valid is None else finite & valid
    one = _constants(state.device).one
    return torch.where(ok if mask is None else mask & ok, weights, one), state, finite


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
    dtype = torch.promote_types(pi.dtype, torch.float32)
    y = upstream.to(dtype)
    packed = pack_state({k: v.to(device=pi.device) for k, v in state.items()})
    s, packed, _ = gate_step(_own_gain(pi, y), packed, rule=rule, threshold=threshold, decay=decay, mask=mask,
                             reference=reference)
    s = s.to(dtype)
    w_soft = soft_weights(_GATED[rule][0], pi, y, logits, mask)
    weights = (1 - s) + s * w_soft
    if mask is not None:
        weights = torch.where(mask, weights, 1)
    new = {k: v.to(state[k].dtype) for k, v in unpack_state(packed).items()}
    return weights, y.clone(), new
