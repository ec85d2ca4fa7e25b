"""The half-A probe table of the gated rules (0.2): every row of a probe JSON, paired Δ vs the upstream on
train ∪ val of ``suite.json`` (same streams, seeds and budget), sorted by the mean; ``g2`` = streams worse by
≥ 2 SE and ≥ 1 point, ``g4`` = streams better by ≥ 2 SE.

    python -m benchmarks.suite.probe_table benchmarks/results/suite_halfA_probe.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.suite.report import TV, delta, index

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_ROWS = ("confidence weight p[y]", "SAFLEX default (margin β=1.5)", "SAFLEX margin, val both ways", "upstream")


def main(paths: list[str]) -> None:
    base = index(json.loads((ROOT / "benchmarks" / "results" / "suite.json").read_text()))
    table: dict[str, dict] = {}
    streams: list[str] = []
    for path in paths:
        probe = index(json.loads(Path(path).read_text()))
        streams = streams or list(probe)
        for s, rows in probe.items():
            for v, e in rows.items():
                table.setdefault(v, {})[s] = delta(e, base[s][TV])
    for r in REFERENCE_ROWS:
        for s in streams:
            if r in base[s]:
                table.setdefault(r, {}).setdefault(s, delta(base[s][r], base[s][TV]))
    short = [s.split("/")[0][:2] + "/" + s.split("/")[1][:10] for s in streams]
    print(f"{'row':40s} {'mean':>6s} {'g2':>3s} {'g4':>3s} " + " ".join(f"{x:>13s}" for x in short))
    out = []
    for v, vals in table.items():
        if any(s not in vals for s in streams):
            continue
        m = float(np.mean([vals[s][0] for s in streams]))
        worse = sum(vals[s][0] <= -1 and vals[s][0] <= -2 * vals[s][1] for s in streams)
        better = sum(vals[s][0] > 0 and vals[s][0] >= 2 * vals[s][1] for s in streams)
        out.append((m, v, worse, better, vals))
    for m, v, worse, better, vals in sorted(out, reverse=True):
        print(f"{v[:40]:40s} {m:6.2f} {worse:3d} {better:3d} "
              + " ".join(f"{vals[s][0]:6.2f}±{vals[s][1]:4.2f}" for s in streams))


if __name__ == "__main__":
    main(sys.argv[1:] or [str(ROOT / "benchmarks" / "results" / "suite_halfA_probe.json")])
