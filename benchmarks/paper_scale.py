"""Paper-scale run for one GPU: full Fashion-MNIST, ResNet-18 (width 64, 3×3 stem), RandAugment on the device, Adam.

The paper's headline regime (ResNet-18 at 28×28, 100 epochs, 10k–236k images) is out of reach of a CPU; this is the
one command to run it on one GPU (an H200 in ≤ 8 minutes, data loading included). Full Fashion-MNIST stands in for
MedMNIST: per seed a class-balanced validation split of ``--n-val`` images is cut from the 60k training images; the
test set is the official 10k. Everything lives on the device: the images, kornia's RandAugment, the training.

Rows (same budget: every row runs the same number of epochs; each step sees ``B`` clean rows plus, with an upstream,
a RandAugment copy of each, the ``[clean; augmented]`` layout):

* ``no augmentation`` (the ``B`` clean rows only), ``upstream`` (RandAugment copies, weight 1),
  ``upstream, train+val`` (the same on train ∪ validation: what the validation labels are worth as training data),
* ``SAFLEX default``: ``SaflexLoss`` with the library's defaults (trained on train; the validation split feeds it),
* ``confidence weight p[y]``: each augmented row weighted by the model's detached ``p[y]`` (the free peer).

The epochs are set from a timed warm-up so that all rows × seeds fit ``--budget`` seconds of training (the JSON
records the epochs, the timings and the machine). No model selection: the model after the last epoch is scored once.

Usage::

    python benchmarks/paper_scale.py --device cuda            # one H200: <= 8 min, writes results/paper_scale.json/.png
    python benchmarks/paper_scale.py --quick                  # CPU smoke run (tiny subset, width 8, a few steps)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from datasets import load_fashion_mnist, stratified_split  # noqa: E402

from saflex_data import SaflexLoss, SaflexTarget  # noqa: E402

ROWS = ("no augmentation", "upstream", "upstream, train+val", "SAFLEX default", "confidence weight p[y]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 512 images, width 8, 2 steps per epoch")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--budget", type=float, default=330.0, help="seconds of training for all rows and seeds")
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256, help="clean rows per step (plus as many augmented)")
    p.add_argument("--val-batch-size", type=int, default=128)
    p.add_argument("--n-val", type=int, default=5000)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rows", default="|".join(ROWS), help="'|'-separated row names")
    p.add_argument("--out", default=str(C.RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.device, args.seeds, args.width, args.batch_size, args.n_val = "cpu", 1, 8, 16, 64
        args.val_batch_size, args.max_epochs, args.budget = 16, 1, 1e9
    return args


def load(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    x, y = load_fashion_mnist(split="train")
    xt, yt = load_fashion_mnist(split="test")
    if args.quick:
        keep = stratified_split(y, (512 / len(y),), seed=0)[0]
        x, y = x[keep], y[keep]
        xt, yt = xt[:256], yt[:256]
    # uint8 on the device (60k × 28 × 28 = 47 MB); converted per batch
    return {"x": x.to(device), "y": y.to(device), "xt": xt.to(device), "yt": yt.to(device)}


def to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 `(N, 28, 28)` or float `(N, 1, 28, 28)` in [0, 1] -> the network's input, 3 channels, ±1."""
    if x.dtype == torch.uint8:
        x = x.float().div(255).unsqueeze(1)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)


class RandAugmentOnDevice:
    """kornia's RandAugment (n=2, m=9 of 30 ≈ 0.3) on `(N, 1, H, W)` floats in [0, 1], run on the images' device."""

    def __init__(self) -> None:
        from kornia.augmentation.auto import RandAugment

        self.op = RandAugment(n=2, m=9)
        self.name = "kornia.augmentation.auto.RandAugment(n=2, m=9)"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rgb = self.op(x.expand(-1, 3, -1, -1))  # kornia's colour ops want 3 channels
        return rgb.mean(1, keepdim=True).clamp(0, 1)


class Batches:
    """An endless validation loader: random batches of the validation split, already on the device."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        while True:
            idx = torch.randperm(len(self.y), generator=self.gen)[: self.batch].to(self.y.device)
            yield to_input(self.x[idx]), self.y[idx]


def run_row(row: str, data: dict, split: dict, args: argparse.Namespace, seed: int, epochs: int,
            max_steps: int | None = None) -> dict:
    device = data["x"].device
    torch.manual_seed(seed)
    model = C.resnet18_28(10, in_chans=3, width=args.width, stem_stride=1).to(device)
    model = model.to(memory_format=torch.channels_last)
    train_idx = split["train_val"] if row == "upstream, train+val" else split["train"]
    steps_per_epoch = max(1, len(train_idx) // args.batch_size)
    if max_steps is not None:
        steps_per_epoch = min(steps_per_epoch, max_steps)
    total = epochs * steps_per_epoch
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(total, 2))
    augment = RandAugmentOnDevice() if row != "no augmentation" else None
    criterion = None
    if row == "SAFLEX default":
        val_idx = split["val"]
        criterion = SaflexLoss(model, Batches(data["x"][val_idx], data["y"][val_idx], args.val_batch_size, 2000 + seed))
    gen = torch.Generator().manual_seed(1000 + seed)
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    kept = []
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen).to(train_idx.device)]
        for s in range(steps_per_epoch):
            idx = order[s * args.batch_size : (s + 1) * args.batch_size]
            xc, yc = data["x"][idx].float().div(255).unsqueeze(1), data["y"][idx]
            if augment is None:
                x, y, is_aug = xc, yc, torch.zeros(len(yc), dtype=torch.bool, device=device)
            else:
                x, y = torch.cat([xc, augment(xc)]), torch.cat([yc, yc])
                is_aug = torch.arange(len(y), device=device) >= len(yc)
            with amp if amp is not None else torch.autocast(device_type="cpu", enabled=False):
                logits = model(to_input(x))
            if criterion is not None:
                loss = criterion(logits, SaflexTarget(y, is_aug))
                kept.append(criterion.last_step["weights"][is_aug].float().mean().detach())
            else:
                per = F.cross_entropy(logits.float(), y, reduction="none")
                w = torch.ones_like(per)
                if row == "confidence weight p[y]":
                    p = logits.detach().float().softmax(-1).gather(1, y[:, None]).squeeze(1)
                    w = torch.where(is_aug, p, w)
                if augment is not None:
                    kept.append(w[is_aug].mean().detach())
                loss = (w * per).sum() / len(y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data["yt"]), 2000):
            with amp if amp is not None else torch.autocast(device_type="cpu", enabled=False):
                out = model(to_input(data["xt"][i : i + 2000]))
            correct += int((out.argmax(-1) == data["yt"][i : i + 2000]).sum())
    out = {"row": row, "seed": seed, "score": correct / len(data["yt"]), "epochs": epochs, "steps": total,
           "train_s": round(train_s, 2), "mean_weight": float(torch.stack(kept).mean()) if kept else None}
    if criterion is not None:
        out["saflex"] = {"rule": str(criterion.rule), "method": criterion.method,
                         "rule_state": {k: float(v) for k, v in (criterion.rule_state or {}).items()}}
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        C.set_threads(1)
    t_start = time.perf_counter()
    data = load(args, device)
    rows = [r for r in args.rows.split("|") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise ValueError(f"--rows must be among {ROWS}, but got {sorted(unknown)}.")
    splits = []
    for seed in range(args.seeds):
        tr, va = stratified_split(data["y"].cpu(), (1 - args.n_val / len(data["y"]), args.n_val / len(data["y"])),
                                  seed=seed)  # fmt: skip
        tr, va = tr.to(device), va.to(device)
        splits.append({"train": tr, "val": va, "train_val": torch.cat([tr, va])})
    # Timed warm-up of the costliest row (SAFLEX): epochs so that every row and seed fits the budget.
    max_steps = 2 if args.quick else None
    warm_steps = 3 if args.quick else 30
    probe_args = argparse.Namespace(**{**vars(args)})
    t0 = time.perf_counter()
    run_row("SAFLEX default", data, splits[0], probe_args, 0, 1, max_steps=warm_steps)
    step_s = (time.perf_counter() - t0) / warm_steps
    steps_per_epoch = len(splits[0]["train_val"]) // args.batch_size
    epochs = max(1, min(args.max_epochs, math.floor(args.budget / (len(rows) * args.seeds * steps_per_epoch * step_s))))
    results = []
    for seed in range(args.seeds):
        for row in rows:
            r = run_row(row, data, splits[seed], args, seed, epochs, max_steps=max_steps)
            results.append(r)
            print(f"{row:24s} seed={seed} acc={r['score']:.4f} epochs={epochs} train {r['train_s']:.0f}s", flush=True)
    table = {}
    base = {r["seed"]: r["score"] for r in results if r["row"] == "upstream, train+val"}
    for row in rows:
        scores = [r["score"] for r in results if r["row"] == row]
        entry = {"scores": scores, "mean": sum(scores) / len(scores)}
        if base and row != "upstream, train+val":
            d = [100 * (r["score"] - base[r["seed"]]) for r in results if r["row"] == row]
            m = sum(d) / len(d)
            se = (sum((x - m) ** 2 for x in d) / (len(d) - 1)) ** 0.5 / len(d) ** 0.5 if len(d) > 1 else float("nan")
            entry["delta_vs_train_val"] = [m, se]
        table[row] = entry
    doc = {
        "settings": {"data": "Fashion-MNIST, full (60k train minus the validation split; official 10k test)",
                     "model": f"timm ResNet-18, 3x3 stride-1 stem, no max-pool, width {args.width}, channels_last"
                              + (", bf16 autocast" if device.type == "cuda" else ""),
                     "augment": "kornia.augmentation.auto.RandAugment(n=2, m=9) on the device, [clean; augmented]",
                     "optimizer": f"Adam lr={args.lr}, one-cycle", "batch": f"{args.batch_size} clean (+ as many "
                     "augmented)", "n_val": args.n_val, "seeds": args.seeds, "epochs": epochs,
                     "budget_s": args.budget, "warmup_step_s": step_s, "quick": args.quick,
                     "saflex_defaults": C.saflex_defaults()},
        "machine": C.machine_string(), "device": str(device), "versions": C.versions(),
        "rows": table, "runs": results, "wall_s": round(time.perf_counter() - t_start, 1),
    }  # fmt: skip
    out = Path(args.out)
    stem = "paper_scale_quick" if args.quick else "paper_scale"
    C.write_json(out / f"{stem}.json", doc)
    plot(doc, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png in {doc['wall_s']:.0f}s")
    return doc


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(doc["rows"])
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    for i, row in enumerate(rows):
        scores = [100 * s for s in doc["rows"][row]["scores"]]
        ax.plot(scores, [i] * len(scores), "o", color="C0", alpha=0.6)
        ax.plot(sum(scores) / len(scores), i, "|", color="k", ms=14)
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%), per seed; | = mean")
    ax.set_title(f"Fashion-MNIST, ResNet-18 w{doc['settings']['model'].split('width ')[1].split(',')[0]}, "
                 f"{doc['settings']['epochs']} epochs — {doc['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
