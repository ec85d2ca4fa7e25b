"""Golden file of ``SaflexLoss``'s behaviour: 30 training steps per method, rule and setting.

A refactor of the loss must not change what it decides, and may change what it returns only by float rounding.
``tests/test_golden.py`` compares a fresh run with ``tests/data/golden_loss.pt``:

* **decisions exactly**, on every machine: which augmented rows are kept (``weight > 0``), the weights themselves
  where the rule's weights are hard (0 or 1), and each row's label (the argmax of its soft label);
* **floats to a tolerance** (:data:`RTOL`, :data:`ATOL`, :data:`ATOL_SOFT_LABELS`): the loss of each step, soft
  weights, the soft labels and the model's final parameters. The float results of a convolution depend on the
  kernels oneDNN picks for the CPU (AVX-512, AVX2, AVX, SSE4.1 give different roundings), and 30 SGD steps with
  momentum carry a rounding difference forward. ``python -m tests._golden --calibrate`` reruns the cases with
  oneDNN capped at each instruction set this CPU has and prints the largest differences; the tolerances are set
  well above them (see RTOL).

``SAFLEX_GOLDEN_EXACT=1 pytest tests/test_golden.py`` compares every tensor bit for bit instead: use it for a
refactor on the machine that wrote the file (a change of one bit there is a change of arithmetic order, worth
knowing about). ``python -m tests._golden`` rewrites the file: only for a deliberate, documented change of
behaviour, or to add cases (the existing ones then must reproduce bit for bit on the same machine: the command
says which changed).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from saflex_data import SaflexLoss, SaflexTarget
from saflex_data.functional import Rule
from tests.conftest import SmallCNN

PATH = Path(__file__).parent / "data" / "golden_loss.pt"
K = 4
STEPS = 30
METHODS = ("jvp", "last_layer", "single_pass", "jvp_frozen_stats")
RULES = ("paper", "centered", "margin", "margin_relabel", "margin_fix", "gain", "gain_auto", "gain_loss")
# Rules with state (0.2), default setting only, with beta=1.0 and decay=0.8 so that the gate moves in 30 steps.
GATED = ("gated", "gated_prior", "gated_soft")
# (name, extra SaflexLoss options, soft upstream labels); the non-default settings run with the rules "paper" and
# "margin" only.
SETTINGS = (
    ("default", {}, False),
    ("val_every2_ema", {"val_every": 2, "val_ema": 0.5, "val_temperature": 1.0}, False),
    ("soft_smoothing", {"label_smoothing": 0.1}, True),
    ("reference_batch", {"reference": "batch"}, False),
)
# Calibrated with ``--calibrate`` on an AVX2 CPU capped at AVX2, AVX and SSE4.1 (largest differences seen: loss
# 1.6e-6, parameters 2.5e-6, soft labels 4.0e-5, all absolute; an AVX-512 CPU was reported at loss 5.5e-7 relative,
# parameters 2.4e-6, soft labels 2.1e-5). The soft labels of the Gumbel rules are softmax((S + G) / 0.01): a rounding
# difference in the score reaches them amplified ~100x, so they get their own tolerance. Each tolerance is ~25-60x
# above what was seen: a few more float32 roundings per step never reach it, while a real change of behaviour moves
# these numbers by far more (one flipped decision moves the parameters by ~1e-2 and a label by ~1).
RTOL = 1e-4
ATOL = 1e-4
ATOL_SOFT_LABELS = 1e-3
EXACT_ENV = "SAFLEX_GOLDEN_EXACT"


def _cases():
    for method, rule, (name, options, soft) in itertools.product(METHODS, RULES, SETTINGS):
        if name != "default" and rule not in ("paper", "margin"):
            continue
        if name == "reference_batch" and method == "single_pass":
            continue  # refused by SaflexLoss: the batch signal is needed before the forward
        yield f"{method}/{rule}/{name}", method, rule, options, soft
    for method, rule in itertools.product(METHODS, GATED):
        yield f"{method}/{rule}/default", method, rule, {}, False


def run_case(method: str, rule: str, options: dict, soft: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = SmallCNN(K).train()
    g = torch.Generator().manual_seed(1)
    val = [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, K, (8,), generator=g)) for _ in range(3)]
    if options.get("reference") == "batch":
        val = None
    config = Rule(rule, beta=1.0, decay=0.8) if rule in GATED else Rule(rule, beta=0.7 if rule == "paper" else None)
    criterion = SaflexLoss(model, val, method=method, rule=config, seed=3, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, weights, targets = [], [], []
    for _ in range(STEPS):
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
    if criterion.rule_state is not None:  # the gate's state after the last step
        out.update({f"rule_state.{k}": v.clone() for k, v in criterion.rule_state.items()})
    out.update({f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out


def generate(keys: set[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Every case (or those in ``keys``), with one thread: bit-reproducible on one machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {key: run_case(method, rule, options, soft) for key, method, rule, options, soft in _cases()
                if keys is None or key in keys}  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def exact_mode() -> bool:
    return os.environ.get(EXACT_ENV, "") not in ("", "0")


def differences(fresh: dict[str, torch.Tensor], golden: dict[str, torch.Tensor]) -> dict[str, float]:
    """The largest absolute difference of each float, and the number of decisions that differ (must be 0)."""
    out: dict[str, float] = {}
    for name, value in golden.items():
        new = fresh[name]
        if new.shape != value.shape or new.dtype != value.dtype:
            out[f"{name} (shape/dtype)"] = float("inf")
            continue
        if not value.is_floating_point():
            out[f"{name} (exact)"] = float((new != value).sum())
            continue
        out[name] = float((new.double() - value.double()).abs().max()) if value.numel() else 0.0
    weights, new_weights = golden["weights"], fresh["weights"]
    out["kept (exact)"] = float(((weights > 0) != (new_weights > 0)).sum())
    if bool(((weights == 0) | (weights == 1)).all()):  # hard weights: every one is a decision
        out["weights (exact)"] = float((weights != new_weights).sum())
    out["labels (exact)"] = float((golden["targets"].argmax(-1) != fresh["targets"].argmax(-1)).sum())
    return out


def problems(fresh: dict[str, torch.Tensor], golden: dict[str, torch.Tensor], *, exact: bool = False) -> list[str]:
    """What a fresh run of one case does differently from its golden record (empty: it reproduces)."""
    if exact:
        return [f"{name} is not bit-identical" for name, value in golden.items()
                if not torch.equal(fresh[name], value)]  # fmt: skip
    found = [f"{name}: {count:g} decision(s) differ" for name, count in differences(fresh, golden).items()
             if name.endswith("(exact)") or name.endswith("(shape/dtype)") if count]  # fmt: skip
    for name, value in golden.items():
        new = fresh[name]
        atol = ATOL_SOFT_LABELS if name == "targets" else ATOL
        if value.is_floating_point() and new.shape == value.shape and not torch.allclose(
            new.double(), value.double(), rtol=RTOL, atol=atol
        ):
            found.append(f"{name}: off by {float((new.double() - value.double()).abs().max()):.3g} "
                         f"(tolerance rtol={RTOL:g}, atol={atol:g})")  # fmt: skip
    return found


def calibrate(isas: tuple[str, ...] = ("AVX2", "AVX", "SSE41")) -> None:
    """Run the cases with oneDNN capped at each instruction set (a subprocess each) and print the largest
    differences from the golden file, per quantity."""
    golden = torch.load(PATH)
    for isa in isas:
        out = Path(f"/tmp/golden_{isa}.pt")
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
        code = f"import torch; from tests import _golden; torch.save(_golden.generate(), {str(out)!r})"
        subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=Path(__file__).parents[1])
        fresh = torch.load(out)
        worst: dict[str, float] = {}
        for key in golden:
            for name, diff in differences(fresh[key], golden[key]).items():
                group = "param" if name.startswith("param.") else name
                worst[group] = max(worst.get(group, 0.0), diff)
        print(f"ONEDNN_MAX_CPU_ISA={isa}: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(worst.items())))


if __name__ == "__main__":
    if "--calibrate" in sys.argv:
        calibrate()
        sys.exit(0)
    if "--add" in sys.argv:  # python -m tests._golden --add: write only the cases the file lacks
        golden = torch.load(PATH)
        missing = {key for key, *_ in _cases()} - set(golden)
        golden.update(generate(missing))
        torch.save(golden, PATH)
        print(f"wrote {PATH}: {len(missing)} cases added: {sorted(missing)}")
        sys.exit(0)
    PATH.parent.mkdir(exist_ok=True)
    old = torch.load(PATH) if PATH.exists() else {}
    new = generate()
    changed = [key for key in old if key in new and problems(new[key], old[key], exact=True)]
    torch.save(new, PATH)
    print(f"wrote {PATH}: {len(new)} cases, {len(set(new) - set(old))} new, {len(changed)} changed: {changed}")
