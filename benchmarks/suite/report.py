"""Entries of ``suite.json``, the analysis behind the README (selection of the default, the goals) and the figure."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import streams as S
from .metrics import paired
from .variants import BY_NAME, DEFAULT, VARIANTS

ORDER = {v.name: i for i, v in enumerate(VARIANTS)}
TV = "upstream, train+val"
CANDIDATES = [v.name for v in VARIANTS if v.role in ("default", "saflex")]


def entry_order(e: dict) -> tuple:
    order = S.PLAN + S.NEW
    plan = order.index(e["stream"]) if e["stream"] in order else 99
    return plan, e["stream"], ORDER.get(e["variant"], 99)


def document(runs: list[dict], plan_streams: list[str], scale: float = 1.0) -> dict:
    by: dict[tuple, list[dict]] = {}
    for r in runs:
        by.setdefault((r["stream"], r["variant"]), []).append(r)
    entries, info = [], {}
    for (stream, name), rs in by.items():
        rs.sort(key=lambda r: r["seed"])
        v = BY_NAME[name]
        dataset, spec = stream.split("/")
        family, layout, _, kind, _ = S.SPECS[spec]
        if stream not in info:
            st = S.build(dataset, spec, 0, scale=scale)
            info[stream] = {"family": family, "layout": layout, "kind": kind, "extra_ratio": round(st.extra_ratio, 2),
                            "bad_fraction": round(st.bad_fraction, 3), "ops": list(st.ops), "half": S.half(stream),
                            "clean_train": len(st.y_train), "val": len(st.y_val), "test": len(st.y_test)}  # fmt: skip
        aurocs = [r.get("auroc") for r in rs]
        e = {
            "stream": stream, "family": family, "extra_ratio": info[stream]["extra_ratio"],
            "bad_fraction": info[stream]["bad_fraction"], "variant": name, "role": v.role, "trains_on": v.trains_on,
            "reference": v.reference if v.kind in ("saflex", "l2rw") else None,
            "seeds": [r["seed"] for r in rs], "scores": [r["score"] for r in rs],
            "auroc": _mean(aurocs),
            "kept": _mean([r.get("kept") for r in rs]),
            "free": v.free, "half": info[stream]["half"],
            "mismatches": None if any(r["mismatches"] is None for r in rs) else sum(r["mismatches"] for r in rs),
        }  # fmt: skip
        if any("gate_on" in r for r in rs):  # the gated rules: share of steps with the gate on
            e["gate_on"] = _mean([r.get("gate_on") for r in rs])
        if any("shadow_auroc" in r for r in rs):
            keys = rs[0]["shadow_auroc"]
            e["shadow_auroc"] = {k: _mean([r["shadow_auroc"][k] for r in rs]) for k in keys}
        if any("op_scores" in r for r in rs):
            e["op_scores"] = op_aggregate([r["op_scores"] for r in rs], info[stream]["ops"])
        entries.append(e)
    entries.sort(key=entry_order)
    return {"entries": entries, "streams": info}


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def op_aggregate(per_seed: list[dict], ops: list[str]) -> dict:
    """Per op: mean over seeds of the in-run mean score, with a 95% interval (t over seeds) and harmful/harmless."""
    out = {}
    for j, name in enumerate(ops):
        means = [d[name][0] for d in per_seed if name in d]
        if not means:
            continue
        m = float(np.mean(means))
        half = 2.57 * float(np.std(means, ddof=1) / math.sqrt(len(means))) if len(means) > 1 else float("nan")
        out[name] = {"mean": m, "ci": [m - half, m + half], "harmful": j >= len(S.HARMLESS_OPS), "seeds": len(means)}
    return out


def op_separation(ops: dict) -> dict:
    """Do the intervals separate the harmful ops (low) from the harmless ones (high)?"""
    harmful = [o for o in ops.values() if o["harmful"]]
    harmless = [o for o in ops.values() if not o["harmful"]]
    if not harmful or not harmless:
        return {"separates": None}
    gap = min(o["ci"][0] for o in harmless) - max(o["ci"][1] for o in harmful)
    return {"separates": bool(gap > 0), "gap": gap,
            "harmless_min_mean": min(o["mean"] for o in harmless), "harmful_max_mean": max(o["mean"] for o in harmful)}


# ---------------------------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------------------------
def index(doc: dict) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for e in doc["entries"]:
        out.setdefault(e["stream"], {})[e["variant"]] = e
    return out


def delta(a: dict, b: dict) -> tuple[float, float]:
    """Paired by seed id (the seeds both entries have): mean and SE of ``a - b`` in points."""
    sa, sb = dict(zip(a["seeds"], a["scores"], strict=False)), dict(zip(b["seeds"], b["scores"], strict=False))
    common = [k for k in sa if k in sb]
    return paired([sa[k] for k in common], [sb[k] for k in common])


def best_free_peer(rows: dict[str, dict], by: str = "score") -> dict | None:
    peers = [e for e in rows.values() if e["role"] == "peer" and e["free"]]
    if by == "auroc":
        peers = [e for e in peers if e["auroc"] is not None]
        return max(peers, key=lambda e: e["auroc"]) if peers else None
    return max(peers, key=lambda e: np.mean(e["scores"])) if peers else None


def selection(doc: dict) -> dict:
    """Choose the SAFLEX row with the best mean paired Δ vs the upstream on train ∪ val on half A; confirm on B."""
    idx = index(doc)
    out: dict = {"criterion": "mean over the half's streams of the paired Δ (points) vs 'upstream, train+val'"}
    for h in ("A", "B"):
        table = {}
        for name in CANDIDATES:
            ds = [delta(rows[name], rows[TV])[0] for s, rows in idx.items()
                  if name in rows and TV in rows and doc["streams"][s]["half"] == h]  # fmt: skip
            if ds:
                table[name] = {"mean_delta": float(np.mean(ds)), "wins": int(sum(d > 0 for d in ds)), "n": len(ds)}
        out[h] = table
    if out["A"]:
        chosen = max(out["A"], key=lambda n: out["A"][n]["mean_delta"])
        out["chosen"] = chosen
        b = out["B"]
        out["confirmed"] = bool(b) and chosen in b and max(b, key=lambda n: b[n]["mean_delta"]) == chosen
        out["best_on_B"] = max(b, key=lambda n: b[n]["mean_delta"]) if b else None
    return out


def goals(doc: dict, row: str = DEFAULT) -> dict:
    idx = index(doc)
    g1, g2, g3, g4 = [], [], [], []
    for s, rows in idx.items():
        st = doc["streams"][s]
        d = rows.get(row)
        if d is None:
            continue
        if TV in rows and st["layout"] == "pool" and st["extra_ratio"] >= 10 and st["bad_fraction"] >= 0.4:
            peer = best_free_peer(rows)
            dv, sv = delta(d, rows[TV])
            dp, sp = delta(d, peer) if peer else (float("nan"), float("nan"))
            oracle = rows.get("oracle")
            og = delta(oracle, rows["upstream"])[0] if oracle and "upstream" in rows else float("nan")
            dg = delta(d, rows["upstream"])[0] if "upstream" in rows else float("nan")
            met = dv >= 1 and dv >= 2 * sv and dp >= 1 and dp >= 2 * sp and (og <= 0 or dg >= og / 2)
            g1.append({"stream": s, "vs_train_val": [dv, sv], "vs_best_free_peer": [dp, sp],
                       "best_free_peer": peer["variant"] if peer else None, "gain_vs_upstream": dg,
                       "oracle_gain": og, "met": bool(met)})  # fmt: skip
        if st["family"] == "noise" and d["auroc"] is not None:
            peer = best_free_peer(rows, by="auroc")
            if peer:
                g2.append({"stream": s, "auroc": d["auroc"], "best_free_peer": peer["variant"],
                           "peer_auroc": peer["auroc"], "met": bool(d["auroc"] >= peer["auroc"] - 0.01)})
        if st["family"] == "clean" and "upstream" in rows:
            dv, sv = delta(d, rows["upstream"])
            g3.append({"stream": s, "vs_upstream": [dv, sv], "met": bool(dv >= -sv)})
        bref = rows.get("SAFLEX margin, reference=batch")
        if bref is not None and TV in rows:
            dv, sv = delta(bref, rows[TV])
            g4.append({"stream": s, "vs_train_val": [dv, sv], "met": bool(dv >= -sv)})
    g1_sets = {x["stream"].split("/")[0] for x in g1 if x["met"]}
    return {
        "1": {"streams": g1, "met": len(g1_sets & set(S.DIGIT_SETS + ("fmnist",))) >= 2
              and len(g1_sets & {"hpc", "churn"}) >= 1},
        "2": {"streams": g2, "met": all(x["met"] for x in g2) if g2 else None},
        "3": {"streams": g3, "met": all(x["met"] for x in g3) if g3 else None},
        "4": {"streams": g4, "met": all(x["met"] for x in g4) if g4 else None},
    }  # fmt: skip


def summary_text(doc: dict) -> str:
    lines = []
    idx = index(doc)
    for s, rows in idx.items():
        base = rows.get(TV)
        for name, e in rows.items():
            d = f"{delta(e, base)[0]:+6.2f} ± {delta(e, base)[1]:.2f}" if base else ""
            auc = "" if e["auroc"] is None else f"{e['auroc']:.3f}"
            lines.append(f"{s:26s} {name[:42]:42s} {100 * np.mean(e['scores']):6.2f}  vsTV {d:16s} auroc {auc}")
    if all(len(e["scores"]) > 1 for e in doc["entries"]):
        sel = selection(doc)
        lines.append(f"chosen on A: {sel.get('chosen')} confirmed on B: {sel.get('confirmed')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# figure
# ---------------------------------------------------------------------------------------------------------------
def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = index(doc)
    names = list(idx)
    fig, axes = plt.subplots(1, 3, figsize=(20, 0.45 * len(names) + 3), gridspec_kw={"width_ratios": [3, 2, 2]})
    ax = axes[0]
    show = [("oracle", "green", "s"), (DEFAULT, "C3", "o"), ("SAFLEX margin, val both ways", "C1", "^"),
            ("SAFLEX margin, reference=batch", "C4", "v"), ("SAFLEX gain_auto", "C5", "D"),
            ("SAFLEX gated_prior, val both ways", "C6", "*"), (PY_PEER, "C7", "x")]
    for i, s in enumerate(names):
        rows = idx[s]
        if TV not in rows:
            continue
        peer = best_free_peer(rows)
        items = show + ([(peer["variant"], "C0", "P")] if peer else [])
        for j, (name, color, marker) in enumerate(items):
            if name in rows:
                d, se = delta(rows[name], rows[TV])
                ax.errorbar(d, i + 0.08 * (j - 4), xerr=se if se == se else 0, fmt=marker, color=color, ms=4,
                            label=("best free peer" if j == len(show) else name) if i == 0 else None)
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy Δ vs the upstream trained on train ∪ val (points, paired by seed, ± SE)")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    for i, s in enumerate(names):
        rows = idx[s]
        for name, color, marker in [(DEFAULT, "C3", "o"), ("small-loss q=30%", "C0", "P"),
                                    ("L2RW max(0, Π[i,y])", "C2", "x"), ("SAFLEX gain_auto", "C5", "D")]:
            if name in rows and rows[name]["auroc"] is not None:
                ax.plot(rows[name]["auroc"], i, marker, color=color, label=name if i == 0 else None)
    ax.axvline(0.5, color="gray", lw=0.8)
    ax.set_yticks(range(len(names)), [""] * len(names))
    ax.invert_yaxis()
    ax.set_xlabel("AUROC of the score for 'augmented sample is bad'")
    ax.legend(fontsize=7)
    ax = axes[2]
    k = 0
    labels = []
    for s in names:
        for name, _color in [(DEFAULT, "C3"), ("small-loss q=30%", "C0")]:
            e = idx[s].get(name)
            if not e or "op_scores" not in e:
                continue
            for op, o in e["op_scores"].items():
                m, (lo, hi) = o["mean"], o["ci"]
                ax.errorbar(m, k, xerr=[[m - lo], [hi - m]], fmt="o", color="C3" if o["harmful"] else "C2")
                labels.append(f"{s.split('/')[0]} {'SAFLEX' if name == DEFAULT else 'small-loss'}: {op}")
                k += 1
            k += 1
            labels.append("")
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("per-op mean score (95% CI over seeds); red = harmful op")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# the goals set for a new default (0.2) (Δ vs the upstream on train ∪ val, paired by seed)
# ---------------------------------------------------------------------------------------------------------------
PY_PEER = "confidence weight p[y]"


def goals_default(doc: dict, row: str, peer: str = PY_PEER) -> dict:
    """The goals 1–5 set for a new default (0.2), for ``row`` as the default, over every stream of ``doc`` with it.

    1. mean Δ ≥ +1.5 and ≥ the ``peer``'s mean (same streams); 2. no stream worse by ≥ 2 SE and ≥ 1 point;
    3. clean streams ≥ −1 SE; 4. ≥ 2 SE better on at least 5 streams; 5. half B and the new streams: mean Δ ≥ +1.0.
    """
    idx = index(doc)
    per = {}
    for s, rows in idx.items():
        if row in rows and TV in rows:
            d, se = delta(rows[row], rows[TV])
            p = delta(rows[peer], rows[TV]) if peer in rows else (float("nan"), float("nan"))
            per[s] = {"delta": [d, se], "peer": list(p), "half": doc["streams"][s]["half"],
                      "family": doc["streams"][s]["family"]}  # fmt: skip
    if not per:
        return {}
    mean = float(np.mean([v["delta"][0] for v in per.values()]))
    peer_mean = float(np.mean([v["peer"][0] for v in per.values()]))
    worse = [s for s, v in per.items() if v["delta"][0] <= -1 and v["delta"][0] <= -2 * v["delta"][1]]
    clean = {s: v["delta"] for s, v in per.items() if v["family"] == "clean"}
    better = [s for s, v in per.items() if v["delta"][0] >= 2 * v["delta"][1] and v["delta"][0] > 0]
    halves = {h: float(np.mean([v["delta"][0] for v in per.values() if v["half"] == h]))
              for h in ("A", "B", "new") if any(v["half"] == h for v in per.values())}  # fmt: skip
    return {
        "row": row, "peer": peer, "streams": per,
        "1": {"mean": mean, "peer_mean": peer_mean, "met": mean >= 1.5 and mean >= peer_mean},
        "2": {"worse": worse, "met": not worse},
        "3": {"clean": clean, "met": all(d >= -se for d, se in clean.values())},
        "4": {"better": better, "n": len(better), "met": len(better) >= 5},
        "5": {"halves": halves, "met": all(halves.get(h, -math.inf) >= 1.0 for h in ("B", "new"))},
    }


FIRST_RUN_ROWS = tuple(v.name for v in VARIANTS if "gated" not in v.name and v.name != PY_PEER + ", train+val")


def first_run(doc: dict) -> dict:
    """``doc`` restricted to the suite's first run: the 16 streams of ``streams.PLAN`` and its 14 rows (what the
    README's generated verdict and tables describe); the gated rows and new streams are in ``suite_goals.json``."""
    keep = [e for e in doc["entries"] if e["stream"] in S.PLAN and e["variant"] in FIRST_RUN_ROWS]
    return {**doc, "entries": keep, "streams": {k: v for k, v in doc["streams"].items() if k in S.PLAN}}

