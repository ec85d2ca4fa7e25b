"""The known-truth suite (benchmarks/suite): it drives the public SaflexLoss, its truth is right, --quick runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

import saflex_data.functional as SF  # noqa: E402
from benchmarks.suite import models as M  # noqa: E402
from benchmarks.suite import report, streams, variants  # noqa: E402
from saflex_data import SaflexLoss, SaflexTarget  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def digits_stream():
    return streams.build("digits", "pool10-uniform60", 0, scale=0.5)


def test_saflex_row_gives_exactly_saflex_loss_decisions(digits_stream):
    """On a fixed batch, the suite's criterion and a SaflexLoss built by hand agree bit for bit; so do the scores."""
    s = digits_stream
    torch.manual_seed(0)
    model = M.MLP(s.dim, s.num_classes)
    v = variants.BY_NAME[variants.DEFAULT]
    criterion, ref = M.make_criterion(s, v, model, s.x_train, s.y_train, seed=0)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(s.y_pool), (48,), generator=gen)
    xa, ya, bad, _ = s.draw(idx, s.x_pool[idx], None, gen)
    x, y = torch.cat([s.x_train[:16], xa]), torch.cat([s.y_train[:16], ya])
    is_aug = torch.arange(64) >= 16
    h = model.features(x)
    logits = model.fc(h)
    criterion(logits, SaflexTarget(y, is_aug))
    suite_step = {k: t.clone() for k, t in criterion.last_step.items()}
    by_hand = SaflexLoss(model, [ref.last], rule=SF.Rule("margin"))  # the old default, on the suite's validation batch
    by_hand(model(x), SaflexTarget(y, is_aug))
    for key in ("weights", "targets", "is_augmented", "upstream"):
        assert torch.equal(suite_step[key], by_hand.last_step[key]), key
    score, w, _ = M._saflex_scores(criterion, model, ref, h[is_aug].detach(), logits[is_aug].detach(), ya, None, None)
    assert torch.equal(w, suite_step["weights"][is_aug])
    assert score.shape == (48,)
    assert 0.0 < float(w.mean()) < 1.0  # the check means something: some rows dropped, some kept


def test_gated_row_gives_exactly_saflex_loss_decisions_step_after_step(digits_stream):
    """The chosen gated rule keeps state: over many steps, on the validation batches the suite's criterion drew, a
    SaflexLoss built by hand decides exactly alike and ends with the same gate state; the gate moves."""
    s = digits_stream
    torch.manual_seed(0)
    model = M.MLP(s.dim, s.num_classes)
    v = variants.BY_NAME[variants.GATED]
    criterion, ref = M.make_criterion(s, v, model, s.x_train, s.y_train, seed=0)
    gen = torch.Generator().manual_seed(0)
    steps, drawn, batches, decisions = 24, [], [], []
    for _ in range(steps):
        idx = torch.randint(0, len(s.y_pool), (48,), generator=gen)
        xa, ya, _, _ = s.draw(idx, s.x_pool[idx], None, gen)
        x, y = torch.cat([s.x_train[:16], xa]), torch.cat([s.y_train[:16], ya])
        batches.append((x, SaflexTarget(y, torch.arange(64) >= 16)))
        criterion(model(x), batches[-1][1])
        drawn.append(ref.last)
        decisions.append(criterion.last_step["weights"].clone())
    by_hand = SaflexLoss(model, drawn, rule=v.loss_kwargs()["rule"])
    for (x, target), w in zip(batches, decisions, strict=True):
        by_hand(model(x), target)
        assert torch.equal(by_hand.last_step["weights"], w)
    assert all(torch.equal(criterion.rule_state[k], by_hand.rule_state[k]) for k in criterion.rule_state)
    assert float(criterion.rule_state["weight"]) > 0


def test_gated_training_run_records_decisions_that_match_the_loss(digits_stream):
    r = M.run(digits_stream, variants.BY_NAME[variants.GATED], 0, steps=40)
    assert r["mismatches"] == 0 and 0.0 <= r["gate_on"] <= 1.0


def test_training_run_records_decisions_that_match_the_loss(digits_stream):
    r = M.run(digits_stream, variants.BY_NAME[variants.DEFAULT], 0, steps=12)
    assert r["mismatches"] == 0 and 0.0 <= r["score"] <= 1.0 and r["auroc"] is not None
    assert set(r["shadow_auroc"]) == {"margin", "paper", "gain", "gain_loss", "model log p[y]"}


def test_variants_at_the_same_budget_see_the_same_batches(digits_stream):
    """Paired by seed: the upstream and the oracle differ only by the oracle's drops."""
    a = M.run(digits_stream, variants.BY_NAME["upstream"], 3, steps=5)
    b = M.run(digits_stream, variants.BY_NAME["upstream"], 3, steps=5)
    assert a["score"] == b["score"]


def test_truth_of_the_streams():
    s = streams.build("digits", "pool10-classcond30", 1, scale=0.5)
    wrong = s.bad_pool
    assert 0.2 < float(wrong.float().mean()) < 0.4
    # class-conditional: every wrong label is its class's one fixed confusable class
    true = s.y_pool.clone()
    assert bool((s.confusable[s.y_pool[~wrong]] != s.y_pool[~wrong]).all())
    flipped = s.y_pool[wrong]
    sources = {int(c): int(s.confusable[c]) for c in range(10)}
    assert set(flipped.tolist()) <= set(sources.values())
    del true
    ops = streams.build("digits", "pool10-ops", 0, scale=0.5)
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(64)
    _, _, bad, op = ops.draw(idx, ops.x_pool[idx], None, gen)
    assert torch.equal(bad, op >= len(streams.HARMLESS_OPS)) and ops.ops[-1] == "rot180"
    clean = streams.build("hpc", "pool10-clean", 0, scale=0.5)
    assert not bool(clean.bad_pool.any()) and clean.bad_fraction == 0.0


def test_small_loss_peer_drops_exactly_the_highest_losses():
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 0.5], [2.0, 0.0], [0.0, 0.0],
                           [1.0, 1.0], [0.0, 4.0], [5.0, 0.0], [0.0, 2.0]])  # fmt: skip
    y = torch.zeros(10, dtype=torch.long)
    w, score = variants.peer_weights(variants.BY_NAME["small-loss q=30%"], logits, y, 0.6, None)
    assert w.tolist() == [1, 0, 1, 1, 1, 1, 1, 0, 1, 0]
    w, _ = variants.peer_weights(variants.BY_NAME["small-loss, told the bad rate (informed)"], logits, y, 0.6, None)
    assert int(w.sum()) == 4
    pi = torch.tensor([[1.0, -1.0], [-2.0, 2.0]])
    w, _ = variants.peer_weights(variants.BY_NAME["L2RW max(0, Π[i,y])"], logits[:2], y[:2], 0.0, pi)
    assert w.tolist() == [2.0, 0.0]  # max(0, Π[i, y]) normalised to mean 1


def _check_schema(doc: dict) -> None:
    keys = {"stream", "family", "extra_ratio", "bad_fraction", "variant", "role", "trains_on", "reference", "seeds",
            "scores", "auroc"}  # fmt: skip
    per_stream: dict[str, set] = {}
    for e in doc["entries"]:
        assert keys <= set(e)
        assert e["family"] in ("noise", "transform", "bias", "clean", "domain")
        assert e["role"] in ("default", "saflex", "peer", "baseline", "oracle")
        assert e["trains_on"] in ("train", "train+val") and e["reference"] in ("heldout", "batch", "train", None)
        assert len(e["scores"]) == len(e["seeds"]) and e["seeds"] == sorted(e["seeds"])
        per_stream.setdefault(e["stream"], set()).add(e["variant"])
    for names in per_stream.values():
        assert {"upstream", "upstream, train+val"} <= names


def test_quick_mode_writes_the_schema(tmp_path):
    from benchmarks.suite.run import main

    doc = main(["--quick", "--workers", "1", "--json", str(tmp_path / "s.json"), "--png", str(tmp_path / "s.png")])
    _check_schema(json.loads((tmp_path / "s.json").read_text()))
    assert (tmp_path / "s.png").stat().st_size > 0
    assert all(e["mismatches"] == 0 for e in doc["entries"] if e["role"] in ("default", "saflex"))


@pytest.mark.skipif(not (RESULTS / "suite.json").is_file(), reason="no committed suite.json")
def test_committed_results_schema_and_analysis():
    doc = json.loads((RESULTS / "suite.json").read_text())
    _check_schema(doc)
    sel = report.selection(doc)
    assert sel["chosen"] in report.CANDIDATES
    assert set(report.goals(doc)) == {"1", "2", "3", "4"}


def test_functional_scores_match_the_rule_on_the_loss_path():
    """The suite reads scores through weight_scores; the weights it checks come from saflex_targets."""
    pi = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 4, (20,), generator=torch.Generator().manual_seed(1))
    for rule in ("margin", "gain"):
        score = SF.weight_scores(pi, y, rule=rule)
        w, _ = SF.saflex_targets(pi, y, rule=rule)
        torch.testing.assert_close(w, (score >= -SF.default_beta(rule)).float())
