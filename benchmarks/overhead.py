"""Overhead of SAFLEX per training step: plain CE vs ``SaflexLoss`` with each method.

Setting (fixed in advance): timm ``resnet18`` with a 3×3 stride-1 stem and no max-pool, 28×28×3 inputs, batch
64 clean + 64 augmented, validation batch 32, 10 classes, CPU with 2 threads. A step is forward, loss, backward and
an Adam step. The variants run interleaved in one process after a warm-up (so drifting machine load hits all of
them alike) and the median of ``--steps`` steps is reported. ``single_pass`` uses ``criterion.forward_train(x)``
in place of ``model(x)`` (the exact one-forward path).

Peak memory: each variant runs a few steps alone in a fresh subprocess and reports its peak RSS (``VmHWM``);
``peak_rss_ratio`` is that over the plain step's.

``ratio`` is wall-clock time. On a shared, loaded machine wall time is noisy, so
``cpu_ratio`` also reports the ratio of process CPU time (all threads) per step, which load affects much less.

Where the time goes: ``components_ms`` times the pieces separately with ``saflex_data.functional`` (validation
gradient, the ``jvp`` inner products of the augmented half, the last-layer validation forward) so the ratios can be
explained.

Usage::

    python benchmarks/overhead.py            # full (writes benchmarks/results/overhead.json and .png)
    python benchmarks/overhead.py --quick    # small batch, 3 steps: a smoke run, ratios indicative only
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from saflex_data import SaflexLoss, SaflexTarget  # noqa: E402
from saflex_data import functional as SF  # noqa: E402

VARIANTS = ("plain", "jvp", "last_layer", "single_pass")


def make_model(width: int = 64) -> torch.nn.Module:
    return C.resnet18_28(num_classes=10, in_chans=3, width=width, stem_stride=1)


def setup(args: argparse.Namespace, variant: str, model: torch.nn.Module):
    b, v = args.batch, args.val_batch
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * b, 3, 28, 28, generator=gen)
    y = torch.randint(0, 10, (2 * b,), generator=gen)
    target = SaflexTarget(y, torch.arange(2 * b) >= b)
    val = [(torch.randn(v, 3, 28, 28, generator=gen), torch.randint(0, 10, (v,), generator=gen)) for _ in range(4)]
    crit = None if variant == "plain" else SaflexLoss(model, val, method=variant)
    return x, y, target, crit


def make_step(variant: str, model: torch.nn.Module, opt: torch.optim.Optimizer, x, y, target, crit):
    def step() -> None:
        if variant == "single_pass":
            logits = crit.forward_train(x)
        else:
            logits = model(x)
        loss = F.cross_entropy(logits, y) if crit is None else crit(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_interleaved(args: argparse.Namespace) -> dict[str, list[float]]:
    torch.manual_seed(0)
    model = make_model(args.width)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    steps = {}
    for variant in args.variants:
        x, y, target, crit = setup(args, variant, model)
        steps[variant] = make_step(variant, model, opt, x, y, target, crit)
        # SaflexLoss registers hooks on the shared model; each only fires for its own method
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    cpu: dict[str, list[float]] = {v: [] for v in args.variants}
    for i in C.progress(range(args.warmup + args.steps), desc="interleaved steps"):
        for variant in args.variants:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[variant]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= args.warmup:
                times[variant].append(dt * 1000)
                cpu[variant].append(dc * 1000)
    return times, cpu


def components(args: argparse.Namespace) -> dict[str, float]:
    """Median ms of the pieces, each on its own (same model, train mode)."""
    torch.manual_seed(0)
    model = make_model(args.width)
    model.train()
    b, v = args.batch, args.val_batch
    x, y = torch.randn(2 * b, 3, 28, 28), torch.randint(0, 10, (2 * b,))
    xv, yv = torch.randn(v, 3, 28, 28), torch.randint(0, 10, (v,))
    g = SF.validation_gradient(model, xv, yv)
    _, fc = SF.find_classifier(model)

    def fwd_bwd() -> None:
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def fwd_only() -> None:
        with torch.no_grad():
            model(x)

    def val_grad() -> None:
        model.eval()
        SF.validation_gradient(model, xv, yv)
        model.train()

    def val_forward_nograd() -> None:
        model.eval()
        with torch.no_grad():
            model(xv)
        model.train()

    def jvp_aug() -> None:
        SF.grad_inner_products(model, x[b:], g, method="jvp")

    def jvp_all() -> None:
        SF.grad_inner_products(model, x, g, method="jvp")

    def dual_forward() -> None:
        logits, _ = SF.forward_with_tangent(model, x, g)
        F.cross_entropy(logits, y).backward()
        model.zero_grad(set_to_none=True)

    pieces = {
        f"forward+backward ({2 * b})": fwd_bwd,
        f"forward no-grad ({2 * b})": fwd_only,
        f"validation gradient ({v}, eval mode)": val_grad,
        f"validation forward no-grad ({v}, last_layer)": val_forward_nograd,
        f"jvp inner products ({b} augmented)": jvp_aug,
        f"jvp inner products ({2 * b}, whole batch: train-mode BatchNorm)": jvp_all,
        f"dual forward + backward ({2 * b}, single_pass)": dual_forward,
    }
    out = {}
    for name, fn in pieces.items():
        fn()
        ts = []
        for _ in range(max(3, args.steps // 2)):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1000)
        out[name] = round(statistics.median(ts), 1)
    return out


def peak_rss_child(args: argparse.Namespace) -> None:
    """Entry point of the memory subprocess: run one variant alone and print its peak RSS in MiB."""
    C.set_threads(args.threads)
    torch.manual_seed(0)
    model = make_model(args.width)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    variant = args.child
    step = make_step(variant, model, opt, *setup(args, variant, model))
    for _ in range(3):
        step()
    print(json.dumps({"peak_rss_mib": _peak_rss_mib()}))


def _peak_rss_mib() -> float:
    """VmHWM of this process (ru_maxrss would carry over the parent's peak across fork + exec on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for variant in C.progress(args.variants, desc="peak RSS (subprocesses)"):
        cmd = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch), "--val-batch",
               str(args.val_batch), "--width", str(args.width), "--threads", str(args.threads)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return out


def derived(payload: dict) -> dict:
    """Load-robust companions of the median ``ratio``: the ratio of minimum step times, and the ratio predicted
    from the pieces timed alone (``components_ms``): plain = forward+backward of the batch; ``jvp`` adds the
    validation gradient and the JVP (of the whole batch: SaflexLoss does that for train-mode BatchNorm models, as
    here; of the augmented half otherwise); ``last_layer`` adds the validation no-grad forward;
    ``single_pass`` replaces the forward+backward by the dual one and adds the validation gradient (the Adam step
    and the cheap Π / rule arithmetic are left out of both sides)."""
    mins = {v: min(ts) for v, ts in payload["step_ms_all"].items()}
    payload["ratio_of_min"] = {v: round(mins[v] / mins["plain"], 3) for v in mins if v != "plain"}
    comp = payload.get("components_ms", {})

    def get(prefix: str) -> float | None:
        return next((v for k, v in comp.items() if k.startswith(prefix)), None)

    fb, vg, vf = get("forward+backward"), get("validation gradient"), get("validation forward")
    # SaflexLoss runs the JVP over the whole batch when the model has train-mode BatchNorm (exact batch statistics)
    jvp, dual = get("jvp inner products") if get("jvp inner products (") is None else None, get("dual forward")
    jvp = next((v for k, v in comp.items() if k.startswith("jvp inner products") and "whole batch" in k), jvp)
    if fb:
        est = {}
        if vg is not None and jvp is not None:
            est["jvp"] = round((fb + vg + jvp) / fb, 3)
        if vf is not None:
            est["last_layer"] = round((fb + vf) / fb, 3)
        if dual is not None and vg is not None:
            est["single_pass"] = round((dual + vg) / fb, 3)
        payload["ratio_from_components"] = est
    return payload


def plot(path: Path, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(payload["ratio"])
    series = [("median step", payload["ratio"]), ("min step", payload.get("ratio_of_min", {})),
              ("from pieces", payload.get("ratio_from_components", {}))]  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    ax = axes[0]
    width = 0.27
    for j, (label, values) in enumerate(series):
        xs = [i + (j - 1) * width for i in range(len(names))]
        vals = [values.get(n, 0.0) for n in names]
        ax.bar(xs, vals, width=width, label=label, color=["tab:blue", "tab:cyan", "tab:gray"][j])
        for x, r in zip(xs, vals):
            ax.text(x, r, f"{r:.2f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(names)), names)
    for target, n in ((1.10, "last_layer target"), (1.60, "jvp target")):
        ax.axhline(target, ls="--", lw=1, color="gray")
        ax.text(len(names) - 0.5, target, n, va="bottom", ha="right", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_ylabel("step time / plain step time")
    ax.set_title(f"plain step {payload['plain_ms']:.0f} ms ({payload['setting']['threads']} CPU threads)", fontsize=9)
    ax = axes[1]
    comp = payload["components_ms"]
    ax.barh(list(comp), list(comp.values()), color="tab:blue")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("ms (median, each piece alone)")
    ax.set_title("where the time goes", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=7, help="measured steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="clean samples (as many augmented are added)")
    parser.add_argument("--val-batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64: timm resnet18)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--out", default=str(C.RESULTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    if args.child:
        peak_rss_child(args)
        return None
    if args.quick:
        args.steps, args.warmup, args.batch, args.val_batch = 3, 1, 16, 8
    if "plain" not in args.variants:
        args.variants.insert(0, "plain")
    C.set_threads(args.threads)
    t0 = time.perf_counter()
    times, cpu = time_interleaved(args)
    medians = {v: statistics.median(ts) for v, ts in times.items()}
    comp = components(args)
    rss = {} if args.no_memory else peak_rss(args)
    plain = medians["plain"]
    payload = {
        "machine": C.machine_string(),
        "torch": torch.__version__,
        "plain_ms": round(plain, 1),
        "ratio": {v: round(medians[v] / plain, 3) for v in args.variants if v != "plain"},
        "peak_rss_ratio": {v: round(rss[v] / rss["plain"], 3) for v in rss if v != "plain"},
        "step_ms": {v: round(m, 1) for v, m in medians.items()},
        "step_ms_all": {v: [round(t, 1) for t in ts] for v, ts in times.items()},
        "cpu_ratio": {v: round(statistics.median(cpu[v]) / statistics.median(cpu["plain"]), 3)
                      for v in args.variants if v != "plain"},
        "step_cpu_ms_all": {v: [round(t, 1) for t in ts] for v, ts in cpu.items()},
        "peak_rss_mib": {v: round(m, 1) for v, m in rss.items()},
        "components_ms": comp,
        "setting": {
            "model": f"timm resnet18, 3x3 stride-1 stem, no max-pool, base width {args.width}",
            "input": "28x28x3", "batch": f"{args.batch} clean + {args.batch} augmented", "val_batch": args.val_batch,
            "classes": 10, "threads": args.threads, "optimizer": "Adam", "steps": args.steps, "warmup": args.warmup,
            "statistic": "median over steps; variants interleaved in one process", "quick": args.quick,
            "saflex_defaults": "library defaults (val_every=1, val_mode='eval')",
            "git_commit": C.git_commit(),
            "load_average_at_end": list(__import__("os").getloadavg()),
            "wall_seconds": round(time.perf_counter() - t0, 1),
        },
    }  # fmt: skip
    payload = derived(payload)
    out = Path(args.out)
    C.write_json(out / "overhead.json", payload)
    plot(out / "overhead.png", payload)
    print(json.dumps({k: payload[k] for k in ("plain_ms", "ratio", "peak_rss_ratio", "components_ms")}, indent=1))
    return payload


if __name__ == "__main__":
    main()
