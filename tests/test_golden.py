"""SaflexLoss reproduces its golden file bit for bit (see tests/_golden.py)."""

from __future__ import annotations

import pytest
import torch

from tests import _golden


@pytest.fixture(scope="module")
def fresh():
    return _golden.generate()


def test_golden_file_covers_every_case(fresh):
    golden = torch.load(_golden.PATH)
    assert sorted(golden) == sorted(fresh)


@pytest.mark.parametrize("key", [c[0] for c in _golden._cases()])
def test_bit_for_bit(fresh, key):
    golden = torch.load(_golden.PATH)[key]
    for name, value in golden.items():
        assert torch.equal(fresh[key][name], value), f"{key}: {name} changed"
