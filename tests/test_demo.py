"""The demo (``make demo``) runs end to end in a tiny mode and writes its pictures and results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_demo():
    spec = importlib.util.spec_from_file_location("saflex_demo", ROOT / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_demo_quick_writes_pictures_and_table(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    pytest.importorskip("torchvision")
    demo = _load_demo()
    summary = demo.main(["--quick", "--steps", "3", "--threads", "1", "--out", str(tmp_path)])
    for name in ("demo_samples.png", "demo_op_rates.png", "demo_results.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert set(summary["test_accuracy"]) == {"noaug", "upstream", "saflex"}
    assert all(0.0 <= a <= 100.0 for a in summary["test_accuracy"].values())
    assert summary["runs"]["saflex"]["steps"] == 3
    # every op of the strong upstream is reported with rates in [0, 1]
    ops = summary["op_stats"]
    assert ops and all(0.0 <= s["kept"] <= 1.0 and 0.0 <= s["relabeled"] <= 1.0 for s in ops.values())
    assert set(ops) <= set(demo.strong_upstream().op_names)
    assert json.loads((tmp_path / "demo_results.json").read_text())["test_accuracy"] == summary["test_accuracy"]


def test_strong_upstream_ops_are_destructive_where_intended() -> None:
    pytest.importorskip("torchvision")
    import torch

    demo = _load_demo()
    x = torch.zeros(1, 28, 28, dtype=torch.uint8)
    x[0, 2:10, 5:9] = 255  # a mark in the top-left
    assert int(demo.rotate180(x)[0, 27 - 5, 27 - 6]) == 255  # moved to the bottom-right
    assert torch.equal(demo.vertical_flip(demo.vertical_flip(x)), x)
    names = demo.strong_upstream().op_names
    assert "rotate 180°" in names and "mild affine" in names and len(names) == 6
