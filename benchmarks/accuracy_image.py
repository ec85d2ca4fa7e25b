"""Few-shot image benchmark: Fashion-MNIST (the 28×28 stand-in for MedMNIST), ResNet-18 with a 3×3 stem, Adam.

Rows (each over ``--seeds`` seeds; the training subset, the validation split and the initialisation change with
the seed; the test set is the official 10k test split):

* ``NoAug`` and each upstream alone (``RandAugment``, ``Mixup``): trained on the training subset only;
* the same rows trained on train ∪ validation (``train_on_val``): what a user could do with the labels SAFLEX
  spends on validation;
* ``SAFLEX+<upstream>`` with ``method="jvp"`` and ``method="last_layer"``: trained on the training subset, the
  validation split feeds ``SaflexLoss``'s validation stream. All other SaflexLoss settings are the library's
  defaults unless ``--beta``/... are given.

No model selection on validation (no early stopping): every row is the model after the last epoch.

Usage::

    python benchmarks/accuracy_image.py            # full table (CPU, ~30 min on 2 cores)
    python benchmarks/accuracy_image.py --quick    # small smoke table (~3 min)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from datasets import load_fashion_mnist, stratified_split  # noqa: E402


def build_rows(upstreams: list[str], methods: list[str]) -> list[dict]:
    rows = [dict(name="NoAug", upstream=None, saflex=None, train_on_val=False),
            dict(name="NoAug (train ∪ val)", upstream=None, saflex=None, train_on_val=True)]  # fmt: skip
    for up in upstreams:
        rows.append(dict(name=up, upstream=up, saflex=None, train_on_val=False))
        rows.append(dict(name=f"{up} (train ∪ val)", upstream=up, saflex=None, train_on_val=True))
        for m in methods:
            rows.append(dict(name=f"SAFLEX[{m}]+{up}", upstream=up, saflex=m, train_on_val=False))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (~3 min)")
    parser.add_argument("--data", default=None, help="Fashion-MNIST IDX directory (default: Debian's path)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-val", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=10000, help="first N of the official test split")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--width", type=int, default=8, help="ResNet-18 base width (64 = the standard ResNet-18)")
    parser.add_argument("--stem-stride", type=int, default=2, help="3x3 stem stride (1: 28x28 stages; 2: 4x cheaper)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--val-batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--magnitude", type=int, default=9, help="RandAugment magnitude (2 ops)")
    parser.add_argument("--upstreams", default="RandAugment,Mixup")
    C.add_run_arguments(parser)
    parser.add_argument("--tag", default="fashion_mnist", help="dataset name in the JSON / file name")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.n_train, args.n_val, args.n_test, args.epochs = 2, 512, 128, 1000, 8
    C.set_threads(args.threads)

    saflex_kwargs = C.saflex_kwargs(args)
    upstreams, methods = args.upstreams.split(","), args.methods.split(",")
    rows = build_rows(upstreams, methods)
    if args.rows:
        wanted = set(args.rows.split(","))
        rows = [r for r in rows if r["name"] in wanted]
    x_all, y_all = load_fashion_mnist(args.data, "train")
    x_test, y_test = load_fashion_mnist(args.data, "test")
    x_test, y_test = x_test[: args.n_test, None], y_test[: args.n_test]
    upstream_fns = {
        "RandAugment": lambda: C.PerSampleRandAugment(num_ops=2, magnitude=args.magnitude),
        "Mixup": lambda: C.Mixup(num_classes=10, alpha=1.0),
    }
    prepare = C.to_model_input_images
    scores: dict[str, list[float]] = {r["name"]: [] for r in rows}
    extras: dict[str, list[dict]] = {r["name"]: [] for r in rows}
    t_start = time.perf_counter()
    for seed in C.progress(range(args.seeds), desc="seeds"):
        # a seed-dependent few-shot subset: n_train + n_val images, class-balanced, disjoint
        tr, va = stratified_split(y_all, (args.n_train / len(y_all), args.n_val / len(y_all)), seed=1000 + seed)
        x_tr, y_tr, x_va, y_va = x_all[tr, None], y_all[tr], x_all[va, None], y_all[va]
        for r in C.progress(rows, desc=f"seed {seed}", leave=False):
            torch.manual_seed(seed)
            model = C.resnet18_28(10, in_chans=1, width=args.width, stem_stride=args.stem_stride)
            if r["train_on_val"]:
                xt, yt = torch.cat([x_tr, x_va]), torch.cat([y_tr, y_va])
            else:
                xt, yt = x_tr, y_tr
            cfg = C.RunConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, saflex=r["saflex"],
                              val_batch_size=args.val_batch_size, saflex_kwargs=saflex_kwargs)  # fmt: skip
            augment = upstream_fns[r["upstream"]]() if r["upstream"] else None
            model, info = C.train_run(model, xt, yt, config=cfg, augment=augment, prepare=prepare,
                                      val=(x_va, y_va) if r["saflex"] else None, seed=seed,
                                      desc=r["name"])  # fmt: skip
            acc = C.score(C.predict_proba(model, x_test, prepare), y_test, "accuracy")
            scores[r["name"]].append(acc)
            extras[r["name"]].append({k: v for k, v in info.items() if k != "op_stats"})
            print(f"seed {seed} {r['name']:<28} acc {acc:6.2f}  ({info['train_seconds']:.0f}s"
                  + (f", kept {info['kept_fraction']:.2f}, relabeled {info['relabeled_fraction']:.2f}"
                     if "kept_fraction" in info else "") + ")", flush=True)  # fmt: skip
    defaults = C.saflex_defaults()
    payload = {
        "dataset": args.tag,
        "metric": "accuracy",
        "machine": C.machine_string(),
        "versions": C.versions(),
        "settings": {
            "model": f"timm ResNet-18, 3x3 stride-{args.stem_stride} stem, no max-pool, base width {args.width}, "
                     "1 input channel",
            "optimizer": f"Adam lr {args.lr}, one-cycle schedule, {args.epochs} epochs, no weight decay",
            "batch": f"{args.batch_size} clean + {args.batch_size} augmented copies (upstream rows); "
                     f"NoAug: {args.batch_size} clean",
            "n_train": args.n_train, "n_val": args.n_val, "n_test": len(y_test),
            "split": "per seed: a class-balanced subset of the official training set, split into disjoint train and "
                     "validation parts; test = official test split",
            "validation_use": "SAFLEX rows: validation stream of SaflexLoss (batch "
                              f"{args.val_batch_size}); train_on_val rows: added to the training data; other rows: "
                              "unused. No early stopping or model selection anywhere (last epoch).",
            "upstreams": {u: upstream_fns[u]().name for u in upstreams},
            "saflex_kwargs": saflex_kwargs, "saflex_defaults": defaults,
            "seeds": args.seeds, "threads": args.threads, "quick": args.quick,
            "wall_seconds": round(time.perf_counter() - t_start, 1),
        },
        "rows": C.result_rows(rows, scores, extras, seconds_digits=1),
    }  # fmt: skip
    if args.reuse_baselines:
        payload = C.merge_baselines(payload, args.reuse_baselines)
    out = Path(args.out)
    C.write_json(out / f"accuracy_{args.tag}.json", payload)
    C.plot_rows(out / f"accuracy_{args.tag}.png", payload)
    for r in payload["rows"]:
        print(f"{r['name']:<30} {C.mean_std(r['scores'])}")
    print(f"wrote {out / f'accuracy_{args.tag}.json'} in {payload['settings']['wall_seconds']:.0f}s")
    return payload


if __name__ == "__main__":
    main()
