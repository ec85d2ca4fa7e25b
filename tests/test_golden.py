"""SaflexLoss reproduces its golden file: decisions exactly, floats to a calibrated tolerance (see tests/_golden.py).

``SAFLEX_GOLDEN_EXACT=1`` makes the comparison bit for bit (for refactors on the machine that wrote the file).
"""

from __future__ import annotations

import pytest
import torch

from tests import _golden


@pytest.fixture(scope="module")
def golden():
    return torch.load(_golden.PATH)


@pytest.fixture(scope="module")
def fresh():
    return _golden.generate()


def test_golden_file_covers_every_case(golden, fresh):
    assert sorted(golden) == sorted(fresh)


@pytest.mark.parametrize("key", [c[0] for c in _golden._cases()])
def test_reproduces(golden, fresh, key):
    found = _golden.problems(fresh[key], golden[key], exact=_golden.exact_mode())
    assert not found, f"{key}: " + "; ".join(found)


def test_comparison_catches_a_changed_decision(golden):
    """The tolerant comparison still fails on one flipped weight, one changed label or a drifted parameter."""
    key = "last_layer/margin/default"
    record = golden[key]
    assert not _golden.problems(record, record)
    flipped = dict(record, weights=record["weights"].clone())
    flipped["weights"][0, -1] = 1 - flipped["weights"][0, -1]
    assert any("weights (exact)" in p for p in _golden.problems(flipped, record))
    relabeled = dict(record, targets=record["targets"].roll(1, dims=-1))
    assert any("labels (exact)" in p for p in _golden.problems(relabeled, record))
    drifted = dict(record, **{"param.fc.weight": record["param.fc.weight"] + 1e-3})
    assert any("param.fc.weight: off by" in p for p in _golden.problems(drifted, record))
    rounded = dict(record, loss=record["loss"] * (1 + 1e-6))
    assert not _golden.problems(rounded, record)
    assert _golden.problems(rounded, record, exact=True)
