"""The goals set for a new default (0.2), from ``suite.json``: writes ``results/suite_goals.json`` and prints
the per-stream table (paired Δ vs the upstream on train ∪ val, mean ± SE over 6 seeds) and each goal with its figure.

    python -m benchmarks.suite.goals                       # the chosen gated row, train only, and the old default
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.suite import report, variants
from benchmarks.suite.report import TV, delta, index

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
ROWS = (variants.GATED, variants.GATED_TRAIN, variants.DEFAULT, "SAFLEX margin, val both ways", report.PY_PEER,
        "confidence weight p[y], train+val")  # fmt: skip


def table(doc: dict, rows=ROWS) -> list[dict]:
    out = []
    for s, by in index(doc).items():
        line = {"stream": s, "half": doc["streams"][s]["half"], "family": doc["streams"][s]["family"]}
        for r in rows:
            if r in by and TV in by:
                line[r] = list(delta(by[r], by[TV]))
        out.append(line)
    return out


def main(argv: list[str]) -> dict:
    doc = json.loads((RESULTS / "suite.json").read_text())
    lines = table(doc)
    goals = {r: report.goals_default(doc, r) for r in (variants.GATED, variants.GATED_TRAIN, variants.DEFAULT,
                                                        "SAFLEX margin, val both ways")}  # fmt: skip
    short = {variants.GATED: "gated vbw", variants.GATED_TRAIN: "gated", variants.DEFAULT: "margin",
             "SAFLEX margin, val both ways": "margin vbw", report.PY_PEER: "p[y]",
             "confidence weight p[y], train+val": "p[y] t+v"}  # fmt: skip
    print(f"{'stream':32s} {'half':4s} " + " ".join(f"{short[r]:>14s}" for r in ROWS))
    for line in lines:
        print(f"{line['stream']:32s} {line['half']:4s} "
              + " ".join(f"{line[r][0]:+6.2f} ± {line[r][1]:4.2f}" if r in line else f"{'':14s}" for r in ROWS))
    means = {r: float(np.mean([x[r][0] for x in lines if r in x])) for r in ROWS}
    print(f"{'mean':37s} " + " ".join(f"{means[r]:+14.2f}" for r in ROWS))
    for r, g in goals.items():
        print(f"\n{r}: 1 mean {g['1']['mean']:+.2f} (p[y] peer {g['1']['peer_mean']:+.2f}) met={g['1']['met']}; "
              f"2 worse {g['2']['worse']} met={g['2']['met']}; 3 clean "
              f"{ {k: [round(v, 2) for v in d] for k, d in g['3']['clean'].items()} } met={g['3']['met']}; "
              f"4 better by 2 SE on {g['4']['n']} met={g['4']['met']}; 5 halves "
              f"{ {k: round(v, 2) for k, v in g['5']['halves'].items()} } met={g['5']['met']}")
    out = {"table": lines, "means": means, "goals": goals, "suite_meta": doc.get("meta")}
    (RESULTS / "suite_goals.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
