"""How SAFLEX's cost scales: step time and step memory against plain training, across models, classes and batch size.

Grid: models {MLP 2×256 on 64 features, timm ResNet-18 width 64 at 28×28×3, ViT-tiny at 32×32×3} × classes
K ∈ {10, 100, 1000} × batch ∈ {64 + 64, 256 + 256} (clean + augmented). Paths, each a full training step (forward,
loss, backward, Adam step):

- ``plain``: cross-entropy;
- ``val_forward``: cross-entropy plus what any held-out validation signal costs at least, and all that SAFLEX's
  ``last_layer`` cannot avoid: a no-grad eval-mode forward of one validation batch per step (the floor
  ``last_layer`` is measured against);
- ``last_layer``, ``jvp`` and, for models with train-mode BatchNorm, ``jvp_frozen_stats``: ``SaflexLoss`` with
  the recommended decision-quality setting (validation batch 32 averaged with ``val_ema=0.9``, as good as a fresh
  batch of 128 in the decision-quality results, ``results/decision_quality.json``);
- ``small_loss``: a small-loss filter (keep the augmented rows whose loss is at most the augmented rows' median);
- ``l2r``: Learning to Reweight (Ren et al. 2018): a virtual SGD step with ``create_graph=True``, the validation
  loss after it, its gradient with respect to the per-sample weights (a double backward), then the weighted step.

Every path has its own copy of the model (same initial weights) and optimizer; after one warm-up step each, the
peak memory of one step of each path is measured alone (RSS high-water mark after ``malloc_trim``, reset through
``/proc/self/clear_refs``; on CUDA ``max_memory_allocated``), as the peak above what was resident before the step
(model, optimizer state, data). Then the paths run interleaved, ``--reps`` rounds, and the median step time of each
is divided by the plain step's of the same round set: ratios measured in the same process, under the same load.

Usage::

    python benchmarks/scaling.py                 # the full grid (writes benchmarks/results/scaling.json and .png)
    python benchmarks/scaling.py --quick         # seconds: MLP only, K ∈ {10, 100}, batch 16 + 16
    python benchmarks/scaling.py --device cuda   # on a GPU (fails clearly without one)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from saflex_data import SaflexLoss, SaflexTarget  # noqa: E402

MODELS = ("mlp", "resnet18", "vit_tiny")
PATHS = ("plain", "val_forward", "last_layer", "jvp", "jvp_frozen_stats", "small_loss", "l2r")
SAFLEX_PATHS = ("last_layer", "jvp", "jvp_frozen_stats")


# ---------------------------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------------------------
def make_model(name: str, num_classes: int, args: argparse.Namespace) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, num_classes))
    if name == "resnet18":
        return C.resnet18_28(num_classes, in_chans=3, width=args.resnet_width, stem_stride=args.resnet_stem_stride)
    if name == "vit_tiny":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=32, patch_size=args.vit_patch, num_classes=num_classes, embed_dim=192,
                                 depth=12, num_heads=3)  # fmt: skip
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def describe_model(name: str, args: argparse.Namespace) -> str:
    return {
        "mlp": "MLP 2×256 (ReLU) on 64 features",
        "resnet18": f"timm ResNet-18 width {args.resnet_width}, 3×3 stride-{args.resnet_stem_stride} stem, no "
                    "max-pool, 28×28×3, train-mode BatchNorm",
        "vit_tiny": f"timm ViT-tiny (dim 192, depth 12, 3 heads), patch {args.vit_patch} at 32×32×3 "
                    f"({(32 // args.vit_patch) ** 2} tokens + class token)",
    }[name]  # fmt: skip


def input_shape(name: str) -> tuple[int, ...]:
    return {"mlp": (64,), "resnet18": (3, 28, 28), "vit_tiny": (3, 32, 32)}[name]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------------------------
def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)  # double backward of attention needs the math kernel
    except ImportError:  # pragma: no cover
        return nullcontext()


def make_step(path: str, model: nn.Module, data: dict[str, Any], args: argparse.Namespace) -> Callable[[], None]:
    x, y, target, val = data["x"], data["y"], data["target"], data["val"]
    b = x.shape[0] // 2
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def finish(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    if path == "plain":
        return lambda: finish(F.cross_entropy(model(x), y))
    if path == "val_forward":
        batches = itertools.cycle(val)

        def val_forward() -> None:
            xv, _ = next(batches)
            modes = [(m, m.training) for m in model.modules()]
            model.eval()
            with torch.no_grad():
                model(xv)
            for m, training in modes:
                m.training = training
            finish(F.cross_entropy(model(x), y))

        return val_forward
    if path in SAFLEX_PATHS:
        crit = SaflexLoss(model, val, method=path, val_ema=args.val_ema)
        return lambda: finish(crit(model(x), target))
    if path == "small_loss":

        def small_loss() -> None:
            per_sample = F.cross_entropy(model(x), y, reduction="none")
            aug = per_sample[b:].detach()
            keep = torch.cat([torch.ones_like(aug), (aug <= aug.median()).to(aug.dtype)])
            finish((keep * per_sample).sum() / len(per_sample))

        return small_loss
    if path == "l2r":
        params = [p for p in model.parameters() if p.requires_grad]
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        xv, yv = val[0]

        def l2r() -> None:
            with _math_attention():
                per_sample = F.cross_entropy(model(x), y, reduction="none")
                eps = torch.zeros(b, device=x.device, requires_grad=True)
                virtual = (per_sample[:b].sum() + (eps * per_sample[b:]).sum()) / len(per_sample)
                grads = torch.autograd.grad(virtual, params, create_graph=True)
                stepped = {n: p - args.l2r_lr * g for n, p, g in zip(names, params, grads, strict=False)}
                modes = [(m, m.training) for m in model.modules()]
                model.eval()  # the validation pass uses running statistics, as SaflexLoss's does
                val_loss = F.cross_entropy(functional_call(model, stepped, (xv,)), yv)
                for m, training in modes:
                    m.training = training
                (grad_eps,) = torch.autograd.grad(val_loss, eps)
                w = (-grad_eps).clamp_min(0)
                w = w / w.sum().clamp_min(1e-12) * b  # Ren et al.: normalised weights
                weights = torch.cat([torch.ones(b, device=x.device), w.detach()])
                finish((weights * per_sample).sum() / len(per_sample))

        return l2r
    raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")


def make_data(name: str, num_classes: int, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    shape = input_shape(name)
    x = torch.randn(2 * batch, *shape, generator=gen).to(args.device)
    y = torch.randint(0, num_classes, (2 * batch,), generator=gen).to(args.device)
    val = [(torch.randn(args.val_batch, *shape, generator=gen).to(args.device),
            torch.randint(0, num_classes, (args.val_batch,), generator=gen).to(args.device)) for _ in range(4)]
    target = SaflexTarget(y, (torch.arange(2 * batch) >= batch).to(args.device))
    return {"x": x, "y": y, "val": val, "target": target}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the next peak starts from here
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def step_memory_mib(step: Callable[[], None], device: str) -> float | None:
    """Peak memory of one step above what was resident before it (MiB); None where it cannot be measured."""
    _trim()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
    except OSError:
        return None
    step()
    peak = _status_kib("VmHWM")
    return None if base is None or peak is None else (peak - base) / 1024


# ---------------------------------------------------------------------------------------------------------------
# one grid cell
# ---------------------------------------------------------------------------------------------------------------
def run_cell(name: str, num_classes: int, batch: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    data = make_data(name, num_classes, batch, args)
    steps = {}
    for path in args.paths:
        torch.manual_seed(0)
        model = make_model(name, num_classes, args).to(args.device).train()
        if path == "jvp_frozen_stats" and not has_batchnorm(model):
            continue  # the same as jvp without BatchNorm
        steps[path] = make_step(path, model, data, args)
    warm = {}
    for path, step in steps.items():  # warm-up: optimizer state, allocator, first-call costs
        for _ in range(args.warmup):
            t0 = time.perf_counter()
            step()
            warm[path] = time.perf_counter() - t0
    memory = {path: step_memory_mib(step, args.device) for path, step in steps.items()}
    times: dict[str, list[float]] = {path: [] for path in steps}
    cpu: dict[str, list[float]] = {path: [] for path in steps}
    # cheap cells get more rounds: at least --reps, and enough for --min-seconds of plain steps (at most 50)
    rounds = max(args.reps, min(50, math.ceil(args.min_seconds / max(warm.get("plain", 1.0), 1e-4))))
    for _ in range(rounds):
        for path, step in steps.items():
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            times[path].append((time.perf_counter() - t0) * 1000)
            # CPU time of this process: what a loaded machine (other processes) does not inflate
            cpu[path].append((time.process_time() - c0) * 1000)
    plain_ms = statistics.median(times["plain"])
    plain_cpu = statistics.median(cpu["plain"])
    rows = []
    for path in steps:
        ms = statistics.median(times[path])
        mem, plain_mem = memory[path], memory["plain"]
        rows.append({
            "model": name, "classes": num_classes, "batch": f"{batch}+{batch}", "path": path,
            "step_ms": round(ms, 2), "ratio": round(ms / plain_ms, 3),
            "cpu_ms": round(statistics.median(cpu[path]), 2),
            "cpu_ratio": round(statistics.median(cpu[path]) / plain_cpu, 3) if plain_cpu > 0 else None,
            "rounds": rounds, "step_ms_all": [round(t, 2) for t in times[path]],
            "step_memory_mib": None if mem is None else round(mem, 1),
            "memory_ratio": None if mem is None or not plain_mem else round(mem / plain_mem, 3),
        })  # fmt: skip
    del steps, data
    _trim()
    return rows


def plot(path: Path, payload: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - the bench extra
        return
    rows = payload["rows"]
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    batches = sorted({r["batch"] for r in rows}, key=lambda s: int(s.split("+")[0]))
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.4), squeeze=False)
    colors = {"val_forward": "tab:gray", "last_layer": "tab:blue", "jvp": "tab:red", "jvp_frozen_stats": "tab:orange",
              "small_loss": "tab:green", "l2r": "tab:purple"}  # fmt: skip
    for j, model in enumerate(models):
        for i, key in enumerate(("ratio", "memory_ratio")):
            ax = axes[i, j]
            for name, color in colors.items():
                for batch, style in zip(batches, ("-o", "--s", ":^"), strict=False):
                    sel = sorted((r for r in rows if r["model"] == model and r["path"] == name
                                  and r["batch"] == batch and r[key] is not None), key=lambda r: r["classes"])
                    if sel:
                        ax.plot([r["classes"] for r in sel], [r[key] for r in sel], style, color=color, ms=4,
                                label=f"{name} ({batch})")  # fmt: skip
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel("classes K")
            ax.set_ylabel("step time / plain" if key == "ratio" else "step memory / plain")
            ax.set_title(f"{model}: {'time' if key == 'ratio' else 'memory'}", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=6, ncol=2)
    fig.text(0.01, 0.005, payload["machine"], fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MLP only, K in {10, 100}, batch 16+16, one round")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--classes", default="10,100,1000")
    parser.add_argument("--batches", default="64,256", help="clean rows per step (as many augmented are added)")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--reps", type=int, default=3, help="interleaved timing rounds (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--min-seconds", type=float, default=2.0,
                        help="more rounds for cheap cells: until the plain steps add up to this (at most 50 rounds)")
    parser.add_argument("--val-batch", type=int, default=32)
    parser.add_argument("--val-ema", type=float, default=0.9)
    parser.add_argument("--l2r-lr", type=float, default=0.1, help="Learning to Reweight's virtual step size")
    parser.add_argument("--resnet-width", type=int, default=64)
    parser.add_argument("--resnet-stem-stride", type=int, default=2, help="1: 4x the FLOPs (overhead.py's setting)")
    parser.add_argument("--vit-patch", type=int, default=8, help="4: 64 tokens (4x the FLOPs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--out", default=str(C.RESULTS))
    parser.add_argument("--append", action="store_true",
                        help="keep the other cells of an existing OUT/scaling.json (e.g. the MLP grid and the model "
                             "cells from two runs); each run's command and load averages go to runs[]")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (torch.cuda.is_available() is False; "
                     f"torch {torch.__version__}, built with CUDA {torch.version.cuda}).")
    if args.quick:
        args.models, args.classes, args.batches = "mlp", "10,100", "16"
        args.reps, args.warmup, args.min_seconds = 1, 1, 0.2
    models = args.models.split(",")
    for m in models:
        if m not in MODELS:
            parser.error(f"--models: unknown model {m!r}; expected a comma-separated subset of {','.join(MODELS)}.")
    args.paths = [p for p in args.paths.split(",")]
    for p in args.paths:
        if p not in PATHS:
            parser.error(f"--paths: unknown path {p!r}; expected a comma-separated subset of {','.join(PATHS)}.")
    if "plain" not in args.paths:
        args.paths.insert(0, "plain")
    classes = [int(k) for k in args.classes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    C.set_threads(args.threads)
    t0 = time.perf_counter()
    args.loadavg_before = _loadavg()
    rows: list[dict[str, Any]] = []
    cells = [(m, k, b) for m in models for b in batches for k in classes]
    previous = _previous(Path(args.out) / "scaling.json", cells) if args.append else None
    for m, k, b in C.progress(cells, desc="scaling cells"):
        cell = run_cell(m, k, b, args)
        rows += cell
        print(f"{m} K={k} batch {b}+{b}: " + ", ".join(f"{r['path']} {r['ratio']:.2f}x (cpu {r['cpu_ratio']}x)"
                                                      for r in cell), flush=True)
        payload = _payload(args, models, classes, batches, rows, t0)
        if previous is not None:
            payload = _merged(previous, payload, argv)
        C.write_json(Path(args.out) / "scaling.json", payload)  # after every cell: a stopped run keeps its rows
    plot(Path(args.out) / "scaling.png", payload)
    return payload


def _previous(path: Path, cells: list[tuple[str, int, int]]) -> dict[str, Any] | None:
    """An earlier run's payload without the cells this run measures again (``--append``)."""
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    again = {(m, k, f"{b}+{b}") for m, k, b in cells}
    old["rows"] = [r for r in old["rows"] if (r["model"], r["classes"], r["batch"]) not in again]
    return old


def _merged(old: dict[str, Any], new: dict[str, Any], argv: list[str] | None) -> dict[str, Any]:
    """This run's payload with an earlier run's other cells (``--append``); ``runs`` lists every run."""
    runs = old.get("runs") or [{"command": "(an earlier run)", "loadavg_before": old.get("loadavg_before"),
                                "loadavg_after": old.get("loadavg_after"), "settings": old["settings"]}]
    this = {"command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "loadavg_before": new["loadavg_before"], "loadavg_after": new["loadavg_after"],
            "settings": new["settings"], "versions": new["versions"]}
    merged = dict(new)
    merged["rows"] = old["rows"] + new["rows"]
    settings = dict(new["settings"])
    settings["models"] = {**old["settings"]["models"], **new["settings"]["models"]}
    settings["paths"] = list(dict.fromkeys([*old["settings"]["paths"], *new["settings"]["paths"]]))
    settings["classes"] = sorted({*old["settings"]["classes"], *new["settings"]["classes"]})
    merged["settings"] = settings
    merged["runs"] = [*runs, this]
    merged["complete"] = old.get("complete", False) and new["complete"]
    return merged


def _loadavg() -> str | None:
    """``/proc/loadavg`` (1, 5, 15-minute load averages): whether the machine was quiet while this ran."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


def _payload(args: argparse.Namespace, models: list[str], classes: list[int], batches: list[int],
             rows: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    machine = C.machine_string()
    if args.device.startswith("cuda"):
        machine += f", measured on {torch.cuda.get_device_name(args.device)}"
    return {
        "benchmark": "scaling",
        "what": "step time and step memory of each path / plain cross-entropy, same process, interleaved",
        "machine": machine,
        "loadavg_before": getattr(args, "loadavg_before", None),
        "loadavg_after": _loadavg(),
        "cpu_ratio": "cpu_ratio: the median process CPU time of a step of the path / of the plain step, same rounds "
                     "(with --threads 1, what other processes on a loaded machine do not inflate)",
        "versions": C.versions(),
        "settings": {
            "models": {m: describe_model(m, args) for m in models}, "classes": classes,
            "batches": [f"{b} clean + {b} augmented" for b in batches], "paths": args.paths,
            "saflex": f"SaflexLoss(method=..., val_ema={args.val_ema}), validation batch {args.val_batch}, other "
                      "arguments the library defaults",
            "small_loss": "keep the augmented rows whose CE is at most their median",
            "l2r": f"Ren et al. 2018, virtual SGD step lr {args.l2r_lr}, validation batch {args.val_batch}",
            "optimizer": "Adam(lr=1e-4)", "reps": args.reps, "warmup": args.warmup, "threads": args.threads,
            "device": args.device, "quick": args.quick,
            "min_seconds": args.min_seconds,
            "statistic": "median step time over the rounds (at least reps; more for cheap cells, see min_seconds); "
                         "memory: peak of one step above the resident set before it",
            "load_average_at_end": list(os.getloadavg()),
            "wall_seconds": round(time.perf_counter() - t0, 1),
        },
        "rows": rows,
        "complete": len({(r["model"], r["classes"], r["batch"]) for r in rows})
        == len(models) * len(classes) * len(batches),
    }  # fmt: skip


if __name__ == "__main__":
    main()
