"""Arguments removed in 0.2 fail with a TypeError that names what replaced them; one set of defaults for both losses."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import saflex_data
from saflex_data import Rule, SaflexContrastiveLoss, SaflexLoss, SaflexTarget

VAL = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
PROMPTS = torch.arange(5)


def _loss(**kwargs):
    return SaflexLoss(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), VAL, **kwargs)


def _contrastive(**kwargs):
    towers = (nn.Linear(4, 3), nn.Embedding(5, 3))
    return SaflexContrastiveLoss(towers, [(torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 0]))], PROMPTS, **kwargs)


REMOVED = [
    ({"beta": 2.0}, r'SaflexLoss\(beta=2.0\) was removed in 0.2: a rule and its settings are one value, '
                    r'rule=Rule\("margin", beta=2.0\) \(from saflex_data import Rule\)\.$'),
    ({"tau": None}, r'SaflexLoss\(tau=None\) was removed in 0.2: .* rule=Rule\("paper", tau=None\)'),
    ({"beta": 4.0, "normalize": "row_max"},
     r"SaflexLoss\(beta=4.0, normalize='row_max'\) was removed in 0.2: .* rule=Rule\(\"paper\", beta=4.0, "
     r"normalize='row_max'\)"),
    ({"precondition": True}, r"SaflexLoss\(precondition=...\) was removed in 0.2: the Adam-preconditioned tangent "
                             r"measured worse .* See CHANGELOG.md, 0.2.0\.$"),
    ({"val_mode": "train"}, r"SaflexLoss\(val_mode=...\) was removed in 0.2: the validation pass always runs in eval "
                            r"mode .* See CHANGELOG.md, 0.2.0\.$"),
    ({"val_batches": 4}, r"SaflexLoss\(val_batches=...\) was removed in 0.2: pass a validation loader with a larger "
                         r"batch .* or use val_ema=0.9\. See CHANGELOG.md, 0.2.0\.$"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, match", REMOVED, ids=[",".join(k) for k, _ in REMOVED])
def test_removed_argument_names_its_replacement(kwargs, match):
    with pytest.raises(TypeError, match=match):
        _loss(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta": 0.5}, r'SaflexContrastiveLoss\(beta=0.5\) was removed in 0.2: .* rule=Rule\("margin", beta=0.5\)'),
        ({"precondition": True}, r"SaflexContrastiveLoss\(precondition=...\) was removed in 0.2: .*CHANGELOG.md"),
        ({"val_mode": "train"}, r"SaflexContrastiveLoss\(val_mode=...\) was removed in 0.2: .*eval mode"),
    ],
)
def test_contrastive_removed_argument_names_its_replacement(kwargs, match):
    with pytest.raises(TypeError, match=match):
        _contrastive(**kwargs)


def test_the_replacement_named_in_the_message_works():
    assert _loss(rule=Rule("margin", beta=2.0)).rule.beta == 2.0
    assert _contrastive(rule=Rule("margin", beta=0.5)).rule.beta == 0.5


def test_other_unknown_keywords_get_pythons_message():
    with pytest.raises(TypeError, match=r"^SaflexLoss.__init__\(\) got an unexpected keyword argument 'betta'$"):
        _loss(betta=1.0)


def test_signatures_stay_readable():
    # the check wraps __init__ without changing what inspect, pdoc and IDEs show
    for cls in (SaflexLoss, SaflexContrastiveLoss):
        params = inspect.signature(cls.__init__).parameters
        assert "rule" in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()), cls


def test_one_set_of_defaults():
    # SaflexContrastiveLoss decides with the same default rule as SaflexLoss
    assert inspect.signature(SaflexLoss.__init__).parameters["rule"].default == "margin"
    assert inspect.signature(SaflexContrastiveLoss.__init__).parameters["rule"].default == "margin"
    assert _loss().rule == _contrastive().rule == Rule("margin")
    assert saflex_data.Rule is saflex_data.functional.Rule


def test_stats_counts_are_ints():
    criterion = _loss()
    model = criterion.model
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    criterion(model(x), SaflexTarget(y, torch.arange(6) >= 3)).backward()
    stats = criterion.stats
    assert stats["step"] == 1 and type(stats["step"]) is int
    assert type(stats["nonfinite_steps"]) is int
    assert all(type(v) is float for k, v in stats.items() if k not in ("step", "nonfinite_steps"))
    contrastive = _contrastive()
    contrastive(torch.randn(4, 4), torch.tensor([0, 1, 2, 3]), torch.tensor([False, True, True, False])).backward()
    assert type(contrastive.stats["step"]) is int


def test_version_is_0_2_0():
    assert saflex_data.__version__ == "0.2.0"
