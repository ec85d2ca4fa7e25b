"""Models and the training loop. SAFLEX rows train with ``saflex_data.SaflexLoss`` as the criterion.

The loop reads each step's decisions from ``criterion.last_step`` and recomputes the scores behind them through
the functional API from the very validation batch the criterion drew (its loader records it), so the AUROC is
the AUROC of the decisions the loss made; every step checks that ``saflex_targets`` on those scores gives
``last_step``'s weights exactly (the count of mismatches is part of each run's record).
"""

from __future__ import annotations

import inspect
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import saflex_data.functional as SF
from saflex_data import SaflexLoss, SaflexTarget
from saflex_data.rules import gated_targets

from .metrics import auroc
from .streams import Stream
from .variants import Variant, cross_entropy_weighted, l2rw_inner_products, oracle_weights, peer_weights

HIDDEN = 128
BATCH = 128
VAL_BATCH = 128
LR = 2e-3
SCORE_EVERY = 4  # decisions and scores are recorded every 4th step (all steps are trained on)
HAS_BATCH_REFERENCE = "reference" in inspect.signature(SaflexLoss).parameters


class MLP(nn.Module):
    """Two hidden layers on the flattened input; ``features`` + ``fc`` (the classifier ``last_layer`` reads)."""

    def __init__(self, d: int, k: int, h: int = HIDDEN) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        self.fc = nn.Linear(h, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class RandomBatches:
    """An endless validation loader of random batches that remembers the batch it yielded last."""

    def __init__(self, x: Tensor, y: Tensor, batch: int, seed: int) -> None:
        self.x, self.y, self.batch = x, y, min(batch, len(y))
        self.gen = torch.Generator().manual_seed(seed)
        self.last: tuple[Tensor, Tensor] | None = None

    def __iter__(self):
        while True:
            idx = torch.randperm(len(self.y), generator=self.gen)[: self.batch]
            self.last = (self.x[idx], self.y[idx])
            yield self.last


class CurrentCleanRows:
    """A reference of the current batch's clean rows (what ``reference="batch"`` does, emulated as a loader)."""

    def __init__(self) -> None:
        self.current: tuple[Tensor, Tensor] | None = None
        self.last: tuple[Tensor, Tensor] | None = None

    def __iter__(self):
        while True:
            self.last = self.current
            yield self.current


def batch_sizes(s: Stream) -> tuple[int, int]:
    """``(clean rows, augmented rows)`` per step: the pool's share of the batch follows its size (at least 16 clean)."""
    if s.layout == "copies":
        return BATCH // 2, BATCH // 2
    clean = max(16, round(BATCH / (1 + s.extra_ratio)))
    return clean, BATCH - clean


def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def make_criterion(s: Stream, v: Variant, model: nn.Module, x_c: Tensor, y_c: Tensor, seed: int):
    """``(SaflexLoss, its reference loader)`` for a SAFLEX row: the public loss with the row's rule and reference.

    ``reference="heldout"``: random validation batches of 128; ``"train"``: random batches of the clean training
    data (a training loader passed as ``val_loader``); ``"batch"``: ``SaflexLoss(reference="batch")`` where the
    installed version has it, else a loader yielding the current batch's clean rows (the same signal, with an
    eval-mode pass over those rows).
    """
    kwargs: dict = {}
    ref: RandomBatches | CurrentCleanRows | None
    if v.reference == "batch" and HAS_BATCH_REFERENCE:
        kwargs, ref = {"reference": "batch"}, None
    elif v.reference == "batch":
        ref = CurrentCleanRows()
    else:
        x, y = (s.x_val, s.y_val) if v.reference == "heldout" else (x_c, y_c)
        ref = RandomBatches(x, y, VAL_BATCH, 2000 + seed)
    criterion = SaflexLoss(model, ref, num_splits=2 if s.layout == "copies" else None, **v.loss_kwargs(), **kwargs)
    return criterion, ref


def run(s: Stream, v: Variant, seed: int, steps: int) -> dict:
    """Train one model; returns the test accuracy and the decision record."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = MLP(s.dim, s.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    gen = torch.Generator().manual_seed(1000 + seed)  # batch order and augmentations: the same for every variant
    x_c, y_c = s.x_train, s.y_train
    if v.trains_on == "train+val":
        x_c, y_c = torch.cat([x_c, s.x_val]), torch.cat([y_c, s.y_val])
    bc, ba = batch_sizes(s)
    copies = s.layout == "copies"
    criterion = ref = None
    if v.kind == "saflex":
        criterion, ref = make_criterion(s, v, model, x_c, y_c, seed)
    elif v.kind == "l2rw":
        ref = RandomBatches(s.x_val, s.y_val, VAL_BATCH, 2000 + seed)
        ref_iter = iter(ref)
    scores, bads, ops = [], [], []
    kept, gate_on = [], []
    mismatches: int | None = 0
    shadow: list[dict[str, Tensor]] = []
    record_from = steps // 10
    for step in range(steps):
        ic = torch.randint(0, len(y_c), (bc,), generator=gen)
        xc, yc = x_c[ic], y_c[ic]
        if copies:
            xa, ya, bad, op = s.draw(ic, xc, yc, gen)
        else:
            ia = torch.randint(0, len(s.y_pool), (ba,), generator=gen)
            xa, ya, bad, op = s.draw(ia, s.x_pool[ia], None, gen)
        if v.kind == "none":
            loss = F.cross_entropy(model(xc), yc)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            continue
        x, y = torch.cat([xc, xa]), torch.cat([yc, ya])
        is_aug = torch.arange(len(y)) >= bc
        h = model.features(x)
        logits = model.fc(h)
        score = None
        if v.kind == "saflex":
            if isinstance(ref, CurrentCleanRows):
                ref.current = (xc, yc)
            if copies:
                target = y
            else:
                batch_op = torch.cat([torch.full((bc,), -1), op]) if s.ops else None
                target = SaflexTarget(y, is_aug, op=batch_op, op_names=s.ops or None)
            state_before = None if criterion.rule_state is None else dict(criterion.rule_state)
            loss = criterion(logits, target)
            w = criterion.last_step["weights"][is_aug].detach()
            if criterion.rule_state is not None:
                gate_on.append(criterion.rule_state["strength"])
            if (step >= record_from and step % SCORE_EVERY == 0) or step == 0:
                h_aug, logits_aug = h[is_aug].detach(), logits[is_aug].detach()
                gate = None if state_before is None else (state_before, h.detach(), logits.detach(), y, is_aug)
                score, check, score_pi = _saflex_scores(criterion, model, ref, h_aug, logits_aug, ya, xc, yc,
                                                        gate=gate)
                if criterion.rule.name in ("paper", "centered", "margin_relabel"):  # Gumbel noise: not comparable
                    mismatches = None
                else:
                    mismatches += int((check != w).sum())
                if v.role == "default" and step >= record_from:
                    shadow.append(_shadow_scores(score_pi, logits[is_aug].detach(), ya))
        else:
            if v.kind == "upstream":
                w = torch.ones(ba)
            elif v.kind == "oracle":
                w = oracle_weights(bad)
            else:
                pi = None
                if v.kind == "l2rw":
                    xv, yv = next(ref_iter)
                    pi = l2rw_inner_products(model, xv, yv, h[is_aug].detach(), logits[is_aug])
                w, score = peer_weights(v, logits[is_aug], ya, s.bad_fraction, pi)
            weights = torch.cat([torch.ones(bc), w])
            loss = cross_entropy_weighted(logits, y, weights)
        if step >= record_from and step % SCORE_EVERY == 0:
            kept.append(w.mean())
            if score is not None:
                scores.append(score.float())
                bads.append(bad)
                ops.append(op)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    out = {"stream": s.name, "variant": v.name, "seed": seed, "score": evaluate(model, s.x_test, s.y_test),
           "kept": float(torch.stack(kept).mean()) if kept else None, "mismatches": mismatches}
    if gate_on:  # the gated rules: share of steps with the gate on, and the first step it was
        on = torch.stack(gate_on).float()
        out["gate_on"] = float(on.mean())
        out["gate_first_on"] = int(on.gt(0).float().argmax()) if bool(on.gt(0).any()) else None
    if shadow:
        bd = torch.cat(bads).numpy()
        out["shadow_auroc"] = {k: auroc(-torch.cat([d[k] for d in shadow]).float().numpy(), bd) for k in shadow[0]}
    if scores:
        sc, bd, op = torch.cat(scores).numpy(), torch.cat(bads).numpy(), torch.cat(ops).numpy()
        out["auroc"] = auroc(-sc, bd)
        if s.ops:  # per-op sums of the score (mean and its spread across runs in the report)
            out["op_scores"] = {name: [float(sc[op == j].mean()), float(sc[op == j].std()), int((op == j).sum())]
                                for j, name in enumerate(s.ops) if (op == j).any()}
    out["wall_s"] = time.perf_counter() - t0
    return out


def _saflex_scores(criterion, model, ref, h_aug, logits_aug, ya, xc, yc, *, gate=None) -> tuple[Tensor, Tensor]:
    """The rule's score of each augmented row and the weights ``saflex_targets`` gives, from the functional API.

    A gated rule (``gate = (state before the step, features, logits, labels, is_augmented)`` of the whole batch):
    the weights of ``saflex_data.rules.gated_targets`` from that state and the clean rows' own-label gain, which
    are also the score (higher = keep).
    """
    if ref is None:  # SaflexLoss(reference="batch"): the clean rows of the training forward
        with torch.no_grad():
            hv = model.features(xc)
        xv_logits, yv = model.fc(hv).detach(), yc
    else:
        xv, yv = ref.last
        with torch.no_grad():
            hv = model.features(xv)
            xv_logits = model.fc(hv)
    gw, gb = SF.last_layer_validation_gradient(hv, xv_logits, yv, temperature=criterion.val_temperature)
    pi = SF.last_layer_inner_products(h_aug, logits_aug, gw, gb)
    if gate is not None:  # the loss's own path: the whole batch's Π and its augmented rows as a mask
        state, h_all, logits_all, y_all, is_aug = gate
        pi_all = SF.last_layer_inner_products(h_all, logits_all, gw, gb)
        rule = criterion.rule
        w, _, _ = gated_targets(pi_all, F.one_hot(y_all, pi.shape[1]).float(), state, rule=rule.name,
                                threshold=rule.beta, decay=rule.decay, logits=logits_all, mask=is_aug)
        return w[is_aug], w[is_aug], pi
    score = SF.weight_scores(pi, ya, rule=criterion.rule.name, logits=logits_aug)
    w, _ = criterion.rule(pi, ya, generator=torch.Generator().manual_seed(0), logits=logits_aug)
    return score, w, pi


def _shadow_scores(pi: Tensor, logits: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Other rules' scores on the default's own draws (no training effect): which score ranks bad samples best."""
    out = {r: SF.weight_scores(pi, y, rule=r, logits=logits) for r in ("margin", "paper", "gain", "gain_loss")}
    out["model log p[y]"] = torch.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)
    return out


