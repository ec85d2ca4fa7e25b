"""benchmarks/paper_scale.py: the GPU run's command works end to end on CPU with --quick (tiny, a few steps)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("kornia")
pytest.importorskip("timm")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_every_row_and_the_machine(tmp_path):
    fm = Path("/usr/share/datasets/fashion-mnist")
    if not fm.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import paper_scale
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    doc = paper_scale.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "paper_scale_quick.json").read_text())
    assert list(saved["rows"]) == list(paper_scale.ROWS)
    assert saved["machine"] and saved["settings"]["quick"] and saved["settings"]["epochs"] >= 1
    assert all(0.0 <= r["score"] <= 1.0 for r in doc["runs"])
    assert "delta_vs_train_val" in saved["rows"]["SAFLEX default"]
    assert (tmp_path / "paper_scale_quick.png").stat().st_size > 0
