"""GPU readiness in one run: every needs_cuda test, kornia on the device, fp16 + GradScaler, nccl DDP, overhead.

    make gpu-check                                   # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json --budget 540

Meant for one GPU machine and under 10 minutes: each part runs in its own subprocess with its own time limit (the
limits add up to ``--budget`` seconds), and a part that fails or times out is recorded, never fatal. nccl DDP runs
when the machine has two or more GPUs (else it is recorded as skipped). ``benchmarks/overhead.py --device cuda``
is called as is; if that script has no ``--device`` option, the JSON says "flag not supported". The result is one
JSON file; the exit status is 0 when every part that ran passed. Without CUDA the script stops at once with a
message and exit status 2, writing nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
# Share of --budget per part (seconds = share * budget); they add up to 1.
SHARES = {"needs_cuda_tests": 0.40, "kornia": 0.10, "fp16_gradscaler": 0.10, "ddp_nccl": 0.15, "overhead": 0.25}
NO_CUDA = "gpu_check needs a CUDA device (torch.cuda.is_available() is False here); run it on a GPU machine."


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` from the repository root; rc, seconds and the output's tail (``timed_out`` past ``timeout``)."""
    start = time.perf_counter()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"cmd": cmd, "rc": None, "timed_out": True, "seconds": round(time.perf_counter() - start, 1),
                "tail": out[-3000:]}
    return {"cmd": cmd, "rc": proc.returncode, "timed_out": False, "seconds": round(time.perf_counter() - start, 1),
            "tail": (proc.stdout + proc.stderr)[-3000:]}


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and per-test outcomes from a pytest ``--junitxml`` file."""
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "")[:500]
                break
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": round(float(case.get("time") or 0.0), 3), "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": cases}


def flag_not_supported(result: dict[str, Any], flag: str) -> bool:
    """Whether an argparse script rejected ``flag`` (exit status 2, "unrecognized arguments")."""
    return result.get("rc") == 2 and "unrecognized arguments" in result.get("tail", "") and flag in result["tail"]


def needs_cuda_tests(timeout: float, work: Path) -> dict[str, Any]:
    xml = work / "needs_cuda.xml"
    result = run([sys.executable, "-m", "pytest", "-m", "needs_cuda", "-q", "-p", "no:cacheprovider",
                  f"--junitxml={xml}", "tests"], timeout)
    if xml.exists():
        result.update(parse_junit(xml))
    # pytest exits 5 when it collects no test; that is not a pass.
    result["ok"] = result["rc"] == 0 and result.get("counts", {}).get("passed", 0) > 0
    return result


def kornia(timeout: float) -> dict[str, Any]:
    result = run([sys.executable, "examples/kornia_gpu.py", "--device", "cuda", "--steps", "10"], timeout)
    result["ok"] = result["rc"] == 0
    return result


FP16_CHILD = r"""
import json, torch
from torch import nn
from saflex_data import SaflexLoss, SaflexTarget
torch.manual_seed(0)
dev = torch.device("cuda")
out = {}
for method in ("last_layer", "jvp"):
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(64, 10)).to(dev)
    val = [(torch.randn(32, 3, 16, 16, device=dev), torch.randint(0, 10, (32,), device=dev)) for _ in range(4)]
    criterion = SaflexLoss(model, val, method=method)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cuda")
    losses = []
    for step in range(12):
        x = torch.randn(32, 3, 16, 16, device=dev)
        target = SaflexTarget(torch.randint(0, 10, (32,), device=dev), torch.arange(32, device=dev) >= 16)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = criterion(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
    out[method] = {"losses": losses, "finite": all(l == l and abs(l) != float("inf") for l in losses),
                   "scale": float(scaler.get_scale()), "steps": criterion.step,
                   "nonfinite_steps": criterion.stats["nonfinite_steps"]}
print("RESULT " + json.dumps(out))
"""


def fp16_gradscaler(timeout: float) -> dict[str, Any]:
    result = run([sys.executable, "-c", FP16_CHILD], timeout)
    line = next((s for s in result["tail"].splitlines() if s.startswith("RESULT ")), None)
    if line:
        result["result"] = json.loads(line[len("RESULT "):])
    result["ok"] = result["rc"] == 0 and bool(line) and all(r["finite"] for r in result["result"].values())
    return result


def ddp_nccl(timeout: float, gpus: int) -> dict[str, Any]:
    if gpus < 2:
        return {"skipped": f"{gpus} GPU on this machine; nccl DDP needs at least 2", "ok": None}
    nproc = min(gpus, 8)
    result = run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "examples/ddp_train.py",
                  "--device", "cuda", "--steps", "20", "--check"], timeout)
    result["nproc"] = nproc
    result["ok"] = result["rc"] == 0
    return result


def overhead(timeout: float, work: Path) -> dict[str, Any]:
    result = run([sys.executable, "benchmarks/overhead.py", "--device", "cuda", "--quick", "--no-memory",
                  "--out", str(work)], timeout)
    if flag_not_supported(result, "--device"):
        return {**result, "status": "flag not supported: benchmarks/overhead.py has no --device option", "ok": None}
    payload = work / "overhead.json"
    if payload.exists():
        data = json.loads(payload.read_text())
        result["result"] = {k: data.get(k) for k in ("plain_ms", "ratio", "step_ms", "components_ms", "setting")}
    result["ok"] = result["rc"] == 0
    return result


def metadata() -> dict[str, Any]:
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "git_commit": commit or None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "python": sys.version.split()[0],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the JSON file to write")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all parts together")
    parser.add_argument("--parts", default=",".join(SHARES), help="comma-separated subset of " + ",".join(SHARES))
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(SHARES))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(SHARES)}")
    gpus = torch.cuda.device_count()
    report: dict[str, Any] = {"metadata": metadata(), "budget_seconds": args.budget}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for part in parts:
            limit = SHARES[part] * args.budget
            print(f"gpu_check: {part} (limit {limit:.0f} s)", flush=True)
            if part == "needs_cuda_tests":
                report[part] = needs_cuda_tests(limit, work)
            elif part == "kornia":
                report[part] = kornia(limit)
            elif part == "fp16_gradscaler":
                report[part] = fp16_gradscaler(limit)
            elif part == "ddp_nccl":
                report[part] = ddp_nccl(limit, gpus)
            else:
                report[part] = overhead(limit, work)
            print(f"gpu_check: {part}: ok={report[part].get('ok')}", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["ok"] = all(report[p].get("ok") is not False for p in parts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"gpu_check: wrote {out} (ok={report['ok']}, {report['seconds']} s)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
