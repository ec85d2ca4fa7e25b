"""Overhead of SAFLEX per training step: plain CE vs ``SaflexLoss`` with each method and the recommended settings.

Setting: timm ``resnet18`` with a 3×3 stride-1 stem and no max-pool, 28×28×3 inputs, batch 64 clean + 64 augmented,
validation batch 32, 10 classes, 2 CPU threads (or ``--device cuda``). A step is forward, loss, backward and an Adam
step. The variants run interleaved in one process after a warm-up (so drifting machine load hits all of them alike)
and the median of ``--steps`` steps is reported (``ratio``); ``ratio_mean`` is the mean, the right statistic for
``val_every > 1`` variants (one step in ``k`` refreshes the validation gradient). ``single_pass`` uses
``criterion.forward_train(x)`` in place of ``model(x)`` (the exact one-forward path).

Variants (``name[@setting]``): ``jvp`` (exact ``Π``; with train-mode BatchNorm a JVP of the whole batch),
``jvp_frozen_stats`` (the augmented rows only, the batch statistics of the training forward held fixed: a
different ``Π``, see ``frozen_stats_agreement``), ``last_layer`` (the default), ``single_pass``, and the
recommended decision-quality settings: ``@val128`` (a validation batch of 128), ``@ema0.9`` (validation batch 32
averaged with ``val_ema=0.9``), ``@every4`` (``val_every=4``).

Peak memory: each variant runs a few steps alone in a fresh subprocess and reports its peak RSS (``VmHWM``;
``torch.cuda.max_memory_allocated`` on CUDA); ``peak_rss_ratio`` is that over the plain step's.

``cpu_ratio`` reports the ratio of process CPU time (all threads) per step, which machine load affects less.

Where the time goes: ``components_ms`` times the pieces separately with ``saflex_data.functional``.

``frozen_stats_agreement``: how far the fixed-statistics ``Π`` is from the exact one on a small ResNet-18 trained
with plain CE on Fashion-MNIST (30% of the augmented copies mislabelled): relative error, rank correlations and
the agreement of the default rule's keep/drop decisions, at several points of training.

Usage::

    python benchmarks/overhead.py                 # full (writes benchmarks/results/overhead.json and .png)
    python benchmarks/overhead.py --quick         # small batch, 3 steps: a smoke run, ratios indicative only
    python benchmarks/overhead.py --device cuda   # on a GPU (fails clearly without one)
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
from saflex_data import _autodiff as SF_autodiff  # noqa: E402
from saflex_data import functional as SF  # noqa: E402

VARIANTS = ("plain", "jvp", "jvp_frozen_stats", "last_layer", "last_layer@val128", "last_layer@ema0.9",
            "jvp_frozen_stats@every4")  # the default run; also: single_pass, jvp@every4, any method@setting
METHODS = ("plain", "jvp", "jvp_frozen_stats", "last_layer", "single_pass")
# what each @setting means: SaflexLoss keyword arguments and the validation batch size
SETTINGS = {"val128": ({}, 128), "ema0.9": ({"val_ema": 0.9}, None), "every2": ({"val_every": 2}, None),
            "every4": ({"val_every": 4}, None),
            "gated": ({"rule": "gated_prior"}, None)}  # fmt: skip  # the gated default (its extra: the clean rows' Π)


def parse_variant(variant: str, val_batch: int) -> tuple[str, dict, int]:
    """``"last_layer@val128"`` -> ``("last_layer", {}, 128)``; ``"jvp@every4"`` -> ``("jvp", {"val_every": 4}, 32)``."""
    method, *settings = variant.split("@")
    kwargs: dict = {}
    for name in settings:
        extra, batch = SETTINGS[name]
        kwargs.update(extra)
        val_batch = batch or val_batch
    return method, kwargs, val_batch


def make_model(width: int = 64) -> torch.nn.Module:
    return C.resnet18_28(num_classes=10, in_chans=3, width=width, stem_stride=1)


def describe_variant(variant: str, val_batch: int) -> str:
    """``"jvp@every4"`` -> ``"SaflexLoss(method='jvp', val_every=4), validation batch 32"``."""
    method, kwargs, v = parse_variant(variant, val_batch)
    if method == "plain":
        return "plain cross-entropy"
    options = "".join(f", {k}={value!r}" for k, value in kwargs.items())
    return f"SaflexLoss(method={method!r}{options}), validation batch {v}"


def setup(args: argparse.Namespace, variant: str, model: torch.nn.Module):
    method, kwargs, v = parse_variant(variant, args.val_batch)
    b, dev = args.batch, args.device
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * b, 3, 28, 28, generator=gen).to(dev)
    y = torch.randint(0, 10, (2 * b,), generator=gen).to(dev)
    target = SaflexTarget(y, (torch.arange(2 * b) >= b).to(dev))
    val = [(torch.randn(v, 3, 28, 28, generator=gen).to(dev), torch.randint(0, 10, (v,), generator=gen).to(dev))
           for _ in range(4)]  # fmt: skip
    crit = None if method == "plain" else SaflexLoss(model, val, method=method, **kwargs)
    return x, y, target, crit


def make_step(variant: str, model: torch.nn.Module, opt: torch.optim.Optimizer, x, y, target, crit):
    single_pass = variant.split("@")[0] == "single_pass"
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def step() -> None:
        logits = crit.forward_train(x) if single_pass else model(x)
        loss = F.cross_entropy(logits, y) if crit is None else crit(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    return step


def time_interleaved(args: argparse.Namespace) -> dict[str, list[float]]:
    steps = {}
    for variant in args.variants:
        # One model (same initial weights) and optimizer per variant: SaflexLoss's hooks on a model fire on every
        # forward, so a shared model would charge one variant's hooks to the others.
        torch.manual_seed(0)
        model = make_model(args.width).to(args.device)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x, y, target, crit = setup(args, variant, model)
        steps[variant] = make_step(variant, model, opt, x, y, target, crit)
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
    dev = args.device
    model = make_model(args.width).to(dev)
    model.train()
    b, v = args.batch, args.val_batch
    x, y = torch.randn(2 * b, 3, 28, 28).to(dev), torch.randint(0, 10, (2 * b,)).to(dev)
    xv, yv = torch.randn(v, 3, 28, 28).to(dev), torch.randint(0, 10, (v,)).to(dev)
    g = SF.validation_gradient(model, xv, yv)
    capture = SF.BatchStatsCapture(model)
    with torch.no_grad():
        model(x)
    stats = capture.pop()
    capture.remove()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

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

    def jvp_aug_fixed() -> None:
        SF.grad_inner_products(model, x[b:], g, method="jvp", batch_stats=stats)

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
        f"jvp inner products ({b} augmented, fixed batch statistics: jvp_frozen_stats)": jvp_aug_fixed,
        f"jvp inner products ({2 * b}, whole batch: exact jvp with train-mode BatchNorm)": jvp_all,
        f"dual forward + backward ({2 * b}, single_pass)": dual_forward,
    }
    out = {}
    for name, fn in pieces.items():
        fn()
        ts = []
        for _ in range(args.component_reps or max(3, args.steps // 2)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append((time.perf_counter() - t0) * 1000)
        out[name] = round(statistics.median(ts), 1)
    return out


def peak_rss_child(args: argparse.Namespace) -> None:
    """Entry point of the memory subprocess: run one variant alone and print its peak RSS in MiB."""
    C.set_threads(args.threads)
    torch.manual_seed(0)
    model = make_model(args.width).to(args.device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    variant = args.child
    step = make_step(variant, model, opt, *setup(args, variant, model))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the second step holds the optimizer state too
        step()
    out = {"peak_rss_mib": _peak_rss_mib()}
    if args.device.startswith("cuda"):
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


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
    """Peak RSS in MiB per variant (on CUDA: peak allocated device memory), each in a fresh subprocess."""
    out = {}
    key = "cuda_peak_mib" if args.device.startswith("cuda") else "peak_rss_mib"
    for variant in C.progress(args.variants, desc="peak memory (subprocesses)"):
        cmd = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch), "--val-batch",
               str(args.val_batch), "--width", str(args.width), "--threads", str(args.threads),
               "--device", args.device]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])[key]
    return out


def derived(payload: dict) -> dict:
    """Load-robust companions of the median ``ratio``: the ratio of minimum step times, and the ratio predicted
    from the pieces timed alone (``components_ms``): plain = forward+backward of the batch; ``jvp`` adds the
    validation gradient and the JVP of the whole batch (what SaflexLoss does for a train-mode BatchNorm model, as
    here); ``jvp_frozen_stats`` the validation gradient and the JVP of the augmented half; ``last_layer`` the
    validation no-grad forward; ``single_pass`` replaces the forward+backward by the dual one and adds the
    validation gradient (the Adam step and the cheap Π / rule arithmetic are left out of both sides)."""
    mins = {v: min(ts) for v, ts in payload["step_ms_all"].items()}
    payload["ratio_of_min"] = {v: round(mins[v] / mins["plain"], 3) for v in mins if v != "plain"}
    comp = payload.get("components_ms", {})

    def get(prefix: str) -> float | None:
        return next((v for k, v in comp.items() if k.startswith(prefix)), None)

    fb, vg, vf = get("forward+backward"), get("validation gradient"), get("validation forward")
    jvp_all = next((v for k, v in comp.items() if k.startswith("jvp inner products") and "whole batch" in k), None)
    jvp_aug = next((v for k, v in comp.items() if k.startswith("jvp inner products") and "fixed" in k), None)
    dual = get("dual forward")
    if fb:
        est = {}
        if vg is not None and jvp_all is not None:
            est["jvp"] = round((fb + vg + jvp_all) / fb, 3)
        if vg is not None and jvp_aug is not None:
            est["jvp_frozen_stats"] = round((fb + vg + jvp_aug) / fb, 3)
        if vf is not None:
            est["last_layer"] = round((fb + vf) / fb, 3)
        if dual is not None and vg is not None:
            est["single_pass"] = round((dual + vg) / fb, 3)
        payload["ratio_from_components"] = est
    return payload


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _auroc(score: torch.Tensor, positive: torch.Tensor) -> float | None:
    """P(score of a positive > score of a negative), ties counted half."""
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return None
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def frozen_stats_agreement(args: argparse.Namespace) -> dict:
    """Exact ``Π`` (JVP of the whole batch) vs the fixed-statistics ``Π`` (``jvp_frozen_stats``) of the augmented
    rows, on a small ResNet-18 (width 16, stride-2 stem) trained with plain CE on Fashion-MNIST.

    Each step: 64 clean images + 64 augmented copies (random shift and flip), 30% of the copies with a wrong label;
    the validation gradient of a fresh held-out batch of 128 (eval mode, ``T = 4`` as SaflexLoss's default).
    At each checkpoint, ``--agreement-batches`` batches are compared: the relative error ``‖Π_f - Π‖ / ‖Π‖``,
    the Spearman correlation of all entries and of the default rule's per-sample scores (``rule="margin"``),
    the fraction of identical keep/drop decisions, and each ``Π``'s AUROC for the wrong labels.
    """
    from saflex_data.datasets import load_fashion_mnist

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    images, labels = load_fashion_mnist(split="train")
    n_train, n_val = (512, 256) if args.quick else (4000, 1024)
    perm = torch.randperm(len(labels), generator=gen)
    x_all = ((images[perm[: n_train + n_val]].float() / 255 - 0.5) / 0.5)[:, None]
    y_all = labels[perm[: n_train + n_val]]
    xt, yt, xv, yv = x_all[:n_train], y_all[:n_train], x_all[n_train:], y_all[n_train:]
    model = C.resnet18_28(10, in_chans=1, width=8 if args.quick else 16, stem_stride=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    b = 16 if args.quick else 64
    checkpoints = (0, 4) if args.quick else (0, 50, 200, 600)

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, n_train, (b,), generator=gen)
        clean, y = xt[idx], yt[idx]
        shift = torch.randint(-3, 4, (2,), generator=gen).tolist()
        aug = torch.roll(clean, shifts=shift, dims=(2, 3))
        aug = torch.where(torch.rand(b, 1, 1, 1, generator=gen) < 0.5, aug.flip(3), aug)
        bad = torch.rand(b, generator=gen) < 0.3
        y_aug = torch.where(bad, (y + torch.randint(1, 10, (b,), generator=gen)) % 10, y)
        return torch.cat([clean, aug]), torch.cat([y, y_aug]), bad

    rows, step = [], 0
    for stop in checkpoints:
        model.train()
        while step < stop:
            x, y, _ = batch()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        for _ in range(args.agreement_batches):
            x, y, bad = batch()
            vi = torch.randint(0, n_val, (128,), generator=gen)
            model.eval()
            g = SF.validation_gradient(model, xv[vi], yv[vi], temperature=4.0)
            model.train()
            capture = SF.BatchStatsCapture(model)
            with torch.no_grad(), SF_autodiff.running_stats_frozen(model):
                model(x)  # the training forward's statistics (buffers untouched)
            stats = capture.pop()
            capture.remove()
            exact = SF.grad_inner_products(model, x, g, method="jvp")[b:].double()
            fixed = SF.grad_inner_products(model, x[b:], g, method="jvp", batch_stats=stats).double()
            ya = y[b:]
            we, _ = SF.saflex_targets(exact, ya, rule="margin")
            wf, _ = SF.saflex_targets(fixed, ya, rule="margin")
            se, sf = SF.weight_scores(exact, ya, rule="margin"), SF.weight_scores(fixed, ya, rule="margin")
            rows.append({
                "step": stop,
                "relative_error": float((fixed - exact).norm() / exact.norm()),
                "spearman_entries": _spearman(fixed, exact),
                "spearman_margin_scores": _spearman(sf, se),
                "decision_agreement": float((we == wf).double().mean()),
                "dropped_exact": float((we == 0).double().mean()),
                "dropped_fixed": float((wf == 0).double().mean()),
                "auroc_wrong_label_exact": _auroc(-se, bad),
                "auroc_wrong_label_fixed": _auroc(-sf, bad),
            })  # fmt: skip
    summary = {}
    for key in rows[0]:
        if key == "step":
            continue
        vals = [r[key] for r in rows if r[key] is not None]
        summary[key] = round(statistics.median(vals), 4) if vals else None
    per_step = {}
    for stop in checkpoints:
        sel = [r for r in rows if r["step"] == stop]
        per_step[str(stop)] = {k: round(statistics.median([r[k] for r in sel if r[k] is not None]), 4)
                               for k in sel[0] if k != "step" and any(r[k] is not None for r in sel)}  # fmt: skip
    return {
        "what": "fixed-statistics Π (jvp_frozen_stats) vs the exact Π (jvp, whole batch) of the augmented rows",
        "setting": f"resnet18_28(width={8 if args.quick else 16}, stem_stride=2), Fashion-MNIST {n_train} train, "
                   f"batch {b} clean + {b} augmented (shift/flip, 30% wrong labels), validation batch 128 (T=4), "
                   f"Adam 1e-3 plain CE, {args.agreement_batches} batches per checkpoint",
        "median_over_all": summary,
        "median_per_training_step": per_step,
    }  # fmt: skip


def plot(path: Path, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(payload["ratio"])
    series = [("median step", payload["ratio"]), ("mean step", payload.get("ratio_mean", {})),
              ("from pieces", payload.get("ratio_from_components", {}))]  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    ax = axes[0]
    width = 0.27
    for j, (label, values) in enumerate(series):
        xs = [i + (j - 1) * width for i in range(len(names))]
        vals = [values.get(n, 0.0) for n in names]
        ax.bar(xs, vals, width=width, label=label, color=["tab:blue", "tab:cyan", "tab:gray"][j])
        for x, r in zip(xs, vals, strict=False):
            if r:
                ax.text(x, r, f"{r:.2f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=7)
    for target, n in ((1.10, "recommended-settings target"), (1.60, "jvp target")):
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
    parser.add_argument("--steps", type=int, default=8, help="measured steps per variant (a multiple of 4 for @every4)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="clean samples (as many augmented are added)")
    parser.add_argument("--val-batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64: timm resnet18)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--component-reps", type=int, default=0, help="timed runs per piece (0: max(3, steps / 2))")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--no-agreement", action="store_true",
                        help="skip the frozen-statistics agreement study (CPU, Fashion-MNIST; --quick skips it too)")
    parser.add_argument("--agreement-batches", type=int, default=4, help="batches compared per checkpoint")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--out", default=str(C.RESULTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (torch.cuda.is_available() is False; "
                     f"torch {torch.__version__}, built with CUDA {torch.version.cuda}).")
    args.variants = args.variants.split(",")
    for v in args.variants:
        method, *settings = v.split("@")
        if method not in METHODS or any(x not in SETTINGS for x in settings):
            parser.error(f"--variants: unknown variant {v!r}; expected method[@setting...] with a method of "
                         f"plain, jvp, jvp_frozen_stats, last_layer, single_pass and settings from {sorted(SETTINGS)}.")
    if args.child:
        peak_rss_child(args)
        return None
    if args.quick:
        args.steps, args.warmup, args.batch, args.val_batch, args.agreement_batches = 3, 1, 16, 8, 1
    if "plain" not in args.variants:
        args.variants.insert(0, "plain")
    C.set_threads(args.threads)
    t0 = time.perf_counter()
    times, cpu = time_interleaved(args)
    medians = {v: statistics.median(ts) for v, ts in times.items()}
    means = {v: statistics.fmean(ts) for v, ts in times.items()}
    comp = components(args)
    rss = {} if args.no_memory else peak_rss(args)
    agreement = None
    if not (args.no_agreement or args.quick):  # a CPU study on Fashion-MNIST; --quick (a smoke run) skips it
        try:
            agreement = frozen_stats_agreement(args)
        except FileNotFoundError as err:  # the dataset is not installed on this machine
            agreement = {"skipped": str(err).splitlines()[0]}
    plain = medians["plain"]
    payload = {
        "machine": C.machine_string() if args.device == "cpu" else
                   f"{C.machine_string()}, measured on {torch.cuda.get_device_name(args.device)}",
        "device": args.device,
        "torch": torch.__version__,
        "plain_ms": round(plain, 1),
        "ratio": {v: round(medians[v] / plain, 3) for v in args.variants if v != "plain"},
        "ratio_mean": {v: round(means[v] / means["plain"], 3) for v in args.variants if v != "plain"},
        "peak_memory": "peak allocated CUDA memory" if args.device.startswith("cuda") else "peak RSS (VmHWM)",
        "peak_rss_ratio": {v: round(rss[v] / rss["plain"], 3) for v in rss if v != "plain"},
        "step_ms": {v: round(m, 1) for v, m in medians.items()},
        "step_ms_all": {v: [round(t, 1) for t in ts] for v, ts in times.items()},
        "cpu_ratio": {v: round(statistics.median(cpu[v]) / statistics.median(cpu["plain"]), 3)
                      for v in args.variants if v != "plain"},
        "step_cpu_ms_all": {v: [round(t, 1) for t in ts] for v, ts in cpu.items()},
        "peak_rss_mib": {v: round(m, 1) for v, m in rss.items()},
        "components_ms": comp,
        "frozen_stats_agreement": agreement,
        "setting": {
            "model": f"timm resnet18, 3x3 stride-1 stem, no max-pool, base width {args.width}",
            "input": "28x28x3", "batch": f"{args.batch} clean + {args.batch} augmented", "val_batch": args.val_batch,
            "classes": 10, "threads": args.threads, "optimizer": "Adam", "steps": args.steps, "warmup": args.warmup,
            "statistic": "median over steps (ratio_mean: mean, for val_every > 1); variants interleaved in one "
                         "process", "quick": args.quick, "device": args.device,
            "variants": {v: describe_variant(v, args.val_batch) for v in args.variants},
            "saflex_defaults": "library defaults unless the variant says otherwise",
            "git_commit": C.git_commit(),
            "load_average_at_end": list(__import__("os").getloadavg()),
            "wall_seconds": round(time.perf_counter() - t0, 1),
        },
    }  # fmt: skip
    payload = derived(payload)
    out = Path(args.out)
    C.write_json(out / "overhead.json", payload)
    plot(out / "overhead.png", payload)
    print(json.dumps({k: payload[k] for k in ("plain_ms", "ratio", "ratio_mean", "peak_rss_ratio", "components_ms")},
                     indent=1))
    if agreement:
        print(json.dumps(agreement.get("median_over_all", agreement), indent=1))
    return payload


if __name__ == "__main__":
    main()
