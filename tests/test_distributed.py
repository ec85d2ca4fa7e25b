"""SaflexLoss under torch.distributed: 2 CPU processes with the gloo backend (torch.multiprocessing, spawn).

Every launch has a deadline (the parent kills the workers and fails the test) and every process group a timeout,
so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DistributedSampler

from saflex_data import SaflexLoss, SaflexTarget
from saflex_data import distributed as sdist
from saflex_data.functional import Rule
from saflex_data.sampler import SaflexBatchSampler

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
FEATURES, CLASSES, HIDDEN = 6, 4, 12
B, V, STEPS = 6, 5, 4  # per-rank train batch, per-rank validation batch, optimizer steps


# ----------------------------------------------------------------------------------------------------------------
# launching
# ----------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(worker: Callable[..., None], *args: Any, timeout: float = 90.0) -> None:
    """Run ``worker(rank, world, port, *args)`` on WORLD spawned processes; fail (not hang) past ``timeout``."""
    port = _free_port()
    ctx = mp.start_processes(worker, args=(WORLD, port, *args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail(f"{worker.__name__} did not finish within {timeout:.0f} s: the ranks hang")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))


# ----------------------------------------------------------------------------------------------------------------
# one launch runs every scenario in turn (spawning 2 interpreters costs most of the time); a scenario that raises
# is recorded and fails its own tests only
# ----------------------------------------------------------------------------------------------------------------
# mismatch last: the ranks stay in sync after its errors, but only because check_consistent raises on every rank
PARTS = ("equivalence", "single_pass", "uneven", "cost", "nonfinite", "sampler", "gated", "mismatch")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    results: dict[str, Any] = {}
    for name in PARTS:
        try:
            results[name] = globals()[f"_part_{name}"](rank)
        except Exception:  # recorded for the tests of this part; the other parts still run
            results[name] = traceback.format_exc()
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    _launch(_worker, str(out), timeout=150.0)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _part(result: dict[str, Any], name: str) -> Any:
    if isinstance(result[name], str):
        pytest.fail(f"scenario {name!r} raised on a rank:\n{result[name]}")
    return result[name]


# ----------------------------------------------------------------------------------------------------------------
# the problem: the global batch of step s is WORLD * B rows, rank r holds rows [r B, (r + 1) B)
# ----------------------------------------------------------------------------------------------------------------
def _model() -> nn.Module:
    torch.manual_seed(0)  # no dropout, no BatchNorm: a sample's logits do not depend on its batch
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).double()


def _problem() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = WORLD * B
    aug = torch.rand(STEPS, n, generator=g) < 0.6
    aug[1, :B] = False  # step 1: rank 0 has no augmented sample
    aug[2] = False  # step 2: no rank has one
    return {
        "x": torch.randn(STEPS, n, FEATURES, generator=g, dtype=torch.float64),
        "y": torch.randint(0, CLASSES, (STEPS, n), generator=g),
        "aug": aug,
        "op": torch.where(aug, torch.randint(0, 3, (STEPS, n), generator=g), -1),
        "vx": torch.randn(STEPS, WORLD * V, FEATURES, generator=g, dtype=torch.float64),
        "vy": torch.randint(0, CLASSES, (STEPS, WORLD * V), generator=g),
    }


CONFIGS = [
    dict(method="jvp", rule=Rule("paper", beta=1.5, tau=None)),
    dict(method="jvp", rule=Rule("centered", beta=0.3, tau=0.05)),
    dict(method="last_layer", rule=Rule("paper", beta=0.2, tau=0.5), val_every=2),
]


def _train(model: nn.Module, criterion: SaflexLoss, data: dict, rows: slice) -> dict[str, Any]:
    """STEPS SGD steps on ``rows`` of each global batch; the per-step decisions and stats."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    weights, labels, stats = [], [], []
    for s in range(STEPS):
        target = SaflexTarget(
            data["y"][s, rows], data["aug"][s, rows], op=data["op"][s, rows], op_names=("a", "b", "c")
        )
        loss = criterion(model(data["x"][s, rows]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        weights.append(criterion.last_step["weights"].clone())
        labels.append(criterion.last_step["targets"].clone())
        stats.append(criterion.stats)
    raw = criterion.model
    return {
        "params": [p.detach().clone() for p in raw.parameters()],
        "weights": weights,
        "labels": labels,
        "stats": stats,
        "op_stats": criterion.op_stats(),
        "signal": criterion._signal,
    }


def _part_equivalence(rank: int) -> list[dict[str, Any]]:
    data = _problem()
    results = []
    for config in CONFIGS:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        val = [(data["vx"][s, rank * V : (rank + 1) * V], data["vy"][s, rank * V : (rank + 1) * V])
               for s in range(STEPS)]
        criterion = SaflexLoss(ddp, val, **config)
        assert criterion.model is model  # the extra passes use the raw module
        results.append(_train(ddp, criterion, data, slice(rank * B, (rank + 1) * B)))
    return results


@pytest.fixture(scope="module")
def equivalence(ranks: list[dict[str, Any]]) -> tuple[list, list]:
    ranks = [_part(result, "equivalence") for result in ranks]
    data = _problem()
    single = []
    for config in CONFIGS:
        model = _model()
        val = [(data["vx"][s], data["vy"][s]) for s in range(STEPS)]  # the ranks' validation batches, concatenated
        single.append(_train(model, SaflexLoss(model, val, **config), data, slice(None)))
    return ranks, single


GATED = dict(method="last_layer", rule=Rule("gated_prior", beta=0.5, decay=0.5))


def _gated_run(model: nn.Module, criterion: SaflexLoss, data: dict, rows: slice) -> dict[str, Any]:
    """A gated rule with a verdict after 2 effective steps (the default 8 needs a longer run than STEPS)."""
    from saflex_data import rules

    saved, rules.MIN_EFFECTIVE_STEPS = rules.MIN_EFFECTIVE_STEPS, 1.5
    try:
        out = _train(model, criterion, data, rows)
    finally:
        rules.MIN_EFFECTIVE_STEPS = saved
    out["rule_state"] = {k: v.clone() for k, v in criterion.rule_state.items()}
    return out


def _part_gated(rank: int) -> dict[str, Any]:
    data = _problem()
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    val = [(data["vx"][s, rank * V : (rank + 1) * V], data["vy"][s, rank * V : (rank + 1) * V]) for s in range(STEPS)]
    return _gated_run(ddp, SaflexLoss(ddp, val, **GATED), data, slice(rank * B, (rank + 1) * B))


def test_gated_rule_state_is_identical_on_every_rank_and_matches_one_process(ranks: list) -> None:
    got = [_part(result, "gated") for result in ranks]
    data = _problem()
    model = _model()
    val = [(data["vx"][s], data["vy"][s]) for s in range(STEPS)]
    ref = _gated_run(model, SaflexLoss(model, val, **GATED), data, slice(None))
    assert float(ref["rule_state"]["weight"]) > 0 and (torch.cat(ref["weights"]) < 1).any()
    for k in ref["rule_state"]:
        assert torch.equal(got[0]["rule_state"][k], got[1]["rule_state"][k]), k  # every rank: the same state
        torch.testing.assert_close(got[0]["rule_state"][k], ref["rule_state"][k], rtol=1e-5, atol=1e-6)
    for rank, result in enumerate(got):
        rows = slice(rank * B, (rank + 1) * B)
        for s in range(STEPS):
            torch.testing.assert_close(result["weights"][s], ref["weights"][s][rows], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("config", range(len(CONFIGS)), ids=[f"{c['method']}-{c['rule'].name}" for c in CONFIGS])
def test_two_ranks_batch_b_match_one_process_batch_2b(equivalence: tuple, config: int) -> None:
    ranks, single = equivalence
    ref = single[config]
    # The reference must exercise both decisions, or the comparison proves little.
    every = torch.cat(ref["weights"])
    assert (every == 0).any(), "no sample was dropped in the reference run"
    relabeled = torch.cat([lab.argmax(-1) for lab in ref["labels"]]) != _problem()["y"].reshape(-1)
    assert relabeled.any(), "no sample was relabeled in the reference run"
    for rank, result in enumerate(ranks):
        got = result[config]
        for p, q in zip(got["params"], ref["params"], strict=False):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
        rows = slice(rank * B, (rank + 1) * B)
        for s in range(STEPS):
            torch.testing.assert_close(got["weights"][s], ref["weights"][s][rows], rtol=0, atol=0)
            torch.testing.assert_close(got["labels"][s], ref["labels"][s][rows], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("config", range(len(CONFIGS)), ids=[f"{c['method']}-{c['rule'].name}" for c in CONFIGS])
def test_stats_are_global_and_identical_on_every_rank(equivalence: tuple, config: int) -> None:
    ranks, single = equivalence
    ref = single[config]
    for result in ranks:
        got = result[config]
        for s in range(STEPS):
            assert got["stats"][s].keys() == ref["stats"][s].keys()
            for key, value in ref["stats"][s].items():
                assert got["stats"][s][key] == pytest.approx(value, abs=1e-12), (s, key)
        assert ref["op_stats"], "the reference has no per-op statistics"
        assert got["op_stats"].keys() == ref["op_stats"].keys()
        for name, values in ref["op_stats"].items():
            assert got["op_stats"][name] == pytest.approx(values)
    assert ref["stats"][1]["augmented_fraction"] > 0  # rank 0 had none at step 1, rank 1 some: still global


# ----------------------------------------------------------------------------------------------------------------
# method="single_pass": the training forward itself carries the tangent, so it must go through the DDP wrapper
# ----------------------------------------------------------------------------------------------------------------
SINGLE_PASS = dict(method="single_pass", rule=Rule("paper", beta=0.5, tau=0.05))


def _train_single_pass(model: nn.Module, criterion: SaflexLoss, data: dict, rows: slice, forward: Callable) -> list:
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for s in range(STEPS):
        loss = criterion(forward(data["x"][s, rows]), SaflexTarget(data["y"][s, rows], data["aug"][s, rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in criterion.model.parameters()]


def _part_single_pass(rank: int) -> dict[str, list[torch.Tensor]]:
    data = _problem()
    val = [(data["vx"][s, rank * V : (rank + 1) * V], data["vy"][s, rank * V : (rank + 1) * V]) for s in range(STEPS)]
    rows = slice(rank * B, (rank + 1) * B)
    out = {}
    ddp = nn.parallel.DistributedDataParallel(_model())
    criterion = SaflexLoss(ddp, val, **SINGLE_PASS)
    out["forward_train"] = _train_single_pass(ddp, criterion, data, rows, criterion.forward_train)

    ddp = nn.parallel.DistributedDataParallel(_model())
    criterion = SaflexLoss(ddp, val, **SINGLE_PASS)

    def through_wrapper(inputs: torch.Tensor) -> torch.Tensor:  # the fix proposed for SaflexLoss.forward_train
        criterion._sync.check_once(criterion.settings())
        signal, _ = criterion._validation_signal(None, None, None, None)
        logits, tangent = sdist.forward_with_tangent(ddp, inputs, signal)
        criterion._method.remember(logits, tangent=tangent)
        return logits

    out["through_wrapper"] = _train_single_pass(ddp, criterion, data, rows, through_wrapper)
    return out


def _single_pass_reference() -> list[torch.Tensor]:
    data = _problem()
    model = _model()
    criterion = SaflexLoss(model, [(data["vx"][s], data["vy"][s]) for s in range(STEPS)], **SINGLE_PASS)
    return _train_single_pass(model, criterion, data, slice(None), criterion.forward_train)


def test_single_pass_through_the_ddp_wrapper_matches_one_process(ranks: list) -> None:
    ref = _single_pass_reference()
    for result in ranks:
        for p, q in zip(_part(result, "single_pass")["through_wrapper"], ref, strict=False):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


def test_single_pass_forward_train_under_ddp_matches_one_process(ranks: list) -> None:
    ref = _single_pass_reference()
    for result in ranks:
        for p, q in zip(_part(result, "single_pass")["forward_train"], ref, strict=False):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------------------------------------------
# uneven validation loaders, ranks without augmented samples, per-rank mode
# ----------------------------------------------------------------------------------------------------------------
def _part_uneven(rank: int) -> dict[Any, Any]:
    data = _problem()
    results = {}
    g = torch.Generator().manual_seed(10 + rank)
    num_val = 1 if rank == 0 else 3  # validation loaders of different lengths
    val = [(torch.randn(V, FEATURES, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (V,), generator=g))
           for _ in range(num_val)]
    for all_reduce in (True, False):
        for method in ("jvp", "last_layer"):
            model = _model()
            ddp = nn.parallel.DistributedDataParallel(model)
            criterion = SaflexLoss(ddp, val, method=method, all_reduce=all_reduce, val_every=2)
            if rank == 0:  # an evaluation on one rank only, before training: no collective, so no hang
                with torch.no_grad():
                    criterion(ddp.module(data["x"][0, :B]), SaflexTarget(data["y"][0, :B], data["aug"][0, :B]))
            for _ in range(2):  # 2 x STEPS steps: rank 0 wraps its loader 8 times, rank 1 about 3 times
                result = _train(ddp, criterion, data, slice(rank * B, (rank + 1) * B))
            results[(all_reduce, method)] = {
                "params": result["params"],
                "signal": result["signal"],
                "stats": result["stats"][-1],
            }
    # all_reduce_mean buckets: mixed dtypes, a bucket smaller than one tensor
    tensors = [torch.full((3, 2), float(rank)), torch.arange(5, dtype=torch.float64) * rank, torch.ones(7) * rank]
    results["mean"] = sdist.all_reduce_mean(tensors, bucket_numel=5)
    return results


def test_uneven_validation_loaders_and_ranks_without_augmented_samples_do_not_hang(ranks: list) -> None:
    r0, r1 = (_part(result, "uneven") for result in ranks)
    for method in ("jvp", "last_layer"):
        for all_reduce in (True, False):
            a, b = r0[(all_reduce, method)], r1[(all_reduce, method)]
            for p, q in zip(a["params"], b["params"], strict=False):  # DDP keeps the replicas equal either way
                torch.testing.assert_close(p, q)
        shared = r0[(True, method)]["signal"], r1[(True, method)]["signal"]
        own = r0[(False, method)]["signal"], r1[(False, method)]["signal"]

        def first(sig: dict) -> torch.Tensor:
            return next(iter(sig.values()))

        torch.testing.assert_close(first(shared[0]), first(shared[1]))  # averaged: the same on both ranks
        assert not torch.allclose(first(own[0]), first(own[1]))  # all_reduce=False: each rank its own
        assert r0[(True, method)]["stats"] == r1[(True, method)]["stats"]
    for got in (r0["mean"], r1["mean"]):
        torch.testing.assert_close(got[0], torch.full((3, 2), 0.5))
        torch.testing.assert_close(got[1], torch.arange(5, dtype=torch.float64) * 0.5)
        torch.testing.assert_close(got[2], torch.full((7,), 0.5))


# ----------------------------------------------------------------------------------------------------------------
# the documented communication cost, counted
# ----------------------------------------------------------------------------------------------------------------
def _part_cost(rank: int) -> dict[str, list[tuple[int, ...]]]:
    data = _problem()
    calls: dict[str, list[tuple[int, ...]]] = {"all_reduce": [], "all_gather": []}
    real = {name: getattr(dist, name) for name in calls}

    def counting(name: str) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            tensor = args[0] if name == "all_reduce" else args[1]
            calls[name].append(tuple(tensor.shape))
            return real[name](*args, **kwargs)
        return call

    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)  # DDP's own gradient all-reduce runs in C++: not counted
    val = [(data["vx"][s, rank * V : (rank + 1) * V], data["vy"][s, rank * V : (rank + 1) * V]) for s in range(STEPS)]
    criterion = SaflexLoss(ddp, val, method="jvp", rule="margin")  # the gated rules add: docs/method.md#gated-rules
    for name in calls:
        setattr(dist, name, counting(name))
    try:
        _train(ddp, criterion, data, slice(rank * B, (rank + 1) * B))
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    return calls


def test_communication_is_what_the_docs_say(ranks: list) -> None:
    data = _problem()
    params = sum(p.numel() for p in _model().parameters())
    refreshing = [s for s in range(STEPS) if data["aug"][s].any()]  # steps whose global batch has augmented rows
    for result in ranks:
        calls = _part(result, "cost")
        # the validation gradient: one all-reduce of P floats per refresh (a single bucket here)
        assert calls["all_reduce"] == [(params,)] * len(refreshing)
        # per step: the counts (3 integers), then the rows' [Π | label | op | augmented] (whole batches: fixed
        # shapes), skipped by the JVP methods when no rank has an augmented row
        expected = []
        for s in range(STEPS):
            expected.append((3,))
            if data["aug"][s].any():
                expected.append((B, 2 * CLASSES + 2))
        assert calls["all_gather"] == expected


# ----------------------------------------------------------------------------------------------------------------
# a non-finite Π on one rank: every rank falls back together (as one process would for the whole batch)
# ----------------------------------------------------------------------------------------------------------------
def _part_nonfinite(rank: int) -> dict[str, Any]:
    import warnings

    data = _problem()
    ddp = nn.parallel.DistributedDataParallel(_model())
    val = [(data["vx"][0, rank * V : (rank + 1) * V], data["vy"][0, rank * V : (rank + 1) * V])]
    criterion = SaflexLoss(ddp, val, method="jvp", rule="margin")  # the gated rules add: docs/method.md#gated-rules
    x, rows = data["x"][0].clone(), slice(rank * B, (rank + 1) * B)
    x[B + int(data["aug"][0, B:].nonzero()[0])] = float("nan")  # one augmented row of rank 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        criterion(ddp(x[rows]), SaflexTarget(data["y"][0, rows], data["aug"][0, rows]))
    return {"weights": criterion.last_step["weights"], "stats": criterion.stats}


def test_non_finite_inner_products_on_one_rank_make_every_rank_fall_back(ranks: list) -> None:
    results = [_part(result, "nonfinite") for result in ranks]
    for result in results:
        assert result["stats"]["nonfinite_steps"] == 1.0
        assert bool((result["weights"] == 1).all())
    assert results[0]["stats"] == results[1]["stats"]


# ----------------------------------------------------------------------------------------------------------------
# SaflexBatchSampler around DistributedSampler (rank and world size from the real process group)
# ----------------------------------------------------------------------------------------------------------------
SAMPLER_N, SAMPLER_EPOCHS = 40, 3


def _sampler(rank: int | None = None) -> SaflexBatchSampler:
    kwargs = {} if rank is None else {"num_replicas": WORLD, "rank": rank}
    return SaflexBatchSampler(DistributedSampler(range(SAMPLER_N), shuffle=True, seed=5, **kwargs), 6, p=0.5, seed=3)


def _part_sampler(rank: int) -> list[list[list[tuple[int, int]]]]:
    sampler = _sampler()  # DistributedSampler reads the rank and world size from torch.distributed
    epochs = []
    for epoch in range(SAMPLER_EPOCHS):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    return epochs


def test_saflex_batch_sampler_over_distributed_sampler(ranks: list) -> None:
    per_rank = [_part(result, "sampler") for result in ranks]
    for epoch in range(SAMPLER_EPOCHS):
        indices = [[i for batch in r[epoch] for i, _ in batch] for r in per_rank]
        assert set(indices[0]).isdisjoint(indices[1])  # disjoint shards...
        assert sorted(indices[0] + indices[1]) == list(range(SAMPLER_N))  # ...that cover the dataset
        flags = [[bool(f) for batch in r[epoch] for _, f in batch] for r in per_rank]
        assert flags[0] == flags[1]  # the same flag pattern on every rank
        assert 0 < sum(flags[0]) < len(flags[0])
        for rank, r in enumerate(per_rank):  # reproducible from (seed, epoch) alone, in another process
            again = _sampler(rank)
            again.set_epoch(epoch)
            assert list(again) == r[epoch]
    assert per_rank[0][0] != per_rank[0][1]  # a new epoch, new shards and flags


# ----------------------------------------------------------------------------------------------------------------
# settings that differ across ranks
# ----------------------------------------------------------------------------------------------------------------
MISMATCHES = [
    ({"rule": Rule(beta=0.5)}, {"rule": Rule(beta=1.0)}),
    ({"all_reduce": True}, {"all_reduce": False}),
    ({"val_every": 1, "method": "jvp"}, {"val_every": 3, "method": "last_layer"}),
    ({"enabled": True}, {"enabled": False}),
    ({"all_reduce": False, "seed": 0}, {"all_reduce": False, "seed": 1}),  # per-rank noise is fine per rank
]


def _part_mismatch(rank: int) -> list[str | None]:
    data = _problem()
    messages = []
    for settings in MISMATCHES:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        val = [(data["vx"][0, :V], data["vy"][0, :V])]
        criterion = SaflexLoss(ddp, val, **settings[rank])
        try:
            _train(ddp, criterion, data, slice(rank * B, (rank + 1) * B))
        except ValueError as error:
            messages.append(str(error))
        else:
            messages.append(None)
    return messages


def test_settings_that_differ_across_ranks_raise_on_every_rank(ranks: list) -> None:
    for result in ranks:
        messages = _part(result, "mismatch")
        assert messages[0] is not None
        assert "SaflexLoss settings differ across ranks (beta: rank 0 = 0.5, rank 1 = 1.0)" in messages[0]
        assert messages[1] is not None and "all_reduce: rank 0 = True, rank 1 = False" in messages[1]
        assert messages[2] is not None
        for part in ("classifier: rank 0 = None, rank 1 = '2'", "method: rank 0 = 'jvp', rank 1 = 'last_layer'",
                     "val_every: rank 0 = 1, rank 1 = 3"):
            assert part in messages[2]
        assert messages[3] is not None and "enabled: rank 0 = True, rank 1 = False" in messages[3]
        assert messages[4] is None


# ----------------------------------------------------------------------------------------------------------------
# without torch.distributed
# ----------------------------------------------------------------------------------------------------------------
def test_is_distributed_is_false_without_a_process_group() -> None:
    assert not sdist.is_distributed()
    model = _model()
    criterion = SaflexLoss(model, [(torch.randn(3, FEATURES, dtype=torch.float64), torch.tensor([0, 1, 2]))])
    assert not criterion._sync.active
    criterion(model(torch.randn(4, FEATURES, dtype=torch.float64)),
              SaflexTarget(torch.tensor([0, 1, 2, 3]), torch.tensor([False, True, True, False]))).backward()
    assert not criterion._sync.checked  # no collective outside torch.distributed


# ----------------------------------------------------------------------------------------------------------------
# torchrun
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_example_runs_under_torchrun(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(ROOT / "examples" / "ddp_train.py"), "--steps", "4", "--check"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "replicas equal: True" in proc.stdout
