"""The demo (``make demo``) runs end to end in a tiny mode and writes its pictures and results."""

from __future__ import annotations

import importlib.util
import json
import os
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
    on_disk = json.loads((tmp_path / "demo_results.json").read_text())
    assert on_disk["test_accuracy"] == summary["test_accuracy"]
    assert on_disk["smoke_test"] is True and "cores" in on_disk["machine"]  # says it is a smoke test, names the machine
    # the spread over seeds: every seed's accuracy per run (3 seeds by default), and the time it took
    assert on_disk["seeds"] == [0, 1, 2]
    assert all(len(a) == 3 for a in on_disk["test_accuracy_per_seed"].values())
    assert on_disk["cpu_s"] > 0 and on_disk["wall_s"] > 0


def test_threads_come_from_the_free_cores() -> None:
    demo = _load_demo()
    threads, why = demo.choose_threads("auto")
    assert 1 <= threads <= (os.cpu_count() or 1) and "free" in why
    assert demo.choose_threads("3") == (3, "as requested")


def test_kept_is_neutral_and_the_caption_says_what_saflex_does_not_detect() -> None:
    demo = _load_demo()
    assert demo._KIND_STYLE["kept"][0] in ("dimgray", "gray", "darkgray", "grey")
    assert "does not detect: destroyed images" in demo.NOT_DETECTED


def test_decision_kinds_and_sample_grid_in_proportion(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import torch

    from saflex_data import SaflexTarget

    demo = _load_demo()
    aug = torch.tensor([False, True, True, True, True])
    upstream = torch.tensor([0, 1, 2, 3, 4])
    targets = torch.nn.functional.one_hot(torch.tensor([0, 1, 5, 3, 4]), 10).float()
    last = {"is_augmented": aug, "weights": torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0]), "targets": targets,
            "upstream": upstream}  # fmt: skip
    assert demo.decision_kinds(last) == ["kept", "relabeled", "dropped", "kept"]
    target = SaflexTarget(upstream, aug)
    demo.plot_samples(tmp_path / "grid.png", torch.zeros(5, 1, 28, 28), target, last,
                      {"noaug": [90.0, 91.0, 89.5], "saflex": [91.0, 90.0, 90.5]}, quick=True, n=4)  # fmt: skip
    assert (tmp_path / "grid.png").stat().st_size > 0


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
