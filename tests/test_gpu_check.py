"""benchmarks/gpu_check.py: the parts that run without a GPU (the message, JUnit parsing, flag detection)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

sys.path.pop(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_exits_with_a_clear_message(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == gpu_check.NO_CUDA and not out.exists()


def test_parse_junit(tmp_path: Path) -> None:
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="tests.a" name="t1" time="0.5"/>'
        '<testcase classname="tests.a" name="t2" time="0.1"><failure message="boom">trace</failure></testcase>'
        '<testcase classname="tests.b" name="t3"><skipped message="no"/></testcase></testsuite></testsuites>'
    )
    result = gpu_check.parse_junit(xml)
    assert result["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert result["tests"][1] == {"test": "tests.a::t2", "outcome": "failed", "seconds": 0.1, "message": "boom"}


def test_flag_not_supported_and_timeout() -> None:
    script = "import argparse; argparse.ArgumentParser().parse_args()"
    result = gpu_check.run([sys.executable, "-c", script, "--device", "cuda"], timeout=60)
    assert gpu_check.flag_not_supported(result, "--device")
    assert not gpu_check.flag_not_supported(gpu_check.run([sys.executable, "-c", "pass"], timeout=60), "--device")
    slow = gpu_check.run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert slow["timed_out"] and slow["rc"] is None


def test_shares_fill_the_budget() -> None:
    assert abs(sum(gpu_check.SHARES.values()) - 1.0) < 1e-9


def test_main_writes_one_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver end to end with the parts that need no GPU: DDP is skipped on < 2 GPUs, overhead's flag probed."""
    import json

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "fake")
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--out", str(out), "--parts", "ddp_nccl,overhead", "--budget", "200"])
    report = json.loads(out.read_text())
    assert report["ddp_nccl"] == {"skipped": "1 GPU on this machine; nccl DDP needs at least 2", "ok": None}
    overhead = report["overhead"]
    if "status" in overhead:  # benchmarks/overhead.py without --device
        assert overhead["status"].startswith("flag not supported") and rc == 0 and report["ok"]
    else:  # with --device: on this CUDA-less machine the run itself fails, and is recorded
        assert overhead["ok"] is False and rc == 1
    assert report["metadata"]["gpus"] == ["fake"] and set(report) >= {"metadata", "seconds", "ok", "budget_seconds"}
