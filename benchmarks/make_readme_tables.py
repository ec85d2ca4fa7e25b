"""Print the README's results section (markdown) from ``benchmarks/results/*.json``.

Usage::

    python benchmarks/make_readme_tables.py [--results benchmarks/results] > results.md

For each ``accuracy_<dataset>.json``: one table with mean ± std over seeds, and for every SAFLEX row its gain
over the same upstream alone (trained on train only) and over that upstream trained on train ∪ validation (what a
user could do with the labels SAFLEX spends on validation). Then a summary of all SAFLEX rows per method, the
decision-quality table from ``decision_quality.json`` (selected variants; ``--all-decisions``: every variant) and
the cost tables (:func:`cost_section`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


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
    lines = ["| SaflexLoss settings | method | SAFLEX rows | wins vs upstream | mean Δ vs upstream | wins vs upstream on train ∪ val | "
             "mean Δ vs upstream on train ∪ val |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
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


# The decision-quality rows the README shows (``--all-decisions``: all of them).
DECISION_ROWS = (
    "noisy upstream",
    "clean upstream",
    "noisy upstream, train ∪ val",
    "oracle drop",
    "oracle drop, a random third of the bad samples",
    "paper jvp (β=0.5, τ=0.01, batch_max, fresh val 128)",
    "margin β=1.5, last_layer, fresh val 128, val T=1 (previous default)",
    "margin β=1.5, last_layer, fresh val 128, val T=4 (library default)",
    "margin β=1.5, last_layer, val EMA(32, 0.9), val T=4",
    "margin β=1.5, jvp, fresh val 128, val T=4",
    "margin_fix β=1.5, last_layer, fresh val 128, val T=4",
    "margin_relabel β=1, last_layer, fresh val 128, val T=4",
)


def _auroc_cell(entry: dict) -> str:
    auroc = entry.get("weight_auroc")
    if auroc is None:
        return ""
    within = (entry.get("decision_stats") or {}).get("weight_auroc_within_class")
    return f"{auroc:.2f}" + ("" if within is None else f" ({within:.2f})")


def decision_table(path: Path, all_rows: bool = False) -> str:
    if not path.is_file():
        return ""
    doc = json.loads(path.read_text())
    lines = []

    def f(value: float | None, digits: int = 2, signed: bool = False) -> str:
        return "" if value is None else (f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}")

    for ds in ("fmnist-noisy", "hpc-noisy", "fmnist-destructive"):
        entries = [e for e in doc["entries"] if e["dataset"] == ds and (all_rows or e["variant"] in DECISION_ROWS)]
        if not entries:
            continue
        if not all_rows:
            entries.sort(key=lambda e: DECISION_ROWS.index(e["variant"]))
        bad = "occluded" if "destructive" in ds else "wrong label"
        lines += [f"#### {ds} ({entries[0]['seeds']} seeds; bad = {bad})\n",
                  "| variant | test acc % | Δ vs noisy upstream (paired) | weight AUROC (within upstream class) | "
                  "drop precision / recall | relabel accuracy | damage recovered | Δ vs train ∪ val |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for e in entries:
            st = e.get("decision_stats") or {}
            pr = f"{st['drop_precision']:.2f} / {st['drop_recall']:.2f}" if st.get("dropped_fraction") else ""
            paired = e.get("gain_vs_noisy_paired")
            se = e.get("gain_vs_noisy_paired_se")
            paired_s = "" if paired is None else f"{paired:+.2f}" + ("" if se is None else f" ± {se:.2f}")
            name = f"**{e['variant']}**" if e["is_default"] else e["variant"]
            lines.append(
                f"| {name} | {_ms([100 * a for a in e['test_accs']])} | {paired_s} | "
                f"{_auroc_cell(e)} | {pr} | {f(e['relabel_accuracy'])} | "
                f"{f(e['recovered_fraction'], signed=True)} | {f(e['gain_vs_train_on_val'], signed=True)} |"
            )
        lines.append("")
    meta = doc["meta"]
    lines.append(f"<sub>commit {meta['commit'][:7]}; torch {meta['torch']}; {meta['machine']}; "
                 f"steps {meta['steps']}</sub>\n")  # fmt: skip
    return "\n".join(lines)


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
                  "| variant | what | step time / plain (median) | (mean) | CPU time / plain (median) | peak memory / plain |",
                  "|---|---|---:|---:|---:|---:|"]  # fmt: skip
        described = s.get("variants", {})
        for v, r in o["ratio"].items():
            what = described.get(v, "").replace("SaflexLoss(", "`SaflexLoss(")
            what = what.replace("), validation", ")`, validation")
            lines.append(f"| {v} | {what} | {x(r)} | {x(o.get('ratio_mean', {}).get(v))} | "
                         f"{x(o.get('cpu_ratio', {}).get(v))} | {x(o.get('peak_rss_ratio', {}).get(v))} |")  # fmt: skip
        lines += ["", "`jvp` is the exact `Π`. With train-mode BatchNorm it needs the JVP of the whole batch (clean rows "
                  "too): the batch statistics depend on θ through every row, and their tangent is part of each "
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
        lines += [f"**Scaling** (`scaling.py`; {sc['machine']}; {st['saflex']}; medians of {st['reps']} interleaved "
                  "rounds). Step time / plain, and (last columns) the step's peak memory / plain's:\n",
                  "| model | batch | K | " + " | ".join(paths) + " | memory: " + " | memory: ".join(paths) + " |",
                  "|---|---|---:|" + "---:|" * (2 * len(paths))]  # fmt: skip
        cells: dict[tuple, dict] = {}
        for r in sc["rows"]:
            cells.setdefault((r["model"], r["batch"], r["classes"]), {})[r["path"]] = r
        for (model, batch, k), by in cells.items():
            times = [x(by[p]["ratio"]) if p in by else "" for p in paths]
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


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--only", default="accuracy_*.json",
                        help="glob of the accuracy files to include, e.g. 'accuracy_*__margin_beta1.5.json'")
    parser.add_argument("--all-decisions", action="store_true", help="print every decision-quality variant only")
    args = parser.parse_args(argv)
    root = Path(args.results)
    if args.all_decisions:
        text = decision_table(root / "decision_quality.json", all_rows=True)
        print(text)
        return text
    payloads = [json.loads(f.read_text()) for f in sorted(root.glob(args.only))]
    # images first, then tables
    payloads.sort(key=lambda p: ("mnist" not in p["dataset"], "__" in p["dataset"], p["dataset"]))
    tables, gains = accuracy_tables(payloads)
    parts = ["### Accuracy\n", tables]
    if gains:
        parts += ["### SAFLEX vs its upstream, all tables\n", summary(gains), ""]
    decisions = decision_table(root / "decision_quality.json")
    if decisions:
        parts += ["### Decision quality: 30% of the augmented samples bad (`decision_quality.py`)\n", decisions]
    over = cost_section(root)
    if over:
        parts += ["### Overhead per training step\n", over, ""]
    text = "\n".join(parts)
    print(text)
    return text


if __name__ == "__main__":
    main()
