"""Print the results section of ``docs/results.md`` (markdown) from ``benchmarks/results/*.json``; with
``--verdict``, the README's first-screen verdict; with ``--demo``, the demo paragraph of ``docs/results.md``.

Usage::

    python benchmarks/make_readme_tables.py [--results benchmarks/results] > results.md

First "SAFLEX vs the alternatives" from the known-truth suite (``suite.json``, ``python -m benchmarks.suite.run``):
per stream, the default, the best SAFLEX row, the best free peer, the informed peer and the oracle against the
upstream trained on train ∪ validation (paired by seed, ± SE); every row of the suite over all streams; the default
chosen on half of the streams and confirmed on the other half; the goals; the per-op aggregates; and when to use
SAFLEX. Then, for each ``accuracy_<dataset>.json``: one table with mean ± std over seeds, and for every SAFLEX row
its gain over the same upstream alone and over that upstream trained on train ∪ validation; a summary of all SAFLEX
rows per method, and the cost tables (:func:`cost_section`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parents[1]))


def _mean(scores: list[float]) -> float:
    return statistics.fmean(scores)


def _ms(scores: list[float]) -> str:
    std = statistics.stdev(scores) if len(scores) > 1 else 0.0
    return f"{_mean(scores):.2f} ± {std:.2f}"


def _delta(a: float | None) -> str:
    return "" if a is None else f"{a:+.2f}"


def _find(rows: list[dict], upstream: str | None, train_on_val: bool) -> dict | None:
    for r in rows:
        if r["saflex"] is None and r["upstream"] == upstream and r["train_on_val"] == train_on_val:
            return r
    return None


def accuracy_tables(payloads: list[dict]) -> tuple[str, list[dict]]:
    lines, gains = [], []
    for p in payloads:
        rows, metric = p["rows"], p["metric"]
        n = len(rows[0]["scores"]) if rows else 0
        s = p.get("settings", {})
        lines.append(f"#### {p['dataset']} ({metric}, {n} seeds)\n")
        if s.get("analogue_of") or s.get("source"):
            lines.append(f"_{s.get('source', '')}; analogue of: {s.get('analogue_of', '')}_\n")
        lines.append(f"| row | {metric} (%) | Δ vs upstream | Δ vs upstream on train ∪ val |")
        lines.append("|---|---:|---:|---:|")
        for r in rows:
            d1 = d2 = None
            if r["saflex"]:
                base, base_val = _find(rows, r["upstream"], False), _find(rows, r["upstream"], True)
                d1 = _mean(r["scores"]) - _mean(base["scores"]) if base else None
                d2 = _mean(r["scores"]) - _mean(base_val["scores"]) if base_val else None
                variant = p["dataset"].split("__", 1)[1] if "__" in p["dataset"] else "library defaults"
                gains.append({"dataset": p["dataset"], "row": r["name"], "method": r["saflex"], "variant": variant,
                              "vs_upstream": d1, "vs_upstream_train_val": d2})  # fmt: skip
            name = f"**{r['name']}**" if r["saflex"] else r["name"]
            lines.append(f"| {name} | {_ms(r['scores'])} | {_delta(d1)} | {_delta(d2)} |")
        machine = p.get("machine", "")
        commit = p.get("versions", {}).get("git_commit", "")
        lines.append(f"\n<sub>{machine}; commit {commit}; {s.get('model', '')}; {s.get('optimizer', '')}</sub>\n")
    return "\n".join(lines), gains


def summary(gains: list[dict]) -> str:
    if not gains:
        return ""
    lines = ["| SaflexLoss settings | method | SAFLEX rows | wins vs upstream | mean Δ vs upstream | "
             "wins vs upstream on train ∪ val | mean Δ vs upstream on train ∪ val |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    keys = sorted({(g["variant"] != "library defaults", g["variant"], g["method"]) for g in gains})
    for _, variant, method in keys:
        gs = [g for g in gains if g["method"] == method and g["variant"] == variant]
        d1 = [g["vs_upstream"] for g in gs if g["vs_upstream"] is not None]
        d2 = [g["vs_upstream_train_val"] for g in gs if g["vs_upstream_train_val"] is not None]
        lines.append(
            f"| {variant} | {method} | {len(gs)} | {sum(d > 0 for d in d1)}/{len(d1)} | "
            f"{_delta(statistics.fmean(d1)) if d1 else ''}"
            f" | {sum(d > 0 for d in d2)}/{len(d2)} | {_delta(statistics.fmean(d2)) if d2 else ''} |"
        )
    return "\n".join(lines)


def _pm(d: tuple[float, float], bold: bool = True) -> str:
    mean, se = d
    text = f"{mean:+.2f} ± {se:.2f}"
    return f"**{text}**" if bold and se > 0 and abs(mean) >= 2 * se else text


def suite_section(path: Path) -> str:
    """The README's lead: SAFLEX vs the alternatives on the known-truth suite."""
    if not path.is_file():
        return ""
    from benchmarks.suite import report

    doc = report.first_run(json.loads(path.read_text()))  # the first run; the gated default: docs/when_to_use.md
    idx, info, meta = report.index(doc), doc["streams"], doc["meta"]
    tv, default = report.TV, report.DEFAULT
    seeds = max(len(e["seeds"]) for e in doc["entries"])
    lines = [f"{len(idx)} streams with per-sample truth, {seeds} seeds, every row at the same budget (same data, "
             f"initialisation and batch order per seed), test accuracy Δ in points against **the upstream trained on "
             f"train ∪ validation** (what a user does with the labels SAFLEX spends on validation), paired by seed, "
             f"± SE; **bold**: ≥ 2 SE. Generated by `python -m benchmarks.suite.run` "
             f"({meta['wall_s'] / 60:.0f} min on a shared 2-core CPU, commit {meta['commit']}); "
             "`benchmarks/README.md` describes the streams and every row.\n",
             "| stream | family | extra : clean | bad | upstream on train ∪ val (%) | SAFLEX default | best other "
             "SAFLEX row | best free peer | informed small-loss | oracle | AUROC default / best free peer |",
             "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]  # fmt: skip
    for stream, rows in idx.items():
        st = info[stream]
        if tv not in rows or default not in rows:
            continue
        others = [e for e in rows.values() if e["role"] == "saflex"]
        best = max(others, key=lambda e: report.delta(e, rows[tv])[0]) if others else None
        peer = report.best_free_peer(rows)
        apeer = report.best_free_peer(rows, by="auroc")
        informed = rows.get("small-loss, told the bad rate (informed)")
        oracle = rows.get("oracle")
        d = rows[default]
        auc = "" if d["auroc"] is None else f"{d['auroc']:.2f} / " + ("" if apeer is None else f"{apeer['auroc']:.2f}")
        ratio = "copies" if st["layout"] == "copies" else f"{st['extra_ratio']:g}"
        lines.append(
            f"| {stream} | {st['family']} | {ratio} | {100 * st['bad_fraction']:.0f}% | "
            f"{100 * statistics.fmean(rows[tv]['scores']):.1f} | {_pm(report.delta(d, rows[tv]))} | "
            + (f"{best['variant'].removeprefix('SAFLEX ')}: {_pm(report.delta(best, rows[tv]))}" if best else "")
            + f" | {peer['variant']}: {_pm(report.delta(peer, rows[tv]))} | "
            + (_pm(report.delta(informed, rows[tv])) if informed else "") + " | "
            + (_pm(report.delta(oracle, rows[tv])) if oracle else "") + f" | {auc} |"
        )
    lines += ["", "Every row over all streams (Δ vs the upstream on train ∪ val; AUROC for \"this augmented sample "
              "is bad\", mean over the streams where it applies):\n",
              "| row | role | trains on | reference | mean Δ | streams ≥ +2 SE | streams ≤ −2 SE | mean AUROC |",
              "|---|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    names = list(dict.fromkeys(e["variant"] for e in doc["entries"]))
    for name in names:
        ds = [report.delta(rows[name], rows[tv]) for rows in idx.values() if name in rows and tv in rows]
        aucs = [rows[name]["auroc"] for rows in idx.values() if name in rows and rows[name]["auroc"] is not None]
        e0 = next(e for e in doc["entries"] if e["variant"] == name)
        ref = e0["reference"] or ""
        label = f"**{name}**" if e0["role"] == "default" else name
        lines.append(
            f"| {label} | {e0['role']}{'' if e0['free'] else ' (informed)'} | {e0['trains_on']} | {ref} | "
            f"{statistics.fmean(d for d, _ in ds):+.2f} | {sum(se > 0 and d >= 2 * se for d, se in ds)}/{len(ds)} | "
            f"{sum(se > 0 and d <= -2 * se for d, se in ds)}/{len(ds)} | "
            + (f"{statistics.fmean(aucs):.3f}" if aucs else "") + " |"
        )
    sel = report.selection(doc)
    if "chosen" in sel:
        a, b = sel["A"], sel["B"]
        lines += ["", "**Choosing the default on half of the streams (A), confirming on the other half (B).** "
                  "Criterion: the mean paired Δ vs the upstream on train ∪ val over the half's streams.\n",
                  "| SAFLEX row | half A: mean Δ (wins) | half B: mean Δ (wins) |", "|---|---:|---:|"]  # fmt: skip
        for name in a:
            lines.append(f"| {name} | {a[name]['mean_delta']:+.2f} ({a[name]['wins']}/{a[name]['n']}) | "
                         + (f"{b[name]['mean_delta']:+.2f} ({b[name]['wins']}/{b[name]['n']})" if name in b else "")
                         + " |")  # fmt: skip
        lines.append(f"\nChosen on A: **{sel['chosen']}**; on B the best is {sel['best_on_B']} "
                     f"({'confirmed' if sel['confirmed'] else 'not confirmed'}).")
    g = report.goals(doc)
    lines += ["", "**Goals** (for the library default):\n", "| goal | met | where |", "|---|---|---|"]
    g1 = g["1"]["streams"]
    lines.append("| 1. extra ≥ 10× clean, ≥ 40% bad: beats the upstream on train ∪ val and the best free peer by "
                 "≥ 1 point (≥ 2 SE) on ≥ 2 image sets and 1 table, recovering ≥ half the oracle's gain | "
                 f"{'yes' if g['1']['met'] else '**no**'} | "
                 + "; ".join(f"{x['stream']}: {x['vs_train_val'][0]:+.2f} / {x['vs_best_free_peer'][0]:+.2f}"
                             for x in g1) + " (Δ vs train ∪ val / vs best free peer) |")  # fmt: skip
    g2 = g["2"]["streams"]
    lines.append("| 2. wrong labels: AUROC ≥ best free peer − 0.01 | "
                 f"{'yes' if g['2']['met'] else '**no**'} | "
                 + "; ".join(f"{x['stream']}: {x['auroc']:.2f} vs {x['peer_auroc']:.2f}" for x in g2) + " |")
    g3 = g["3"]["streams"]
    lines.append("| 3. clean streams: ≥ the upstream within 1 SE | "
                 f"{'yes' if g['3']['met'] else '**no**'} | "
                 + "; ".join(f"{x['stream']}: {_pm(tuple(x['vs_upstream']), False)}" for x in g3) + " |")
    g4 = g["4"]["streams"]
    missed = [x for x in g4 if not x["met"]]
    lines.append("| 4. `reference=\"batch\"` ≥ the upstream on all the data within 1 SE, every stream | "
                 f"{'yes' if g['4']['met'] else '**no**'} | {len(g4) - len(missed)}/{len(g4)} streams; missed: "
                 + "; ".join(f"{x['stream']}: {_pm(tuple(x['vs_train_val']), False)}" for x in missed) + " |")
    ops_lines = []
    for stream, rows in idx.items():
        for name in (default, "small-loss q=30%"):
            e = rows.get(name)
            if e and "op_scores" in e:
                sep = report.op_separation(e["op_scores"])
                per = ", ".join(f"{op} {o['mean']:+.2f}" for op, o in e["op_scores"].items())
                ops_lines.append(f"| {stream} | {name} | {'yes' if sep['separates'] else 'no'} | {per} |")
    if ops_lines:
        lines += ["", "**Per-op aggregates** (transform streams; do the per-op means of the score, with 95% "
                  "t-intervals over seeds, put every harmful op below every harmless one? harmless: shift, noise):\n",
                  "| stream | score | separates | per-op mean score |", "|---|---|---|---|", *ops_lines]  # fmt: skip
    return "\n".join(lines) + "\n"


def cost_section(root: Path) -> str:
    """The "Overhead per training step" subsection: ``overhead.json`` (the fixed setting, each method and the
    recommended settings), ``scaling.json`` (models × classes × batch, SAFLEX and the alternatives),
    ``overhead_timm_loop.json`` (timm's loop) and the fixed-statistics JVP's agreement with the exact one."""

    def x(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}×"

    def load(name: str) -> dict | None:
        f = root / name
        return json.loads(f.read_text()) if f.is_file() else None

    lines: list[str] = []
    o = load("overhead.json")
    if o:
        s = o.get("setting", {})
        lines += [f"**One setting** (`overhead.py`: {s.get('model', '')}, {s.get('input', '')}, batch "
                  f"{s.get('batch', '')}, validation batch {s.get('val_batch', '')}, Adam). Plain step "
                  f"{o['plain_ms']:.0f} ms ({o['machine']}, torch {o['torch']}, {s.get('threads', '?')} threads"
                  + (f", load average {s['load_average_at_end'][0]:.1f} at the end" if s.get("load_average_at_end")
                     else "")
                  + "); variants interleaved in one process. On a loaded machine wall time mostly measures the "
                  "other processes; CPU time is this process's own work.\n",
                  "| variant | what | step time / plain (median) | (mean) | CPU time / plain (median) | "
                  "peak memory / plain |",
                  "|---|---|---:|---:|---:|---:|"]  # fmt: skip
        described = s.get("variants", {})
        for v, r in o["ratio"].items():
            what = described.get(v, "").replace("SaflexLoss(", "`SaflexLoss(")
            what = what.replace("), validation", ")`, validation")
            lines.append(f"| {v} | {what} | {x(r)} | {x(o.get('ratio_mean', {}).get(v))} | "
                         f"{x(o.get('cpu_ratio', {}).get(v))} | {x(o.get('peak_rss_ratio', {}).get(v))} |")  # fmt: skip
        lines += ["", "`jvp` is the exact `Π`. With train-mode BatchNorm it needs the JVP of the whole batch (clean "
                  "rows too): the batch statistics depend on θ through every row, and their tangent is part of each "
                  "augmented row's gradient. `jvp_frozen_stats` holds the statistics of the step's training forward "
                  "fixed and runs the JVP over the augmented rows only: cheaper, and a different `Π` (the gradient "
                  "of a network whose BatchNorm normalises with constants); for a model without batch-statistics "
                  "BatchNorm the two are the same. `@every4` (`val_every=4`) refreshes the validation gradient on "
                  "one step in four: read its mean, not its median."]
        agreement = (o.get("frozen_stats_agreement") or {}).get("median_over_all")
        if agreement:
            lines += ["", "`jvp_frozen_stats` against the exact `jvp` (same batches; "
                      f"{o['frozen_stats_agreement']['setting']}; medians): relative error "
                      f"{agreement['relative_error']:.2f}, rank correlation of the entries "
                      f"{agreement['spearman_entries']:.2f} and of the default rule's scores "
                      f"{agreement['spearman_margin_scores']:.2f}, identical keep/drop decisions "
                      f"{100 * agreement['decision_agreement']:.0f}%, AUROC for the wrong labels "
                      f"{agreement['auroc_wrong_label_fixed']:.2f} vs {agreement['auroc_wrong_label_exact']:.2f}."]
        lines.append("")
    sc = load("scaling.json")
    if sc:
        st = sc["settings"]
        paths = [p for p in st["paths"] if p != "plain"]
        cpu = all(r.get("cpu_ratio") is not None for r in sc["rows"])  # a loaded machine: process CPU time
        what = ("Process CPU time of a step / plain's (" + sc["quiet"] + ")" if cpu and sc.get("quiet")
                else "Step time / plain")
        lines += [f"**Scaling** (`scaling.py`; {sc['machine']}; {st['saflex']}; medians of {st['reps']} interleaved "
                  f"rounds). {what}, and (last columns) the step's peak memory / plain's:\n",
                  "| model | batch | K | " + " | ".join(paths) + " | memory: " + " | memory: ".join(paths) + " |",
                  "|---|---|---:|" + "---:|" * (2 * len(paths))]  # fmt: skip
        cells: dict[tuple, dict] = {}
        for r in sc["rows"]:
            cells.setdefault((r["model"], r["batch"], r["classes"]), {})[r["path"]] = r
        for (model, batch, k), by in cells.items():
            times = [x(by[p]["cpu_ratio" if cpu else "ratio"]) if p in by else "" for p in paths]
            mems = [x(by[p]["memory_ratio"]) if p in by else "" for p in paths]
            lines.append(f"| {model} | {batch} | {k} | " + " | ".join(times + mems) + " |")
        missing = [m for m in ("mlp", "resnet18", "vit_tiny") if m not in st["models"]]
        lines += ["", "<sub>" + "; ".join(f"{m}: {d}" for m, d in st["models"].items())
                  + (f"; not in this run: {', '.join(missing)} (`python benchmarks/scaling.py --models ...`)"
                     if missing else "") + "</sub>", ""]
    t = load("overhead_timm_loop.json")
    if t:
        lines += [f"**timm's loop** (`overhead_timm_loop.py`: `examples/timm_train.py` with its defaults, "
                  f"32×32, CPU, {t['machine']}; interleaved runs, median step):\n",
                  "| model | plain step | SAFLEX step / plain (median) | (mean) |", "|---|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['plain_ms_per_step']:.0f} ms | {x(r['ratio'])} | {x(r.get('ratio_mean'))} |"
                  for r in t["rows"]]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def when_to_use(path: Path) -> str:
    """The "when to use it / when not" paragraph, its facts computed from ``suite.json``."""
    if not path.is_file():
        return ""
    from benchmarks.suite import report

    doc = report.first_run(json.loads(path.read_text()))  # the first run; the gated default: docs/when_to_use.md
    idx = report.index(doc)
    tv, default = report.TV, report.DEFAULT

    def sig(name: str, sign: int) -> list[str]:
        out = []
        for stream, rows in idx.items():
            if name in rows and tv in rows:
                d, se = report.delta(rows[name], rows[tv])
                if se > 0 and sign * d >= 2 * se:
                    out.append(stream)
        return out

    def mean_delta(name: str) -> float:
        return statistics.fmean(report.delta(r[name], r[tv])[0] for r in idx.values() if name in r and tv in r)

    peers = [report.best_free_peer(rows)["variant"] for rows in idx.values() if report.best_free_peer(rows)]
    top = max(set(peers), key=peers.count)
    beats = sum(1 for rows in idx.values() if top in rows and default in rows
                and (lambda d: d[1] > 0 and d[0] >= 2 * d[1])(report.delta(rows[top], rows[default])))
    wins, losses = sig(default, 1), sig(default, -1)
    ops = [report.op_separation(rows[default]["op_scores"])["separates"] for rows in idx.values()
           if default in rows and "op_scores" in rows[default]]  # fmt: skip
    rows_ = {n: mean_delta(n) for n in report.CANDIDATES if any(n in r for r in idx.values())}
    return (
        "**When to use it / when not** (from the suite above). "
        f"The 0.1 library default (`margin`; the 0.2 default `gated_prior` is in docs/when_to_use.md) beat the "
        f"upstream trained on train ∪ val by ≥ 2 SE on {len(wins)} of {len(idx)} "
        f"streams ({', '.join(wins) or 'none'}) and lost to it by ≥ 2 SE on {len(losses)} "
        f"({', '.join(losses) or 'none'}). "
        f"The free alternative to try first is the model's own signal: **{top}** was the best free peer on "
        f"{peers.count(top)} of {len(peers)} streams and beat the SAFLEX default by ≥ 2 SE on {beats}. "
        "Mean Δ vs the upstream on train ∪ val over all streams: "
        + ", ".join(f"{n.removeprefix('SAFLEX ')} {d:+.2f}" for n, d in rows_.items())
        + f", {top} {mean_delta(top):+.2f}. "
        f"Per-op means of SAFLEX's score separated harmful from harmless ops on {sum(bool(o) for o in ops)} of "
        f"{len(ops)} transform streams. "
        "Use SAFLEX where the extra data's labels are wrong in a way the model learns as signal (class-conditional "
        "confusions of a generator: there its AUROC beats the model's own loss) and you have a trusted labelled "
        "split, and train on that split too (validation used both ways: the best SAFLEX row, chosen on half of the "
        "streams and confirmed on the other half). Do not hold out data only for SAFLEX, do not use it to find "
        "destroyed, stamped or off-style images (its per-op scores and its AUROC there are at chance), and do not "
        "expect it to beat weighting the extra rows by the model's own confidence `p[y]` when wrong labels are "
        "uniform."
    )


def verdict(path: Path) -> str:
    """The README's first-screen verdict, every number computed from the result files (so a rerun rewrites it): the
    default (``gated_prior``) on all streams of ``suite_goals.json`` with the validation split used both ways, the
    ``p[y]`` peer on the same data, the default trained on train only and where it collapses, the 0.1 default, and
    from the suite's first run (``suite.json``) the other peers and the AUROC on the streams whose bad samples are
    images, not labels."""
    if not path.is_file():
        return ""
    import textwrap

    from benchmarks.suite import report, variants

    doc = report.first_run(json.loads(path.read_text()))
    idx, info = report.index(doc), doc["streams"]
    tv, old = report.TV, report.DEFAULT
    g = json.loads((path.parent / "suite_goals.json").read_text())
    gated, train_only = g["goals"][variants.GATED], g["goals"][variants.GATED_TRAIN]
    table = {r["stream"]: r for r in g["table"]}
    py_tv, py = "confidence weight p[y], train+val", "confidence weight p[y]"
    n = len(table)

    def first_mean(name: str) -> float:
        return statistics.fmean(report.delta(r[name], r[tv])[0] for r in idx.values() if name in r and tv in r)

    def pm(d: list[float]) -> str:
        return f"{d[0]:+.2f} ± {d[1]:.2f}"

    def first_sig(name: str, sign: int) -> int:
        return sum(1 for rows in idx.values() if name in rows and tv in rows
                   and (lambda d: d[1] > 0 and sign * d[0] >= 2 * d[1])(report.delta(rows[name], rows[tv])))

    seeds = max(len(e["seeds"]) for e in doc["entries"])
    bad = [info[s]["bad_fraction"] for s in idx if info[s]["family"] == "noise"]
    image_bad = [rows[old]["auroc"] for s, rows in idx.items()
                 if info[s]["family"] in ("transform", "bias") and old in rows
                 and rows[old]["auroc"] is not None and s.split("/")[0] in _IMAGE_SETS]  # fmt: skip
    worse = {s: r[variants.GATED] for s, r in table.items()
             if r[variants.GATED][0] <= -2 * r[variants.GATED][1] and r[variants.GATED][0] <= -1}
    worst = min(table, key=lambda s: table[s][variants.GATED][0])
    clean = gated["3"]["clean"]
    halves = gated["5"]["halves"]
    py_ahead = [s for s, r in table.items() if r[py_tv][0] - r[variants.GATED][0] >= 1]
    py_hurts = [s for s, r in table.items() if r[py_tv][0] <= -2 * r[py_tv][1] and r[variants.GATED][0] > -2 * r[
        variants.GATED][1]]
    collapse = min(table, key=lambda s: table[s][variants.GATED_TRAIN][0])
    others = [n_ for n_ in dict.fromkeys(e["variant"] for e in doc["entries"] if e["role"] == "peer" and e["free"])
              if n_ != py]
    text = (
        f"**Measured verdict.** On a known-truth suite ({n} streams whose bad samples are known: extra data with "
        f"{100 * min(bad):.0f}–{100 * max(bad):.0f}% wrong labels, label swaps, label-changing transforms, a spurious "
        f"stamp, class imbalance, off-style domains, clean data; {seeds} seeds, paired; Δ in accuracy points against "
        "the upstream augmentation trained on train ∪ validation), the default `rule=\"gated_prior\"`, **with the "
        f"validation split also in the training set**, averaged **{gated['1']['mean']:+.2f}**: better by ≥ 2 SE on "
        f"{gated['4']['n']} of {n} streams, worse by ≥ 2 SE and ≥ 1 point on {len(worse)} (worst {worst} "
        f"{pm(table[worst][variants.GATED])}), clean streams "
        + " and ".join(pm(d) for d in clean.values())
        + f"; chosen on half A ({halves['A']:+.2f}) and confirmed on half B ({halves['B']:+.2f}) and {n - 16} new "
        f"streams ({halves['new']:+.2f}). **Weighting each extra sample by the model's own confidence `p[y]` (free), "
        f"trained on the same train ∪ validation, averaged more: {g['means'][py_tv]:+.2f}** (ahead by ≥ 1 point on "
        + ", ".join(f"{s} {table[s][py_tv][0]:+.2f} vs {table[s][variants.GATED][0]:+.2f}" for s in py_ahead)
        + "; below the upstream by ≥ 2 SE on "
        + ", ".join(f"{s} {table[s][py_tv][0]:+.2f} vs {table[s][variants.GATED][0]:+.2f}" for s in py_hurts)
        + f"). **Trained on train only, the default averaged {train_only['1']['mean']:+.2f}** and collapsed on the "
        f"off-style domain ({collapse} {pm(table[collapse][variants.GATED_TRAIN])}; the 0.1 default `margin` "
        f"{table[collapse][old][0]:+.2f}, `p[y]` on train only {table[collapse][py][0]:+.2f}): train on the validation "
        "split too. "
        f"The 0.1 default `margin` averaged {g['means'][old]:+.2f} (on the first {len(idx)} streams: better by "
        f"≥ 2 SE on {first_sig(old, 1)}, worse on {first_sig(old, -1)}), and the other peers run there at the same "
        "budget averaged "
        + ", ".join(f"{_PEER_WORDS.get(o, o)} {first_mean(o):+.2f}" for o in others)
        + ". SAFLEX did not detect destroyed, stamped or off-style images (the 0.1 default's AUROC "
        f"{min(image_bad):.2f}–{max(image_bad):.2f}; chance is 0.50)."
    )
    return textwrap.fill(text, width=118, break_on_hyphens=False, break_long_words=False)


def demo_section(path: Path) -> str:
    """The demo's paragraph for docs/results.md, from ``demo_results.json`` (``make demo`` writes it)."""
    if not path.is_file():
        return ""
    d = json.loads(path.read_text())
    acc, names = d["test_accuracy_per_seed"], {"noaug": "no augmentation", "upstream": "upstream",
                                                "saflex": "SAFLEX + upstream"}  # fmt: skip

    def ms(xs: list[float]) -> str:
        return f"{statistics.fmean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"

    paired = [s - u for s, u in zip(acc["saflex"], acc["upstream"], strict=True)]
    ops = d["op_stats"]
    s = d["settings"]
    rule = d["saflex"].split("rule=Rule(name='", 1)[-1].split("'", 1)[0]
    by_weight = sorted(ops.items(), key=lambda kv: kv[1]["weight"])
    import textwrap

    return textwrap.fill(
        f"`make demo` trains the same small CNN on the MNIST 5k subset three ways, for {len(d['seeds'])} seeds "
        f"({s['epochs']} epochs each), with a deliberately destructive upstream (RandAugment m = 15, 180° rotations, "
        "vertical flips, tiny crops, 40–60% occlusion, and a mild affine jitter as the one benign op). Test accuracy, "
        "mean ± std over seeds: " + ", ".join(f"{names[m]} {ms(a)}" for m, a in acc.items()) + "; SAFLEX minus "
        f"upstream, paired by seed: {statistics.fmean(paired):+.1f} (per seed "
        + ", ".join(f"{x:+.1f}" for x in paired) + "). "
        f"SAFLEX (`rule={rule!r}`) gave the augmented samples a mean weight of "
        f"{d['runs']['saflex']['weight_last_epoch']:.2f} in the last epoch and relabelled "
        f"{100 * d['runs']['saflex']['relabeled_last_epoch']:.0f}%; mean weight per op, lowest first: "
        + ", ".join(f"{op} {o['weight']:.2f}" for op, o in by_weight) + ". "
        + ("Under this rule a weight below 1 is the model's own confidence `p[y]` in the label (the validation "
           "signal only decides whether the augmented rows are weighted at all), so differences between ops are the "
           "model's confidence, not SAFLEX's validation signal singling out destroyed images. "
           if rule.startswith("gated") else "")
        + "Destroyed images whose label is still right are not what SAFLEX's validation signal detects. "
        + ("The demo has no run that weights by `p[y]` without the gate and none trained on train ∪ validation, so it "
           "does not show how much of the gain the free `p[y]` weighting alone would give (on the known-truth suite it "
           "averaged more than the default: README). " if rule.startswith("gated") else "")
        + f"This run took {d['wall_s']:.0f} s ({d['cpu_s']:.0f} s of CPU time) on {d['machine']}, "
        f"load average {d['load_average_at_end'][0]:.1f} at the end (`benchmarks/results/demo_results.json`).",
        width=118, break_on_hyphens=False, break_long_words=False,
    )


def contrastive_section(root: Path) -> str:
    """docs/contrastive.md's table: ``examples/contrastive_flyp.py --json`` per seed, one file per rule
    (``contrastive_flyp_seed<N>.json``: the library's default rule; ``contrastive_flyp_paper_seed<N>.json``: the
    paper's)."""
    runs = {"default": sorted(root.glob("contrastive_flyp_seed*.json")),
            "paper": sorted(root.glob("contrastive_flyp_paper_seed*.json"))}  # fmt: skip
    if not runs["default"]:
        return ""
    docs = {k: [json.loads(f.read_text()) for f in files] for k, files in runs.items()}
    first = docs["default"][0]["settings"]

    def label(d: dict) -> str:
        st = d["settings"]
        return f"aug + SAFLEX (`rule={st['rule']!r}`, β = {st['beta']:g})"

    columns = [("no augmentation", "FLYP, no aug", "default"), ("aug", "FLYP + aug", "default"),
               (label(docs["default"][0]), "FLYP + aug + SAFLEX", "default")]  # fmt: skip
    if docs["paper"]:
        columns.append((label(docs["paper"][0]), "FLYP + aug + SAFLEX", "paper"))
    seeds = [d["settings"]["seed"] for d in docs["default"]]
    lines = ["| seed | " + " | ".join(c[0] for c in columns) + " |", "|---:|" + "---:|" * len(columns)]
    values = {c[0]: [] for c in columns}
    for i, seed in enumerate(seeds):
        row = []
        for name, arm, kind in columns:
            v = docs[kind][i]["results"][arm]["test_accuracy"] if i < len(docs[kind]) else None
            values[name].append(v)
            row.append("" if v is None else f"{v:.4f}")
        lines.append(f"| {seed} | " + " | ".join(row) + " |")
    lines.append("| mean | " + " | ".join(f"{statistics.fmean(v for v in values[c[0]] if v is not None):.4f}"
                                          for c in columns) + " |")  # fmt: skip
    import textwrap

    aug = values["aug"]
    verdicts = []
    for name, _, _ in columns[2:]:
        v = values[name]
        above = sum(x > a for x, a in zip(v, aug, strict=True))
        below = sum(x < a for x, a in zip(v, aug, strict=True))
        verdicts.append(f"{name.removeprefix('aug + ')}: above plain augmentation on {above} of {len(v)} seeds, "
                        f"below on {below}")  # fmt: skip
    none_back = all(statistics.fmean(values[c[0]]) < statistics.fmean(values["no augmentation"]) for c in columns[2:])
    text = (
        "; ".join(verdicts)
        + (". No SAFLEX row gets back to training without the augmentation." if none_back else ".")
        + f" Zero-shot test accuracy on {first['data']} digits ({first['shots']} shots per class, {first['steps']} "
        f"steps, `examples/contrastive_flyp.py --seed N --json ...`; CPU, torch {docs['default'][0]['torch']}; "
        "`benchmarks/results/contrastive_flyp*_seed*.json`)."
    )
    return "\n".join(lines) + "\n\n" + textwrap.fill(text, width=118, break_on_hyphens=False, break_long_words=False)


_IMAGE_SETS = ("fmnist", "mnist", "digits")
_PEER_WORDS = {
    "confidence weight p[y]": "weighting each extra sample by the model's own confidence `p[y]` (free)",
    "small-loss q=30%": "small-loss filtering",
    "agreement (argmax = label)": "argmax agreement",
    "L2RW max(0, Π[i,y])": "Learning-to-Reweight",
}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--verdict", action="store_true", help="print the README's first-screen verdict only")
    parser.add_argument("--demo", action="store_true", help="print docs/results.md's demo paragraph only")
    parser.add_argument("--contrastive", action="store_true", help="print docs/contrastive.md's table only")
    parser.add_argument("--only", default="accuracy_*.json",
                        help="glob of the accuracy files to include, e.g. 'accuracy_*__margin_beta1.5.json'")
    args = parser.parse_args(argv)
    root = Path(args.results)
    if args.verdict or args.demo or args.contrastive:
        text = (verdict(root / "suite.json") if args.verdict else demo_section(root / "demo_results.json")
                if args.demo else contrastive_section(root))
        print(text)
        return text
    payloads = [json.loads(f.read_text()) for f in sorted(root.glob(args.only))]
    # images first, then tables
    payloads.sort(key=lambda p: ("mnist" not in p["dataset"], "__" in p["dataset"], p["dataset"]))
    tables, gains = accuracy_tables(payloads)
    parts = []
    suite = suite_section(root / "suite.json")
    if suite:
        parts += ["### SAFLEX vs the alternatives (known-truth suite)\n", suite, when_to_use(root / "suite.json"), ""]
    parts += ["### Accuracy\n", tables]
    if gains:
        parts += ["### SAFLEX vs its upstream, all tables\n", summary(gains), ""]
    over = cost_section(root)
    if over:
        parts += ["### Overhead per training step\n", over, ""]
    text = "\n".join(parts)
    print(text)
    return text


if __name__ == "__main__":
    main()
