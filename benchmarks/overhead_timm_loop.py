"""SAFLEX's cost in a real training loop: ``examples/timm_train.py`` with and without SAFLEX, through its CLI.

A synthetic ImageFolder of 32×32 PNGs (10 classes; ``train`` and the ``holdout`` split SAFLEX draws its validation
batches from) is written to a temporary directory. Then, for each model, ``timm_train.py`` runs ``--steps`` steps
with its default settings (``--device cpu --img-size 32``, no evaluation split) alternately with ``--no-saflex``
and without, ``--pairs`` times (interleaved, so that machine load hits both alike). Each step's wall time is the gap
between two of the example's per-step log lines (``--log-interval 1``); the first ``--skip`` steps of a run (worker
start-up) are left out; the ratio is the median SAFLEX step over the median plain step, all runs pooled. Extra
arguments after ``--`` go to every run of ``timm_train.py``.

Usage::

    python benchmarks/overhead_timm_loop.py                      # writes benchmarks/results/overhead_timm_loop.json
    python benchmarks/overhead_timm_loop.py --models resnet10t --steps 20 --pairs 2 -- -b 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

EXAMPLE = C.ROOT / "examples" / "timm_train.py"


def write_image_folder(root: Path, n_per_class: int, num_classes: int = 10, size: int = 32, seed: int = 0) -> None:
    """PNGs ``root/class<c>/<i>.png``: each class a random colour plus pixel noise."""
    import torch
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    for c in range(num_classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        colour = 40 + 160 * torch.rand(3, generator=gen)
        for i in range(n_per_class):
            pixels = (colour + 40 * torch.randn(size, size, 3, generator=gen)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / f"class{c}" / f"{i}.png")


def one_run(data: Path, model: str, steps: int, saflex: bool, threads: int, extra: list[str]) -> list[float]:
    """Wall seconds of each step after the first, from the arrival times of the example's per-step log lines."""
    cmd = [sys.executable, "-u", str(EXAMPLE), "--data-dir", str(data), "--model", model, "--img-size", "32",
           "--device", "cpu", "--steps", str(steps), "--epochs", "100", "--val-split", "", "--log-interval", "1",
           *([] if saflex else ["--no-saflex"]), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(C.ROOT)}
    stamps = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env) as proc:
        for line in proc.stdout:
            if line.startswith("epoch "):
                stamps.append(time.perf_counter())
    if proc.returncode or len(stamps) != steps:
        raise RuntimeError(f"{model}: timm_train.py exited {proc.returncode} after {len(stamps)} of {steps} steps")
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet10t,resnet18")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--skip", type=int, default=5, help="steps skipped at the start of each run (warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images-per-class", type=int, default=100)
    parser.add_argument("--out", default=str(C.RESULTS))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_image_folder(data / "train", args.images_per_class, seed=0)
        write_image_folder(data / "holdout", max(20, args.images_per_class // 4), seed=1)
        for model in args.models.split(","):
            plain, saflex = [], []
            for _ in range(args.pairs):
                # the first steps also start the loaders' workers: skipped
                plain += one_run(data, model, args.steps, False, args.threads, extra)[args.skip :]
                saflex += one_run(data, model, args.steps, True, args.threads, extra)[args.skip :]
                print(f"{model}: plain {1000 * statistics.median(plain):.0f} ms/step, SAFLEX "
                      f"{1000 * statistics.median(saflex):.0f} ms/step", flush=True)  # fmt: skip
            rows.append({"model": model, "ratio": round(statistics.median(saflex) / statistics.median(plain), 3),
                         "ratio_mean": round(statistics.fmean(saflex) / statistics.fmean(plain), 3),
                         "plain_ms_per_step": round(1000 * statistics.median(plain), 1),
                         "saflex_ms_per_step": round(1000 * statistics.median(saflex), 1),
                         "plain_step_ms_all": [round(1000 * t, 1) for t in plain],
                         "saflex_step_ms_all": [round(1000 * t, 1) for t in saflex]})  # fmt: skip
    payload = {
        "benchmark": "overhead_timm_loop",
        "what": "examples/timm_train.py training seconds with SAFLEX (its defaults) / with --no-saflex, interleaved "
                "runs through the CLI",
        "machine": C.machine_string(),
        "versions": C.versions(),
        "settings": {"steps": args.steps, "pairs": args.pairs, "skipped_steps_per_run": args.skip,
                     "threads (OMP_NUM_THREADS)": args.threads,
                     "data": f"synthetic 32x32 PNG ImageFolder, 10 classes, {args.images_per_class} per class",
                     "timm_train_args": ["--img-size", "32", "--device", "cpu", "--val-split", "", "--log-interval",
                                         "1", *extra],
                     "load_average_at_end": list(os.getloadavg()),
                     "wall_seconds": round(time.perf_counter() - t0, 1)},  # fmt: skip
        "rows": rows,
    }
    C.write_json(Path(args.out) / "overhead_timm_loop.json", payload)
    print(json.dumps(rows, indent=1))
    return payload


if __name__ == "__main__":
    main()
