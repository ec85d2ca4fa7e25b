"""The benchmark scripts' smallest modes on synthetic or tiny bundled data (fast), and the README table maker."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need their module registered
    spec.loader.exec_module(module)
    return module


def _payload(dataset: str, metric: str = "accuracy") -> dict:
    rows = [
        {"name": "NoAug", "upstream": None, "saflex": None, "scores": [70.0, 72.0], "train_on_val": False},
        {"name": "Up", "upstream": "Up", "saflex": None, "scores": [80.0, 82.0], "train_on_val": False},
        {"name": "Up (train ∪ val)", "upstream": "Up", "saflex": None, "scores": [81.0, 81.0], "train_on_val": True},
        {"name": "SAFLEX[jvp]+Up", "upstream": "Up", "saflex": "jvp", "scores": [83.0, 85.0], "train_on_val": False},
    ]
    return {"dataset": dataset, "metric": metric, "machine": "m", "versions": {}, "settings": {}, "rows": rows}


def test_make_readme_tables_deltas(tmp_path: Path) -> None:
    (tmp_path / "accuracy_toy.json").write_text(json.dumps(_payload("toy")))
    (tmp_path / "overhead.json").write_text(json.dumps(
        {"machine": "m", "torch": "2", "plain_ms": 100.0, "ratio": {"jvp": 1.5, "last_layer": 1.05},
         "ratio_mean": {"jvp": 1.6}, "peak_rss_ratio": {"jvp": 1.2},
         "setting": {"variants": {"jvp": "SaflexLoss(method='jvp'), validation batch 32"}}}))  # fmt: skip
    (tmp_path / "scaling.json").write_text(json.dumps(
        {"machine": "m", "settings": {"paths": ["plain", "last_layer"], "saflex": "s", "reps": 3,
                                      "models": {"mlp": "d"}},
         "rows": [{"model": "mlp", "batch": "64+64", "classes": 10, "path": "last_layer", "ratio": 1.02,
                   "memory_ratio": 1.1}]}))  # fmt: skip
    text = _load("make_readme_tables").main(["--results", str(tmp_path)])
    assert "| **SAFLEX[jvp]+Up** | 84.00 ± 1.41 | +3.00 | +3.00 |" in text
    assert "| library defaults | jvp | 1 | 1/1 | +3.00 | 1/1 | +3.00 |" in text
    assert "| jvp | `SaflexLoss(method='jvp')`, validation batch 32 | 1.50× | 1.60× |  | 1.20× |" in text
    assert "| last_layer |  | 1.05× |  |  |  |" in text
    assert "| mlp | 64+64 | 10 | 1.02× | 1.10× |" in text


def test_train_run_saflex_tabular_synthetic() -> None:
    common = _load("common")
    torch.manual_seed(0)
    x = torch.cat([torch.randn(96, 3), torch.randint(0, 4, (96, 1)).float()], 1)
    y = (x[:, 0] > 0).long()
    model = common.TabularMLP(3, [4], 2, hidden=16)
    cfg = common.RunConfig(epochs=2, batch_size=32, saflex="last_layer", val_batch_size=16)
    model, info = common.train_run(model, x[:64], y[:64], config=cfg, augment=common.TabularCutMix(0.3, [3]),
                                   prepare=lambda t: t, val=(x[64:], y[64:]), seed=0)  # fmt: skip
    assert info["steps"] == 4 and 0.0 <= info["kept_fraction"] <= 1.0
    proba = common.predict_proba(model, x, lambda t: t)
    assert proba.shape == (96, 2) and 0.0 <= common.score(proba, y, "auroc") <= 100.0
    with pytest.raises(ValueError, match="metric must be 'accuracy' or 'auroc'"):
        common.score(proba, y, "f1")


def test_resnet18_28_shapes() -> None:
    pytest.importorskip("timm")
    common = _load("common")
    for width, stride in ((8, 1), (8, 2)):
        model = common.resnet18_28(10, in_chans=1, width=width, stem_stride=stride)
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (stride, stride)


def test_accuracy_tabular_smallest_mode_schema(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    tab = _load("accuracy_tabular")
    (payload,) = tab.main(["--datasets", "wine", "--seeds", "1", "--epochs", "1", "--threads", "1",
                           "--out", str(tmp_path)])  # fmt: skip
    on_disk = json.loads((tmp_path / "accuracy_wine.json").read_text())
    assert on_disk["dataset"] == "wine" and on_disk["metric"] == "accuracy"
    assert {"machine", "versions", "settings", "rows"} <= set(on_disk)
    assert (tmp_path / "accuracy_wine.png").stat().st_size > 0
    for r in on_disk["rows"]:
        assert set(r) >= {"name", "upstream", "saflex", "scores", "train_on_val"}
        assert r["saflex"] in (None, "jvp", "last_layer") and len(r["scores"]) == 1
    assert any(r["train_on_val"] and r["upstream"] for r in on_disk["rows"])
    assert payload["rows"][0]["upstream"] is None  # NoAug


def test_overhead_smallest_mode_schema(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("matplotlib")
    over = _load("overhead")
    variants = "jvp,jvp_frozen_stats,last_layer,last_layer@ema0.9,jvp_frozen_stats@every2"
    over.main(["--quick", "--width", "8", "--steps", "1", "--warmup", "0", "--threads", "1", "--no-memory",
               "--no-agreement", "--variants", variants, "--out", str(tmp_path)])  # fmt: skip
    o = json.loads((tmp_path / "overhead.json").read_text())
    assert set(o["ratio"]) == set(variants.split(",")) and o["plain_ms"] > 0
    assert all(r > 0 for r in o["ratio"].values()) and set(o["ratio_mean"]) == set(o["ratio"])
    assert "val_ema" in o["setting"]["variants"]["last_layer@ema0.9"]
    assert (tmp_path / "overhead.png").stat().st_size > 0


@pytest.mark.parametrize("script", ["overhead", "scaling"])
def test_benchmark_argument_errors(script: str, capsys) -> None:
    module = _load(script)
    bad = ["--variants", "plain,jvp@often"] if script == "overhead" else ["--paths", "plain,meta"]
    with pytest.raises(SystemExit):
        module.main(bad)
    assert "unknown" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            module.main(["--device", "cuda"])
        assert "CUDA is not available" in capsys.readouterr().err


def test_scaling_quick_mode_schema(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    payload = _load("scaling").main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "scaling.json").read_text())
    assert on_disk["complete"] and on_disk["machine"] == payload["machine"]
    cells = {(r["model"], r["classes"], r["batch"]) for r in on_disk["rows"]}
    assert cells == {("mlp", 10, "16+16"), ("mlp", 100, "16+16")}
    paths = {r["path"] for r in on_disk["rows"]}
    # jvp_frozen_stats: BatchNorm models only
    assert paths == {"plain", "val_forward", "last_layer", "jvp", "small_loss", "l2r"}
    assert all(r["ratio"] > 0 for r in on_disk["rows"])
    assert (tmp_path / "scaling.png").stat().st_size > 0
