"""The known-truth suite: SAFLEX against the alternatives a user already has, on streams where the truth is known.

Usage::

    nice -n 10 python -m benchmarks.suite.run              # the committed results (2 workers x 1 thread)
    python -m benchmarks.suite.run --quick                 # 2 small streams, 1 seed, 7 variants (< 30 s idle)
    python -m benchmarks.suite.run --replot                # redraw the figure and the op report from the JSON
    python -m benchmarks.suite.run --streams fmnist/pool10-clean --merge   # rerun some streams into the JSON

Writes ``benchmarks/results/suite.json`` (rewritten as runs finish) and ``suite.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.suite import data, report, streams, variants  # noqa: E402
from benchmarks.suite.models import run as train_run  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STEPS = 150
SEEDS = 6

_STREAMS: dict = {}


def _job(job: tuple) -> dict:
    name, variant_name, seed, steps, scale = job
    torch.set_num_threads(1)
    key = (name, seed, scale)
    if key not in _STREAMS:
        _STREAMS.clear()  # jobs come grouped by stream and seed: keep one stream at a time
        dataset, spec = name.split("/")
        _STREAMS[key] = streams.build(dataset, spec, seed, scale=scale)
    return train_run(_STREAMS[key], variants.BY_NAME[variant_name], seed, steps)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()  # fmt: skip
    except OSError:
        return ""


COMMIT = _commit()  # the code the run started from


def meta(args: argparse.Namespace, wall: float) -> dict:
    return {"commit": COMMIT, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "workers": args.workers, "threads_per_worker": 1, "steps": args.steps,
            "seeds": args.seeds, "quick": args.quick, "wall_s": round(wall, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 small streams, 1 seed, 7 variants, 60 steps")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--streams", default=None, help="comma-separated '<data set>/<stream>' (default: the plan)")
    ap.add_argument("--variants", default=None, help="'|'-separated variant names (default: all)")
    ap.add_argument("--merge", action="store_true", help="replace only these (stream, variant) entries in --json")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--replot", action="store_true")
    args = ap.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else SEEDS)
    args.steps = args.steps or (60 if args.quick else STEPS)
    suffix = "_quick" if args.quick else ""
    args.json = args.json or RESULTS / f"suite{suffix}.json"
    args.png = args.png or RESULTS / f"suite{suffix}.png"
    if args.replot:
        doc = json.loads(args.json.read_text())
        report.plot(doc, args.png)
        return doc
    full_plan = streams.PLAN + streams.NEW
    plan = args.streams.split(",") if args.streams else list(streams.QUICK_PLAN if args.quick else full_plan)
    names = args.variants.split("|") if args.variants else list(variants.QUICK if args.quick else variants.SUITE)
    scale = 0.5 if args.quick else 1.0
    jobs = [(s, v, seed, args.steps, scale) for s in plan for seed in range(args.seeds) for v in names]
    for name in {s.split("/")[0] for s in plan}:
        data.load(name)  # loaded once, before the workers fork
    old = json.loads(args.json.read_text()) if args.merge and args.json.exists() else None
    runs: list[dict] = []
    t0 = time.time()

    def write() -> dict:
        doc = report.document(runs, plan_streams=plan, scale=scale)
        if old is not None:
            new = {(e["stream"], e["variant"]) for e in doc["entries"]}
            doc["entries"] = [e for e in old["entries"] if (e["stream"], e["variant"]) not in new] + doc["entries"]
            doc["entries"].sort(key=report.entry_order)
            doc["streams"] = {**old.get("streams", {}), **doc["streams"]}
        doc["meta"] = meta(args, time.time() - t0)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))
        return doc

    def done(r: dict, i: int) -> None:
        runs.append(r)
        print(f"[{time.time() - t0:6.0f}s {i}/{len(jobs)}] {r['stream']:26s} {r['variant'][:40]:40s} seed={r['seed']} "
              f"acc={r['score']:.4f} auroc={r.get('auroc') or float('nan'):.3f}", flush=True)  # fmt: skip
        if i % 25 == 0:
            write()

    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.workers) as pool:
            for i, r in enumerate(pool.imap(_job, jobs, chunksize=1), 1):
                done(r, i)
    else:
        for i, job in enumerate(jobs, 1):
            done(_job(job), i)
    doc = write()
    report.plot(doc, args.png)
    print(report.summary_text(doc))
    print(f"wrote {args.json} and {args.png} in {time.time() - t0:.0f}s")
    return doc


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
