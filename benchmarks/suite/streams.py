"""Streams with per-sample truth: which augmented sample is bad is known for every draw.

Two layouts:

* ``pool``: a clean training set plus a disjoint extra pool (offline or generated data) ``extra_ratio`` times its
  size; each step mixes clean rows and pool rows (lightly augmented on the fly), and the pool rows are the
  augmented ones.
* ``copies``: each step's batch is ``[clean rows; augmented copies of the same rows]`` (timm's ``--aug-splits``,
  ``SaflexLoss(num_splits=2)``).

Families: ``noise`` (wrong upstream labels, uniform or class-conditional), ``transform`` (ops that change or
destroy the label, drawn per sample among harmless ones), ``bias`` (a spurious stamp, class imbalance, a style
validation and test have), ``clean`` (nothing bad).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import data

# name -> (family, layout, extra_ratio, kind, bad_fraction)
#   kind: "uniform" / "classcond" (wrong labels), "ops" (transforms), "stamp" / "imbalance" / "style" (bias), "clean"
SPECS: dict[str, tuple[str, str, float, str, float]] = {
    "pool10-uniform10": ("noise", "pool", 10, "uniform", 0.1),
    "pool10-uniform30": ("noise", "pool", 10, "uniform", 0.3),
    "pool10-uniform60": ("noise", "pool", 10, "uniform", 0.6),
    "pool10-classcond10": ("noise", "pool", 10, "classcond", 0.1),
    "pool10-classcond30": ("noise", "pool", 10, "classcond", 0.3),
    "pool10-classcond60": ("noise", "pool", 10, "classcond", 0.6),
    "pool3-uniform30": ("noise", "pool", 3, "uniform", 0.3),
    "pool30-uniform60": ("noise", "pool", 30, "uniform", 0.6),
    "pool30-classcond60": ("noise", "pool", 30, "classcond", 0.6),
    "copies-uniform30": ("noise", "copies", 1, "uniform", 0.3),
    "pool10-ops": ("transform", "pool", 10, "ops", float("nan")),
    "copies-ops": ("transform", "copies", 1, "ops", float("nan")),
    "pool10-stamp": ("bias", "pool", 10, "stamp", 0.9),
    "pool10-imbalance": ("bias", "pool", 10, "imbalance", float("nan")),
    "pool10-style": ("bias", "pool", 10, "style", 0.7),
    "pool10-clean": ("clean", "pool", 10, "clean", 0.0),
    "copies-clean": ("clean", "copies", 1, "clean", 0.0),
    # 0.2: streams added before the gated rule was chosen, looked at only after (streams.NEW)
    "pool10-pairswap40": ("noise", "pool", 10, "pairswap", 0.4),
    "pool10-uniform30-table": ("noise", "pool", 10, "uniform", 0.3),
    "copies-cutmix": ("transform", "copies", 1, "cutmix", 0.5),
    "pool10-rotate": ("domain", "pool", 10, "rotate", 0.5),
}

# data set -> (clean train, validation, test) sizes
SIZES = {"fmnist": (1000, 300, 2000), "mnist": (250, 150, 1000), "digits": (100, 100, 500),
         "hpc": (200, 150, 1000), "churn": (200, 150, 1500), "credit": (200, 150, 1000)}  # fmt: skip

# The streams of the committed run, sized to the compute budget (16 streams x 14 variants x 6 seeds). The selection
# halves alternate through this list, so each half has every family.
PLAN = (
    "fmnist/pool10-uniform60", "mnist/pool10-uniform60", "fmnist/pool10-classcond60", "hpc/pool10-uniform60",
    "fmnist/pool10-clean", "mnist/copies-clean", "fmnist/pool30-uniform60", "digits/pool10-classcond30",
    "fmnist/copies-uniform30", "mnist/pool10-ops", "digits/copies-ops", "fmnist/pool10-stamp",
    "churn/pool10-imbalance", "digits/pool10-style", "fmnist/pool3-uniform30", "hpc/pool10-uniform10",
)  # fmt: skip
QUICK_PLAN = ("digits/pool10-uniform60", "hpc/copies-uniform30")
# 0.2: new streams, fixed before the gated default was chosen and run only after the choice was committed:
# pairwise label swaps (each class with one partner, both ways, as a generator that mixes up two classes), another
# table (credit scoring) with uniform wrong labels, heavy CutMix on clean data (the base image's label kept, bad =
# the pasted patch covers more than half the image), and a rotated domain (half the pool turned by 90°, labels right).
NEW = ("mnist/pool10-pairswap40", "credit/pool10-uniform30-table", "fmnist/copies-cutmix", "fmnist/pool10-rotate",
       "hpc/pool10-pairswap40")  # fmt: skip


def half(stream: str) -> str:
    """``"A"`` (where the default is chosen), ``"B"`` (where it is confirmed: alternate positions of PLAN) or
    ``"new"`` (the streams of :data:`NEW`, held out until the choice was made)."""
    if stream in NEW:
        return "new"
    return "AB"[PLAN.index(stream) % 2] if stream in PLAN else "A"


HARMLESS_OPS = ("shift", "noise")
HARMFUL_OPS = ("vflip", "crop-miss", "occlusion")
DIGIT_SETS = ("mnist", "digits")


def op_names(dataset: str) -> tuple[str, ...]:
    """The ops of a transform stream; the harmful ones follow the harmless ones (180° rotation on digits only)."""
    return HARMLESS_OPS + HARMFUL_OPS + (("rot180",) if dataset in DIGIT_SETS else ())


@dataclass
class Stream:
    name: str  # "<dataset>/<spec>"
    dataset: str
    spec: str
    family: str
    layout: str
    extra_ratio: float
    bad_fraction: float  # the share of bad augmented samples (measured on the pool or the op mix)
    image: bool
    num_classes: int
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    x_pool: Tensor | None = None  # pool layout: the extra samples, their upstream labels and truth
    y_pool: Tensor | None = None
    bad_pool: Tensor | None = None
    confusable: Tensor | None = None  # class -> its fixed confusable class (class-conditional noise)
    ops: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))

    def draw(self, idx: Tensor, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Augmented rows from source rows ``x, y`` (pool rows, or the batch's clean rows for ``copies``).

        Returns ``(x_aug, upstream labels, bad, op)``; ``op`` is -1 outside the transform streams.
        """
        n = x.shape[0]
        op = torch.full((n,), -1, dtype=torch.long)
        kind = SPECS[self.spec][3]
        if self.layout == "pool":
            y_up, bad = self.y_pool[idx], self.bad_pool[idx]
        else:
            y_up, bad = y.clone(), torch.zeros(n, dtype=torch.bool)
            if kind in ("uniform", "classcond"):
                bad = torch.rand(n, generator=gen) < self.bad_fraction
                y_up = torch.where(bad, _wrong(y, kind, self.num_classes, self.confusable, gen), y)
        if kind == "cutmix":
            return _with_label(_cutmix(x, gen), y_up, op)
        if kind == "ops":
            op = torch.randint(0, len(self.ops), (n,), generator=gen)
            bad = op >= len(HARMLESS_OPS)
            return _apply_ops(x, op, self.ops, gen), y_up, bad, op
        return light_augment(x, self.image, gen), y_up, bad, op


def _with_label(mixed: tuple[Tensor, Tensor], y: Tensor, op: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, bad = mixed
    return x, y, bad, op


def _cutmix(x: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Heavy CutMix on clean rows: a square patch of a random other row, its area a uniform share of the image (on
    the grid of patch sides); the base row's label is kept. Returns ``(images, bad = patch area > 1/2)``."""
    n, side = x.shape[0], x.shape[-1]
    partner = torch.randperm(n, generator=gen)
    area = torch.rand(n, generator=gen)
    sides = (area.sqrt() * side).round().long().clamp(0, side)
    out = x.clone()
    for i in range(n):
        c = int(sides[i])
        if c == 0:
            continue
        r, q = torch.randint(0, side - c + 1, (2,), generator=gen).tolist()
        out[i, r : r + c, q : q + c] = x[partner[i], r : r + c, q : q + c]
    return out, (sides.float() ** 2 / side**2) > 0.5


def _pairs(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Class -> its partner: classes matched in pairs, nearest mean inputs first (an odd class out keeps itself)."""
    flat = x.reshape(len(x), -1)
    means = np.stack([flat[y == c].mean(0) for c in range(k)])
    d = ((means[:, None] - means[None]) ** 2).sum(-1)
    partner = np.arange(k)
    free = set(range(k))
    for flat_i in np.argsort(d, axis=None):
        a, b = divmod(int(flat_i), k)
        if a != b and a in free and b in free:
            partner[a], partner[b] = b, a
            free -= {a, b}
    return partner


def _wrong(y: Tensor, kind: str, k: int, confusable: Tensor | None, gen: torch.Generator) -> Tensor:
    if kind == "classcond":
        return confusable[y]
    return (y + torch.randint(1, k, y.shape, generator=gen)) % k


def light_augment(x: Tensor, image: bool, gen: torch.Generator) -> Tensor:
    """The harmless upstream augmentation: a random shift of up to 1/14 of the side (images), jitter σ=0.1 (tables)."""
    if not image:
        return x + 0.1 * torch.randn(x.shape, generator=gen)
    return _shift(x, gen)


def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    side = x.shape[-1]
    s = max(1, side // 14)
    dy, dx = (torch.randint(-s, s + 1, (2,), generator=gen)).tolist()
    pad = F.pad(x, (s, s, s, s))
    return pad[..., s + dy : s + dy + side, s + dx : s + dx + side]


def _apply_ops(x: Tensor, op: Tensor, names: tuple[str, ...], gen: torch.Generator) -> Tensor:
    out = x.clone()
    side = x.shape[-1]
    for j, name in enumerate(names):
        sel = (op == j).nonzero().squeeze(1)
        if not len(sel):
            continue
        xs = x[sel]
        if name == "shift":
            xs = _shift(xs, gen)
        elif name == "noise":
            xs = (xs + 0.1 * torch.randn(xs.shape, generator=gen)).clamp(0, 1)
        elif name == "vflip":
            xs = xs.flip(-2)
        elif name == "rot180":
            xs = xs.flip(-1).flip(-2)
        elif name == "crop-miss":  # a corner crop of a quarter of the side, scaled up: mostly background
            c = side // 4
            corner = int(torch.randint(0, 4, (1,), generator=gen))
            r0, c0 = (0 if corner < 2 else side - c), (0 if corner % 2 == 0 else side - c)
            patch = xs[:, r0 : r0 + c, c0 : c0 + c].unsqueeze(1)
            xs = F.interpolate(patch, size=(side, side), mode="nearest").squeeze(1)
        elif name == "occlusion":  # a block of 5/7 of the side (51% of the image) set to the background
            b = (5 * side) // 7
            r, c = torch.randint(0, side - b + 1, (2,), generator=gen).tolist()
            xs = xs.clone()
            xs[:, r : r + b, c : c + b] = 0.0
        out[sel] = xs
    return out


def _stamp(x: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """A bright square whose position along the border encodes ``cls`` (images)."""
    side = x.shape[-1]
    s = max(2, side // 9)
    out = x.copy()
    k_per_side = max(1, (side - s) // s)
    for i, c in enumerate(cls):
        pos = int(c) % k_per_side
        edge = int(c) // k_per_side
        r, col = (0, pos * s) if edge == 0 else (pos * s, 0) if edge == 1 else (side - s, pos * s)
        out[i, r : r + s, col : col + s] = 1.0
    return out


def _confusable(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Each class's nearest other class by the distance of their mean inputs (a generator's likely confusion)."""
    flat = x.reshape(len(x), -1)
    means = np.stack([flat[y == c].mean(0) for c in range(k)])
    d = ((means[:, None] - means[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return d.argmin(1)


def build(dataset: str, spec: str, seed: int, *, scale: float = 1.0) -> Stream:
    """One stream, deterministic in ``(dataset, spec, seed)``. ``scale`` shrinks every split (the quick mode)."""
    family, layout, ratio, kind, frac = SPECS[spec]
    x_all, y_all, x_test_all, y_test_all = data.load(dataset)
    k = data.num_classes(dataset)
    image = data.is_image(dataset)
    rng = np.random.default_rng(10_000 + seed)
    n_tr, n_va, n_te = (max(k * 4, int(n * scale)) for n in SIZES[dataset])
    n_pool = int(round(ratio * n_tr)) if layout == "pool" else 0
    perm = rng.permutation(len(y_all))
    if x_test_all is None:
        te, perm = perm[:n_te], perm[n_te:]
        x_te, y_te = x_all[te], y_all[te]
    else:
        te = rng.choice(len(y_test_all), n_te, replace=False)
        x_te, y_te = x_test_all[te], y_test_all[te]
    prior = np.ones(k)
    if kind == "imbalance":  # class c kept with probability 0.1 ** (rank / (K-1)) in the training data
        prior = 0.1 ** (rng.permutation(k) / max(1, k - 1))
    # balanced validation; the clean training split follows the prior
    va = np.concatenate([perm[y_all[perm] == c][: n_va // k] for c in range(k)])
    rest = np.setdiff1d(perm, va, assume_unique=True)
    rest = rest[rng.permutation(len(rest))]
    want = np.maximum(1, np.round(n_tr * prior / prior.sum())).astype(int)
    tr = np.concatenate([rest[y_all[rest] == c][: want[c]] for c in range(k)])
    rest = np.setdiff1d(rest, tr, assume_unique=True)
    rest = rest[rng.permutation(len(rest))]
    po = np.zeros(0, dtype=np.int64)
    bad = np.zeros(0, dtype=bool)
    if layout == "pool":
        if kind == "imbalance":
            keep = rng.random(len(rest)) < (prior / prior.max())[y_all[rest]]
            po = rest[keep][:n_pool]
        else:
            po = rest[:n_pool]
        bad = np.zeros(len(po), dtype=bool)
    x_tr, y_tr, x_va, y_va = x_all[tr], y_all[tr], x_all[va], y_all[va]
    x_po, y_po_true = x_all[po], y_all[po]
    y_po = y_po_true.copy()
    confusable = _confusable(x_all, y_all, k)
    if kind == "pairswap":
        confusable = _pairs(x_all, y_all, k)
    if kind in ("uniform", "classcond", "pairswap") and layout == "pool":
        bad = rng.random(len(po)) < frac
        wrong = confusable[y_po] if kind in ("classcond", "pairswap") else (y_po + rng.integers(1, k, len(po))) % k
        bad &= wrong != y_po
        y_po = np.where(bad, wrong, y_po)
    elif kind == "rotate":  # half the pool turned by 90°, labels right; validation and test upright
        bad = rng.random(len(po)) < frac
        x_po = np.where(bad[:, None, None], np.rot90(x_po, 1, axes=(1, 2)), x_po)
    elif kind == "stamp":  # 90% of train and pool stamped with the label's mark; val/test with a random one
        def stamp(x, y, correlated):
            marked = rng.random(len(y)) < frac
            cls = np.where(correlated & marked, y, rng.integers(0, k, len(y)))
            if image:
                return _stamp(x, cls), correlated & marked
            col = (cls + 0.3 * rng.standard_normal(len(y))).astype(np.float32)[:, None]
            return np.concatenate([x, col], 1), correlated & marked
        x_tr, _ = stamp(x_tr, y_tr, np.ones(len(y_tr), bool))
        x_po, bad = stamp(x_po, y_po, np.ones(len(po), bool))
        x_va, _ = stamp(x_va, y_va, np.zeros(len(y_va), bool))
        x_te, _ = stamp(x_te, y_te, np.zeros(len(y_te), bool))
    elif kind == "imbalance":  # bad = the pool's excess over the rarest class's count, chosen at random
        counts = np.bincount(y_po, minlength=k)
        floor = counts[counts > 0].min()
        for c in range(k):
            idx = np.flatnonzero(y_po == c)
            bad[rng.permutation(idx)[floor:]] = True
    elif kind == "style":  # validation and test are inverted; the pool produces it 30% of the time
        styled = rng.random(len(po)) < 1 - frac
        x_po = np.where(styled[:, None, None], 1.0 - x_po, x_po)
        bad = ~styled
        x_va, x_te = 1.0 - x_va, 1.0 - x_te
    if not image:  # standardise on the clean training split
        mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-3
        x_tr, x_va, x_te = (x_tr - mu) / sd, (x_va - mu) / sd, (x_te - mu) / sd
        x_po = (x_po - mu) / sd if len(po) else x_po
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    ti = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
    ops = op_names(dataset) if kind == "ops" else ()
    if kind == "ops":
        frac = (len(ops) - len(HARMLESS_OPS)) / len(ops)
    elif layout == "pool" and kind != "clean":
        frac = float(bad.mean())
    return Stream(
        name=f"{dataset}/{spec}", dataset=dataset, spec=spec, family=family, layout=layout,
        extra_ratio=(len(po) / len(tr)) if layout == "pool" else 1.0, bad_fraction=float(frac), image=image,
        num_classes=k, x_train=t(x_tr), y_train=ti(y_tr), x_val=t(x_va), y_val=ti(y_va), x_test=t(x_te),
        y_test=ti(y_te), x_pool=t(x_po) if layout == "pool" else None, y_pool=ti(y_po) if layout == "pool" else None,
        bad_pool=torch.from_numpy(bad) if layout == "pool" else None, confusable=ti(confusable), ops=ops,
    )  # fmt: skip
