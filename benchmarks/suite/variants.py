"""What each row of the suite does with the augmented rows: SAFLEX through ``SaflexLoss``, the peers, the baselines.

Every variant sees the same data, initialisation and batch order for a given seed (paired runs); only the weights
of the augmented rows differ (and, for ``trains_on="train+val"``, the clean set the clean rows come from).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import saflex_data.functional as SF


@dataclass(frozen=True)
class Variant:
    name: str
    role: str  # default | saflex | peer | baseline | oracle
    kind: str  # saflex | none | upstream | oracle | smallloss | informed | agreement | confidence | l2rw
    trains_on: str = "train"  # train | train+val
    reference: str | None = None  # heldout | batch | train (SAFLEX and L2RW)
    rule: str = "margin"
    beta: float | None = None
    q: float = 0.3  # small-loss filter: share of the augmented rows dropped
    free: bool = True  # a peer that is not told the truth
    decay: float | None = None  # the gated rules' EMA decay

    def loss_kwargs(self) -> dict:
        return {"rule": SF.Rule(self.rule, beta=self.beta, decay=self.decay)}


DEFAULT = "SAFLEX default (margin β=1.5)"

VARIANTS: tuple[Variant, ...] = (
    Variant("no augmentation", "baseline", "none"),
    Variant("upstream", "baseline", "upstream"),
    Variant("upstream, train+val", "baseline", "upstream", trains_on="train+val"),
    Variant("oracle", "oracle", "oracle"),
    Variant("small-loss q=30%", "peer", "smallloss"),
    Variant("small-loss, told the bad rate (informed)", "peer", "informed", free=False),
    Variant("agreement (argmax = label)", "peer", "agreement"),
    Variant("confidence weight p[y]", "peer", "confidence"),
    Variant("L2RW max(0, Π[i,y])", "peer", "l2rw", reference="heldout"),
    Variant(DEFAULT, "default", "saflex", reference="heldout"),
    Variant("SAFLEX gain_auto", "saflex", "saflex", reference="heldout", rule="gain_auto"),
    Variant("SAFLEX margin, val both ways", "saflex", "saflex", trains_on="train+val", reference="heldout"),
    Variant("SAFLEX margin, reference=batch", "saflex", "saflex", trains_on="train+val", reference="batch"),
    Variant("SAFLEX margin, reference=train", "saflex", "saflex", trains_on="train+val", reference="train"),
    # 0.2: the gated rules (saflex_data.rules), trained on train only and with the validation split used both
    # ways; the settings grid was probed on half A only
    Variant("confidence weight p[y], train+val", "peer", "confidence", trains_on="train+val"),
    *(Variant(f"SAFLEX {r}{'' if b is None else f' β={b}'}{'' if d is None else f' ρ={d}'}{tv}", "saflex", "saflex",
              trains_on="train+val" if tv else "train", reference="heldout", rule=r, beta=b, decay=d)
      for tv in ("", ", val both ways")
      for r in ("gated", "gated_margin", "gated_product", "gated_soft", "gated_prior", "gated_hold", "gated_latch")
      for b, d in ((None, None), (1.0, 0.9), (3.0, 0.98))),
)  # fmt: skip
BY_NAME = {v.name: v for v in VARIANTS}
# The rows of a full run (the probe grid above runs only when named with --variants).
SUITE = tuple(v.name for v in VARIANTS if "gated" not in v.name) + (
    "SAFLEX gated_prior", "SAFLEX gated_prior, val both ways")
# The gated default's choice, made on half A only (benchmarks/README.md): the best mean paired Δ vs the upstream on
# train ∪ val among the gated rows that met goals 2 and 3 on A. Half B and the new streams ran after it was committed.
GATED = "SAFLEX gated_prior, val both ways"
GATED_TRAIN = "SAFLEX gated_prior"
QUICK = ("upstream", "upstream, train+val", "oracle", "small-loss q=30%", DEFAULT,
         "SAFLEX margin, reference=batch", "SAFLEX gated_prior, val both ways")  # fmt: skip


def peer_weights(v: Variant, logits: Tensor, y: Tensor, bad_rate: float, pi: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(weights, score)`` of the augmented rows for a peer; score: higher = keep (for the AUROC)."""
    logits = logits.detach()
    logp = torch.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)
    n = y.shape[0]
    if v.kind in ("smallloss", "informed"):
        q = v.q if v.kind == "smallloss" else bad_rate
        drop = int(math.floor(q * n + 0.5))
        w = torch.ones(n)
        if drop:
            w[logp.argsort()[:drop]] = 0.0  # the highest losses
        return w, logp
    if v.kind == "agreement":
        return (logits.argmax(-1) == y).float(), logp
    if v.kind == "confidence":
        return logp.exp(), logp
    if v.kind == "l2rw":  # Ren et al.'s one-step meta-gradient weight, normalised to mean 1
        gain = pi.gather(1, y[:, None]).squeeze(1)
        w = gain.clamp_min(0)
        total = w.sum()
        return (w * n / total if total > 0 else w), gain
    raise ValueError(f"not a peer: {v.kind!r}")


def l2rw_inner_products(model, xv: Tensor, yv: Tensor, h_aug: Tensor, logits_aug: Tensor) -> Tensor:
    """``Π`` from the plain (``T = 1``) validation loss, through the functional API (last layer)."""
    with torch.no_grad():
        hv = model.features(xv)
        gw, gb = SF.last_layer_validation_gradient(hv, model.fc(hv), yv)
    return SF.last_layer_inner_products(h_aug, logits_aug.detach(), gw, gb)


def oracle_weights(bad: Tensor) -> Tensor:
    return (~bad).float()


def cross_entropy_weighted(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """``Σ w_i CE_i / B``: the normalisation ``SaflexLoss`` uses."""
    return (weights * F.cross_entropy(logits, labels, reduction="none")).sum() / logits.shape[0]
