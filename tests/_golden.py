"""Golden file of ``SaflexLoss``'s behaviour: 30 training steps per method and rule, compared bit for bit.

A refactor of the loss must not change a single bit of what it returns or decides. ``python -m tests._golden``
rewrites ``tests/data/golden_loss.pt`` (only do so for a deliberate, documented change of behaviour);
``tests/test_golden.py`` compares against it.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

from saflex_data import SaflexLoss, SaflexTarget
from saflex_data.functional import Rule
from tests.conftest import SmallCNN

PATH = Path(__file__).parent / "data" / "golden_loss.pt"
K = 4
STEPS = 30
METHODS = ("jvp", "last_layer", "single_pass")
RULES = ("paper", "centered", "margin", "margin_relabel", "margin_fix")
GATED = ("gated", "gated_prior", "gated_soft")  # stateful (issue 20): beta=1.0, decay=0.8, so the gate moves in 30 steps
# (name, extra SaflexLoss options, soft upstream labels)
SETTINGS = (
    ("default", {}, False),
    ("val_every2_ema", {"val_every": 2, "val_ema": 0.5, "val_temperature": 1.0}, False),
    ("soft_smoothing", {"label_smoothing": 0.1}, True),
)


def _cases():
    for method, rule, (name, options, soft) in itertools.product(METHODS, RULES, SETTINGS):
        if name != "default" and rule not in ("paper", "margin"):
            continue
        yield f"{method}/{rule}/{name}", method, rule, options, soft
    for method, rule in itertools.product(METHODS, GATED):
        yield f"{method}/{rule}/default", method, rule, {}, False


def run_case(method: str, rule: str, options: dict, soft: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = SmallCNN(K).train()
    g = torch.Generator().manual_seed(1)
    val = [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, K, (8,), generator=g)) for _ in range(3)]
    if rule in GATED:
        config = Rule(rule, beta=1.0, decay=0.8)
    else:
        config = Rule(rule, beta=0.7 if rule == "paper" else None)
    criterion = SaflexLoss(model, val, method=method, rule=config, seed=3, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, weights, targets = [], [], []
    for step in range(STEPS):
        x = torch.randn(10, 1, 6, 6, generator=g)
        y = torch.randint(0, K, (10,), generator=g)
        labels = F.one_hot(y, K).float() * 0.7 + 0.3 / K if soft else y
        is_aug = torch.arange(10) >= 4
        target = SaflexTarget(labels, is_aug, op=torch.where(is_aug, torch.arange(10) % 3, -1))
        logits = criterion.forward_train(x) if method == "single_pass" else model(x)
        loss = criterion(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        weights.append(criterion.last_step["weights"])
        targets.append(criterion.last_step["targets"])
    out = {"loss": torch.stack(losses), "weights": torch.stack(weights), "targets": torch.stack(targets)}
    if criterion.rule_state is not None:
        out.update({f"rule_state.{k}": v.clone() for k, v in criterion.rule_state.items()})
    out.update({f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out


def generate(only: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Every case (or those whose rule is ``only``), each run with one thread: bit-reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {key: run_case(method, rule, options, soft) for key, method, rule, options, soft in _cases()
                if only is None or rule == only}  # fmt: skip
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import sys

    PATH.parent.mkdir(exist_ok=True)
    if sys.argv[1:2] == ["--add"]:  # python -m tests._golden --add RULE: (re)write only that rule's cases
        golden = torch.load(PATH)
        golden.update(generate(only=sys.argv[2]))
        torch.save(golden, PATH)
    else:
        torch.save(generate(), PATH)
    print(f"wrote {PATH}")
