"""The training step's hot path: host synchronisations and aten ops counted on the CPU, and the
fixed-shape (masked) rule against the rule on the selected rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import saflex_data._math as M
from saflex_data import SaflexLoss, SaflexTarget
from saflex_data.functional import Rule, saflex_targets
from tests._dispatch_count import count

K = 5
B = 24


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, K))


def _val() -> list:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, K, (16,), generator=g))]


def _target(seed: int, soft: bool = False) -> SaflexTarget:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (B,), generator=g)
    if soft:
        labels = torch.softmax(torch.randn(B, K, generator=g), -1)
    aug = torch.rand(B, generator=g) < 0.6
    op = torch.where(aug, torch.randint(0, 3, (B,), generator=g), -1)
    return SaflexTarget(labels, aug, op=op, op_names=("a", "b", "c"))


def _steps(method: str, options: dict, steps: int = 3, soft: bool = False):
    """Run ``steps`` training steps; count the last loss call (and ``forward_train``) and its backward."""
    model = _model().train()
    criterion = SaflexLoss(model, None if options.get("reference") == "batch" else _val(), method=method, **options)
    for step in range(steps):
        x = torch.randn(B, 12, generator=torch.Generator().manual_seed(10 + step))
        target = _target(step, soft)

        def call(x=x, target=target):
            logits = criterion.forward_train(x) if method == "single_pass" else model(x)
            return criterion(logits, target)

        if step < steps - 1:
            call().backward()
            continue
        loss, counted = count(call) if method == "single_pass" else (None, None)
        if loss is None:
            logits = model(x)
            loss, counted = count(criterion, logits, target)
        _, backward = count(loss.backward)
    return criterion, counted, backward


@pytest.mark.parametrize(
    ("method", "options", "allowed"),
    [
        ("last_layer", {}, 0),
        ("last_layer", {"reference": "batch"}, 0),
        ("last_layer", {"rule": "gain_auto"}, 0),
        ("last_layer", {"rule": "margin_fix", "val_every": 2, "val_ema": 0.5}, 0),
        ("single_pass", {}, 0),
        ("jvp", {}, 1),  # the augmented rows' indices: the JVP runs over those rows only
        ("jvp_frozen_stats", {}, 1),
        ("last_layer", {"rule": "paper"}, 1),  # Gumbel rules draw one noise row per augmented row: their count
    ],
)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_a_training_step_after_the_first_does_not_synchronise(method, options, allowed, soft):
    criterion, counted, backward = _steps(method, options, soft=soft)
    assert len(counted.syncs) <= allowed, counted.syncs
    assert backward.syncs == []
    assert 0 <= criterion.stats["kept_fraction"] <= 1  # the statistics are read (and synchronise) on demand
    assert sum(v["count"] for v in criterion.op_stats().values()) > 0


def test_the_first_step_checks_the_labels_and_a_new_shape_checks_again():
    model = _model().train()
    criterion = SaflexLoss(model, _val())
    x = torch.randn(B, 12)
    criterion(model(x), _target(0)).backward()
    bad = _target(1)
    bad.labels[0] = K  # out of range, same shape: not read on the host again (CPU: scatter refuses it)
    with pytest.raises(RuntimeError):
        criterion(model(x), bad)
    short = SaflexTarget(bad.labels[:10], bad.is_augmented[:10])  # a new shape: checked, with the usual message
    with pytest.raises(ValueError, match=r"target labels must be class indices in \[0, 5\)"):
        criterion(model(x[:10]), short)


@pytest.mark.parametrize("rule", M.RULES)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_masked_rule_decides_as_the_rule_on_the_selected_rows(rule, soft):
    g = torch.Generator().manual_seed(7)
    pi = torch.randn(30, K, generator=g, dtype=torch.float64)
    mask = torch.rand(30, generator=g) < 0.5
    labels = torch.softmax(torch.randn(30, K, generator=g), -1).double() if soft else torch.randint(0, K, (30,))
    logits = torch.randn(30, K, generator=g, dtype=torch.float64)
    r = Rule(rule)
    pi_other = torch.where(mask[:, None], pi, 0)  # rows outside the mask: zero, as the loss passes them
    w_sub, y_sub = saflex_targets(pi[mask], labels[mask], rule=rule, beta=r.beta, tau=r.tau,
                                  generator=torch.Generator().manual_seed(1), logits=logits[mask])
    upstream = M.as_probabilities(labels, K, torch.float64)
    w, y = r.decide(pi_other, upstream, mask, generator=torch.Generator().manual_seed(1), logits=logits)
    torch.testing.assert_close(w[mask], w_sub, rtol=0, atol=0)
    torch.testing.assert_close(y[mask], y_sub, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_masked_rule_with_few_rows(n):
    mask = torch.arange(6) < n
    pi = torch.randn(6, K, dtype=torch.float64) * mask[:, None]
    upstream = M.as_probabilities(torch.zeros(6, dtype=torch.long), K, torch.float64)
    for rule in M.RULES:
        w, y = Rule(rule).decide(pi, upstream, mask, generator=torch.Generator().manual_seed(0), logits=pi)
        if n:
            w_sub, y_sub = saflex_targets(pi[mask], torch.zeros(n, dtype=torch.long), rule=rule,
                                          generator=torch.Generator().manual_seed(0), logits=pi[mask])
            torch.testing.assert_close(w[mask], w_sub, rtol=0, atol=0)
            torch.testing.assert_close(y[mask], y_sub, rtol=1e-12, atol=1e-12)


# What a last_layer loss call costs beyond the validation forward, in aten ops (counted from Python: a multi-tensor
# op counts once). The target was 40; 143 in 0.2.0-dev before the hot-path work (benchmarks/hot_path.py has
# the breakdown). The count does not depend on B or K.
# rule="margin" (the default before the gated rules): 54. The gated default (rule="gated_prior"): 85, of which
# about 40 are the gate's scalar bookkeeping on its packed (6,) state (0-d tensors; bit-identical to the rule as it
# was chosen, so not fused further); it was 161 before the gate read only the own-label gains.
LAST_LAYER_OPS = 56
GATED_LAST_LAYER_OPS = 87


@pytest.mark.parametrize("classes", [5, 100])
@pytest.mark.parametrize("rule", ["margin", "gated_prior"])
def test_last_layer_call_costs_a_fixed_number_of_ops_beyond_the_validation_forward(classes, rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, classes)).train()
    val_x, val_y = torch.randn(16, 12), torch.arange(16) % classes
    criterion = SaflexLoss(model, [(val_x, val_y)], rule=rule)
    target = SaflexTarget(torch.arange(B) % classes, torch.arange(B) >= B // 3)
    for _ in range(2):
        criterion(model(torch.randn(B, 12)), target).backward()
    logits = model(torch.randn(B, 12))
    _, counted = count(criterion, logits, target)
    model.eval()
    with torch.no_grad():
        _, forward = count(model, val_x)
    assert counted.syncs == []
    budget = LAST_LAYER_OPS if rule == "margin" else GATED_LAST_LAYER_OPS
    assert counted.total - forward.total <= budget, counted.ops


@pytest.mark.parametrize("method", ["last_layer", "jvp"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_own_label_gains_match_the_float64_reference(method, soft):
    """What the default rule reads instead of ``Π``: each row's ``yᵀΠ`` (without forming ``Π`` for last_layer) and
    ``p[y]``, against per-sample float64 autograd."""
    from saflex_data.functional import validation_gradient
    from tests._reference import reference_inner_products

    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, K)).double().train()
    x, xv = torch.randn(B, 12, generator=g, dtype=torch.float64), torch.randn(16, 12, generator=g, dtype=torch.float64)
    yv = torch.randint(0, K, (16,), generator=g)
    labels = torch.softmax(torch.randn(B, K, generator=g, dtype=torch.float64), -1) if soft else torch.arange(B) % K
    upstream = M.as_probabilities(labels, K, torch.float64)
    mask = torch.arange(B) >= B // 3
    criterion = SaflexLoss(model, [(xv, yv)], method=method)
    logits = model(x)
    signal = validation_gradient(model, xv, yv, temperature=criterion.val_temperature)
    if method == "last_layer":
        signal = {n: v for n, v in signal.items() if n.startswith("2.")}  # the classifier's block
    gain, p_own = criterion._method.own_label_gains(criterion._method.capture_of(logits), logits, mask, signal,
                                                    upstream)
    reference = (upstream * reference_inner_products(model, x, signal)).sum(-1)
    rel = (gain[mask] - reference[mask]).abs().max() / reference[mask].abs().max()
    assert rel <= 1e-10, f"relative error {rel:.3g}"
    torch.testing.assert_close(p_own, (upstream * torch.softmax(logits.detach(), -1)).sum(-1), rtol=1e-12, atol=0)
