"""Host synchronisations and aten ops of one ``SaflexLoss`` training step, per method.

Counts, for a step after the first (the first checks its inputs once), the aten ops and host syncs of the loss call
(``criterion(logits, target)``; ``forward_train`` too for ``single_pass``) and of its backward, with the
dispatch-mode counter of ``tests/_dispatch_count.py``; ``ops beyond val forward`` subtracts the ops of a plain
no-grad forward of the validation batch (what ``last_layer`` cannot avoid). CPU, an MLP (``--model mlp``) or the
test CNN with BatchNorm (``--model cnn``).

    python benchmarks/hot_path.py [--model mlp] [--rule margin] [--json PATH] [--before OLD.json]

``--rule`` measures another rule than the library's default. ``--before`` embeds the rows of a JSON this script
wrote at an earlier commit (copied into that checkout and run there), under ``"before"``, for comparison.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from saflex_data import SaflexLoss, SaflexTarget  # noqa: E402
from tests._dispatch_count import count  # noqa: E402

CASES = (
    ("last_layer", {}),
    ("last_layer", {"reference": "batch"}),
    ("jvp", {}),
    ("jvp_frozen_stats", {}),
    ("single_pass", {}),
)


def _model(kind: str, classes: int) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, classes))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, classes))


def _inputs(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 16) if kind == "mlp" else (n, 3, 8, 8), generator=g)


def measure(kind: str = "mlp", classes: int = 10, batch: int = 64, val: int = 32,
            rule: str | None = None) -> list[dict]:
    out = []
    for method, options in CASES:
        model = _model(kind, classes).train()
        val_loader = [(_inputs(kind, val, 1), torch.arange(val) % classes)]
        criterion = SaflexLoss(model, None if options.get("reference") == "batch" else val_loader, method=method,
                               **options, **({} if rule is None else {"rule": rule}))
        labels = torch.arange(batch) % classes
        target = SaflexTarget(labels, torch.arange(batch) >= batch // 2)

        for i in range(3):  # the first step checks its inputs once; count the third
            x = _inputs(kind, batch, 10 + i)
            if method == "single_pass":  # the training forward is part of the method
                loss, counted = count(lambda x=x, c=criterion, t=target: c(c.forward_train(x), t))
            else:
                loss, counted = count(criterion, model(x), target)
            _, backward = count(loss.backward)
            model.zero_grad(set_to_none=True)
        with torch.no_grad():
            _, val_forward = count(model.eval(), val_loader[0][0])
        model.train()
        name = method + ("" if not options else "/" + ",".join(f"{k}={v}" for k, v in options.items()))
        out.append({
            "case": name,
            "syncs": len(counted.syncs),
            "sync_ops": counted.syncs,
            "ops": counted.total,
            "val_forward_ops": val_forward.total,
            "ops_beyond_val_forward": counted.total - (val_forward.total if "reference" not in options else 0),
            "backward_syncs": len(backward.syncs),
            "backward_ops": backward.total,
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rule", default=None, help="a rule name (default: the library's default rule)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--before", type=Path, help="a JSON of this script from an earlier commit, to embed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = measure(args.model, args.classes, rule=args.rule)
    for row in rows:
        print(f"{row['case']:32s} syncs {row['syncs']:3d}  ops {row['ops']:4d}  beyond val forward "
              f"{row['ops_beyond_val_forward']:4d}  backward syncs {row['backward_syncs']}  {row['sync_ops']}")
    if args.json:
        rule = args.rule or str(inspect.signature(SaflexLoss).parameters["rule"].default)  # any version's default
        record = {"model": args.model, "classes": args.classes, "rule": rule, "rows": rows}
        if args.before:
            record["before"] = json.loads(args.before.read_text())
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
