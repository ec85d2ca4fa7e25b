"""Peak memory of one SAFLEX training step against a plain cross-entropy step, for each ``method``.

Each configuration runs in its own fresh process (peak RSS is a per-process high-water mark): build the model,
the data and the criterion, record the resident set size (``VmRSS``), reset the high-water mark
(``/proc/self/clear_refs``), run ``--steps`` full training steps (forward, loss, backward, SGD step) and read the
peak (``VmHWM``). The step's memory is ``peak - baseline``; the ratios are against the plain step measured in the
same invocation on the same machine. On CUDA the script also reports ``torch.cuda.max_memory_allocated``.

Model: the benchmarks' timm ResNet-18 for 28×28 inputs (width 32, stride-2 stem), batch 128 of which half are
augmented, validation minibatch 128.

Usage::

    python benchmarks/memory.py                       # writes benchmarks/results/memory.json and memory.png
    python benchmarks/memory.py --json /tmp/m.json --steps 5 --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ("plain", "jvp", "jvp_frozen_stats", "last_layer", "single_pass")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS


def child(config: str, steps: int, batch: int, device: str, threads: int) -> dict[str, Any]:
    """One configuration in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    from benchmarks.common import resnet18_28
    from saflex_data import SaflexLoss, SaflexTarget

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = resnet18_28(num_classes=10, in_chans=1, width=32, stem_stride=2).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(steps, batch, 1, 28, 28, generator=g).to(device)
    ys = torch.randint(0, 10, (steps, batch), generator=g).to(device)
    val = [(torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g))
           for _ in range(steps)]
    is_aug = (torch.arange(batch) >= batch // 2).to(device)
    criterion = None if config == "plain" else SaflexLoss(model, val, method=config)

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    baseline = _status_kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    rss_after = []
    for step in range(steps):
        x, y = xs[step], ys[step]
        if criterion is None:
            loss = F.cross_entropy(model(x), y)
        else:
            logits = criterion.forward_train(x) if config == "single_pass" else model(x)
            loss = criterion(logits, SaflexTarget(y, is_aug))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rss_after.append(_status_kib("VmRSS"))
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    out = {
        "config": config,
        "baseline_rss_mib": baseline / 1024,
        "peak_rss_mib": peak / 1024,
        "step_rss_mib": (peak - baseline) / 1024,
        "rss_growth_first_to_last_step_mib": (rss_after[-1] - rss_after[0]) / 1024,
        "seconds_per_step": elapsed / steps,
        "rss_after_each_step_mib": [round(r / 1024, 1) for r in rss_after],
    }
    if device == "cuda":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_step_mib"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "memory.json")
    parser.add_argument("--png", type=Path, default=None, help="default: the --json path with .png")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --json")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.plot_only:
        payload = json.loads(args.json.read_text())
        _plot(payload["rows"], payload["machine"], args.png or args.json.with_suffix(".png"))
        return

    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.device, args.threads)))
        return

    from benchmarks.common import machine_string, versions, write_json

    rows = []
    for config in CONFIGS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", config, "--steps", str(args.steps),
               "--batch", str(args.batch), "--device", args.device, "--threads", str(args.threads)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    plain = rows[0]
    for row in rows:
        row["peak_rss_ratio_vs_plain"] = row["peak_rss_mib"] / plain["peak_rss_mib"]
        row["step_rss_ratio_vs_plain"] = row["step_rss_mib"] / plain["step_rss_mib"]
        if "cuda_step_mib" in row:
            row["cuda_step_ratio_vs_plain"] = row["cuda_step_mib"] / plain["cuda_step_mib"]
    payload = {
        "benchmark": "memory",
        "what": "peak resident memory of full training steps (fresh process per row); ratios vs plain CE measured "
                "in the same run",
        "machine": machine_string(),
        "versions": versions(),
        "settings": {"model": "resnet18_28(width=32, stem_stride=2)", "input": [1, 28, 28], "batch": args.batch,
                     "augmented_fraction": 0.5, "val_batch": args.batch, "steps": args.steps,
                     "device": args.device, "threads": args.threads, "optimizer": "SGD(momentum=0.9)"},
        "rows": rows,
    }
    write_json(args.json, payload)
    _plot(rows, payload["machine"], args.png or args.json.with_suffix(".png"))
    print(f"wrote {args.json}")


def _plot(rows: list[dict[str, Any]], machine: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - the bench extra
        return
    names = [r["config"] for r in rows]
    base = [r["baseline_rss_mib"] for r in rows]
    step = [r["step_rss_mib"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.bar(names, base, color="#bbbbbb", label="model + data + criterion (before the steps)")
    ax.bar(names, step, bottom=base, color="#3b75af", label="added by the training steps (peak)")
    for i, r in enumerate(rows):
        ax.text(i, r["peak_rss_mib"], f"step {r['step_rss_ratio_vs_plain']:.2f}×", ha="center", va="bottom",
                fontsize=9)
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_ylim(0, max(r["peak_rss_mib"] for r in rows) * 1.12)
    ax.set_title("Peak memory of a training step: SAFLEX methods vs plain CE", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.text(0.01, 0.01, machine, fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
