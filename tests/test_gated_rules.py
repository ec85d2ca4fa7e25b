"""The gated rules (``saflex_data.rules``): the gate's statistics, its soft weights, and its state in ``SaflexLoss``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saflex_data.functional as SF
from saflex_data import SaflexLoss, SaflexTarget
from saflex_data import rules as R


def _state_after(ds: list[float], decay: float) -> dict[str, torch.Tensor]:
    state = R.init_state()
    for d in ds:
        state = R.update_gate(state, torch.tensor(d), torch.tensor(True), decay)
    return state


# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------
def test_rule_config_is_frozen_and_checked():
    r = SF.Rule("gated")
    assert r.stateful and r.beta == R.DEFAULT_THRESHOLD and r.decay == R.DEFAULT_DECAY
    assert repr(SF.Rule("margin")) == "Rule(name='margin', beta=1.5, tau=0.01, normalize='batch_max')"
    assert "decay=0.9" in repr(SF.Rule("gated_soft", decay=0.9))
    assert not SF.Rule("margin").stateful
    with pytest.raises(ValueError, match="decay is a setting of the gated rules"):
        SF.Rule("margin", decay=0.9)
    with pytest.raises(ValueError, match=r"decay of rule 'gated' must be a float in \(0, 1\), but got 1.0"):
        SF.Rule("gated", decay=1.0)
    with pytest.raises(ValueError, match="threshold in standard errors, a finite float > 0, but got -1"):
        SF.Rule("gated", beta=-1)
    with pytest.raises(TypeError, match="keeps state across steps"):
        SF.Rule("gated")(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(AttributeError):
        r.beta = 3.0  # frozen


# ----------------------------------------------------------------------------------------------------------------
# the gate's statistics
# ----------------------------------------------------------------------------------------------------------------
def test_statistic_is_the_normalised_difference_of_own_label_gains():
    pi = torch.tensor([[1.0, -1.0], [-2.0, 0.5], [0.5, 0.0]])
    up = F.one_hot(torch.tensor([0, 0, 1]), 2).float()  # gains 1, -2, 0
    reference = torch.tensor([3.0, 2.0])  # clean mean 1.5
    d, valid = R.gate_statistic(pi, up, reference)
    assert bool(valid)
    torch.testing.assert_close(d, torch.tensor((-1 / 3 - 1.5) / 1.0), rtol=1e-6, atol=0)
    d, valid = R.gate_statistic(pi, up, torch.tensor([0.0, 0.0]))  # no clean row: not valid, no update
    assert not bool(valid) and float(d) == 0.0
    state = R.update_gate(R.init_state(), d, valid, 0.9)
    assert all(float(v) == 0.0 for v in state.values())


def test_evidence_is_the_bias_corrected_weighted_mean_and_its_standard_error():
    g = torch.Generator().manual_seed(0)
    ds = (torch.randn(40, generator=g, dtype=torch.float64) * 0.3 - 0.2).tolist()
    decay = 0.9
    mean, se, z = R.gate_evidence(_state_after(ds, decay))
    w = torch.tensor([(1 - decay) * decay ** (len(ds) - 1 - t) for t in range(len(ds))], dtype=torch.float64)
    x = torch.tensor(ds, dtype=torch.float64)
    m = (w * x).sum() / w.sum()
    var = (w * (x - m) ** 2).sum() / w.sum()
    n_eff = w.sum() ** 2 / (w**2).sum()
    torch.testing.assert_close(mean.double(), m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(se.double(), (var / (n_eff - 1)).sqrt(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z.double(), -m / (var / (n_eff - 1)).sqrt(), rtol=1e-4, atol=1e-5)


def test_no_verdict_before_the_minimum_effective_steps():
    _, se, z = R.gate_evidence(_state_after([-1.0, -1.1, -0.9], 0.95))
    assert math.isinf(float(se)) and float(z) == 0.0


def test_gate_turns_on_only_for_a_consistently_negative_statistic():
    decay, beta = 0.95, 2.0
    g = torch.Generator().manual_seed(1)
    harmful = _state_after((torch.randn(60, generator=g) * 0.2 - 0.3).tolist(), decay)
    neutral = _state_after((torch.randn(60, generator=g) * 0.2).tolist(), decay)
    helpful = _state_after((torch.randn(60, generator=g) * 0.2 + 0.3).tolist(), decay)
    on = [float(R.gate_strength(R.gate_evidence(s)[2], beta, False)) for s in (harmful, neutral, helpful)]
    assert on == [1.0, 0.0, 0.0]
    soft = R.gate_strength(torch.tensor([0.0, 1.0, 2.0, 3.0, 9.0]), beta, True)
    assert soft.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_weights_while_on_are_soft_and_off_are_ones():
    g = torch.Generator().manual_seed(2)
    pi, logits = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    up = F.one_hot(torch.randint(0, 4, (16,), generator=g), 4).float()
    p = (up * logits.softmax(-1)).sum(-1)
    gain = (up * pi).sum(-1)
    ref_bad = torch.stack([gain.mean() + gain.abs().mean(), torch.tensor(1.0)])  # this step's statistic: -1
    state = _state_after([-1.0 + 0.02 * (i % 2) for i in range(20)], 0.95)
    for rule in R.GATED_RULES:
        w, labels, new = R.gated_targets(pi, up, state, rule=rule, threshold=2.0, decay=0.95, reference=ref_bad,
                                         logits=logits)
        assert float(new["strength"]) == 1.0 or rule == "gated_soft"
        assert bool(((w >= 0) & (w <= 1)).all()), rule
        torch.testing.assert_close(labels.sum(-1), torch.ones(16))
        if rule == "gated":
            torch.testing.assert_close(w, p)
            assert torch.equal(labels, up)
        if rule == "gated_product":
            torch.testing.assert_close(w, p * R.soft_weights("margin", pi, up, logits))
    w, labels, new = R.gated_targets(pi, up, R.init_state(), rule="gated", threshold=2.0, decay=0.95,
                                     reference=torch.tensor([0.0, 1.0]), logits=logits)
    assert torch.equal(w, torch.ones(16)) and torch.equal(labels, up) and float(new["strength"]) == 0.0


def test_per_step_code_reads_nothing_back_to_python():
    """No host sync in the per-step functions: none of them names item/nonzero/tolist/bool/float/int."""
    for fn in (R.gate_statistic, R.update_gate, R.gate_evidence, R.gate_strength, R.soft_weights, R.gated_targets):
        names = set(fn.__code__.co_names)
        assert not names & {"item", "nonzero", "tolist", "bool", "float", "int", "numpy"}, fn.__name__


# ----------------------------------------------------------------------------------------------------------------
# the state in SaflexLoss
# ----------------------------------------------------------------------------------------------------------------
def _setup(rule="gated", method="last_layer", seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(seed + 1)
    val = [(torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(4)]
    criterion = SaflexLoss(model, val, method=method, rule=SF.Rule(rule, beta=1.0, decay=0.8), seed=3)
    return model, criterion


def _batches(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(5, 3, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(24, 5, generator=g)
        y = (x @ w_true).argmax(-1)
        is_aug = torch.arange(24) >= 8
        y = torch.where(is_aug & (torch.rand(24, generator=g) < 0.7), (y + 1) % 3, y)  # most augmented rows wrong
        out.append((x, SaflexTarget(y, is_aug)))
    return out


def _steps(model, criterion, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    record = []
    for x, target in batches:
        logits = criterion.forward_train(x) if criterion.method == "single_pass" else model(x)
        loss = criterion(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        record.append((criterion.last_step["weights"].clone(), dict(criterion.rule_state)))
    return record, opt


@pytest.mark.parametrize("method", ["last_layer", "jvp", "single_pass"])
def test_gate_turns_on_in_training_and_resume_is_bit_identical(method):
    batches = _batches(30)
    model, criterion = _setup(method=method)
    full, _ = _steps(model, criterion, batches)
    assert any(float(st["strength"]) == 1.0 for _, st in full), "the gate never turned on: the test proves little"
    assert any(bool((w < 1).any()) for w, _ in full)

    model, criterion = _setup(method=method)
    _, opt = _steps(model, criterion, batches[:12])
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in criterion.state_dict().items()}
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    model2, criterion2 = _setup(method=method)  # a fresh run whose weights and gate come from the checkpoint
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    model2.load_state_dict(model_state)
    criterion2.load_state_dict(saved)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.2)
    opt2.load_state_dict(opt_state)
    resumed = []
    for x, target in batches[12:]:
        logits = criterion2.forward_train(x) if method == "single_pass" else model2(x)
        loss = criterion2(logits, target)
        opt2.zero_grad()
        loss.backward()
        opt2.step()
        resumed.append((criterion2.last_step["weights"].clone(), dict(criterion2.rule_state)))
    for (w, st), (w2, st2) in zip(full[12:], resumed, strict=True):
        assert torch.equal(w, w2)
        assert all(torch.equal(st[k], st2[k]) for k in st)


def test_state_is_reset_only_by_the_user():
    model, criterion = _setup()
    _steps(model, criterion, _batches(10))
    before = dict(criterion.rule_state)
    criterion.reset_stats()
    criterion.enabled = False
    x, target = _batches(1, seed=7)[0]
    criterion(model(x), target)  # disabled: plain cross-entropy, the gate untouched
    model.eval()
    criterion.enabled = True
    criterion(model(x), target)  # eval mode: plain, untouched
    assert all(torch.equal(before[k], criterion.rule_state[k]) for k in before)
    criterion.reset_rule_state()
    assert all(float(v) == 0.0 for v in criterion.rule_state.values())
    assert SaflexLoss(model, [(x, target.labels)], rule="margin").rule_state is None  # stateless rules carry none


def test_clean_rows_gain_comes_from_the_same_closed_form():
    """One step of the loss moves the gate exactly as the rule on the last_layer Π of the whole batch says."""
    model, criterion = _setup()
    x, target = _batches(1)[0]
    h = model[:-1](x)
    logits = model[-1](h)
    criterion(logits, target)  # draws the validation batch and caches the signal
    gw, gb = criterion._signal["2.weight"], criterion._signal["2.bias"]
    pi = SF.last_layer_inner_products(h.detach(), logits.detach(), gw, gb)
    up = F.one_hot(target.labels, 3).float()
    d, valid = R.gate_statistic(pi, up, mask=target.is_augmented)
    gain = pi.gather(1, target.labels[:, None]).squeeze(1)
    aug, clean = target.is_augmented, ~target.is_augmented
    by_hand = (gain[aug].mean() - gain[clean].mean()) / gain[aug].abs().mean()
    torch.testing.assert_close(d, by_hand, rtol=1e-5, atol=1e-6)
    expected = R.update_gate(R.init_state(), d, valid, 0.8)
    for k in ("weight", "mean", "square"):
        torch.testing.assert_close(criterion.rule_state[k], expected[k], rtol=1e-6, atol=1e-7)


def test_settings_carry_the_decay_for_the_rank_check():
    _, criterion = _setup()
    assert criterion.settings()["decay"] == 0.8 and criterion.settings()["rule"] == "gated"


def test_contrastive_loss_refuses_a_stateful_rule():
    from saflex_data import SaflexContrastiveLoss

    with pytest.raises(ValueError, match="stateless rule for SaflexContrastiveLoss.*'gated'"):
        SaflexContrastiveLoss(nn.Linear(2, 2), [], torch.zeros(2, 2), rule="gated")
