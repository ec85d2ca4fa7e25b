"""Hardening of ``SaflexLoss`` for long jobs: determinism, resume in a fresh process, memory, mixed precision,
``torch.compile`` and ``channels_last``.

The determinism and resume tests drive the toy job in ``tests/_hardening_run.py`` (SaflexBatchSampler +
SaflexDataset + DataLoader, a CNN with BatchNorm and dropout, AdamW + StepLR, a validation DataLoader).
"""

from __future__ import annotations

import gc
import os
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import saflex_data._math as saflex_math
from saflex_data import SaflexLoss, SaflexTarget
from tests import _hardening_run as job_module
from tests.conftest import SmallCNN

ROOT = Path(__file__).resolve().parents[1]
K = 4
METHODS = ["jvp", "last_layer", "single_pass"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _val(batches: int = 3, size: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 6, 6, generator=g, dtype=dtype), torch.randint(0, K, (size,), generator=g))
            for _ in range(batches)]


def _batch(batch: int = 128, seed: int = 1, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 6, 6, generator=g, dtype=dtype)
    y = torch.randint(0, K, (batch,), generator=g)
    return x, SaflexTarget(y, torch.arange(batch) >= batch // 4)


def _logits(criterion: SaflexLoss, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return criterion.forward_train(x) if criterion.method == "single_pass" else model(x)


def _decisions(criterion: SaflexLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, hard label) of every sample of the last step."""
    return criterion.last_step["weights"].clone(), criterion.last_step["targets"].argmax(-1)


def _tensors_held(obj: object) -> list[torch.Tensor]:
    out = []
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, dict):
            out.extend(v for v in value.values() if isinstance(v, torch.Tensor))
        elif isinstance(value, (tuple, list)):
            out.extend(v for v in value if isinstance(v, torch.Tensor))
    return out


# ---------------------------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------------------------
class TestDeterminism:
    @staticmethod
    def _run(method: str, num_workers: int) -> tuple[list, dict]:
        job = job_module.build(method, num_workers=num_workers)
        records = job_module.train(job, 0, 12)  # one epoch
        return records, {k: v.clone() for k, v in job["model"].state_dict().items()}

    @pytest.mark.parametrize("method", METHODS)
    def test_two_runs_are_bit_identical_with_0_and_2_workers(self, method):
        runs = [self._run(method, nw) for nw in (0, 0, 2, 2)]
        reference_records, reference_params = runs[0]
        assert len(reference_records) == 12
        # The job really makes decisions (not all weights 1 and all labels kept), so equality means something.
        assert any(bool((w != 1).any()) for w, _, _ in reference_records)
        for records, params in runs[1:]:
            for (w1, y1, l1), (w2, y2, l2) in zip(reference_records, records, strict=False):
                assert torch.equal(w1, w2) and torch.equal(y1, y2) and torch.equal(l1, l2)
            for name, value in reference_params.items():
                assert torch.equal(value, params[name]), name

    def test_collate_path_is_reproducible_for_a_fixed_number_of_workers(self):
        from saflex_data.collate import SaflexCollate

        train_set, val_set = job_module.data()

        def run(num_workers: int) -> list:
            torch.manual_seed(0)
            model = job_module.Net()
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            criterion = SaflexLoss(model, job_module.val_loader(val_set, shuffle=True), seed=3)
            loader = DataLoader(
                train_set, batch_size=8, shuffle=True, num_workers=num_workers,
                collate_fn=SaflexCollate(job_module.noise, p=0.5), generator=torch.Generator().manual_seed(5),
            )
            out = []
            for x, target in loader:
                loss = criterion(model(x), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                out.append((x, target.is_augmented, *_decisions(criterion)))
            return out

        for num_workers in (0, 2):
            first, second = run(num_workers), run(num_workers)
            assert len(first) == 12
            for a, b in zip(first, second, strict=False):
                assert all(torch.equal(u, v) for u, v in zip(a, b, strict=False))


# ---------------------------------------------------------------------------------------------------------------
# resume in a fresh process
# ---------------------------------------------------------------------------------------------------------------
def _job(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "tests._hardening_run", *args], cwd=ROOT, env=env, check=True, timeout=300)


def _assert_resumed_run_is_identical(out: Path) -> None:
    full = torch.load(out / "full.pt", weights_only=False)
    resumed = torch.load(out / "resume.pt", weights_only=False)
    assert set(resumed) == set(full)
    for method in resumed:
        expected = full[method]["records"][job_module.STOP:]
        got = resumed[method]["records"]
        assert len(got) == len(expected) == job_module.STEPS - job_module.STOP
        for step, ((w1, y1, l1), (w2, y2, l2)) in enumerate(zip(expected, got, strict=False), start=job_module.STOP):
            assert torch.equal(w1, w2) and torch.equal(y1, y2) and torch.equal(l1, l2), f"{method}: step {step}"
        for name, value in full[method]["final"]["model"].items():
            assert torch.equal(value, resumed[method]["final"]["model"][name]), f"{method}: {name}"
        a, b = full[method]["final"]["criterion"], resumed[method]["final"]["criterion"]
        assert a["step"] == b["step"] == job_module.STEPS and a["val_drawn"] == b["val_drawn"]
        assert torch.equal(a["generator"], b["generator"])


class TestResume:
    def test_resume_mid_epoch_in_a_fresh_process_is_identical(self, tmp_path):
        job_module.main(["full", str(tmp_path), "ordered"])  # uninterrupted, checkpointing mid-epoch
        _job("resume", str(tmp_path), "ordered")  # a fresh interpreter loads the checkpoint and finishes
        _assert_resumed_run_is_identical(tmp_path)

    def test_resume_with_a_shuffled_validation_loader(self, tmp_path):
        job_module.main(["full", str(tmp_path), "shuffle", "jvp"])
        _job("resume", str(tmp_path), "shuffle", "jvp")
        _assert_resumed_run_is_identical(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _live_tensors() -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() touches deprecated torch objects
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


class TestMemory:
    @pytest.mark.parametrize("method", METHODS)
    def test_criterion_keeps_no_graph_after_a_step(self, method):
        torch.manual_seed(0)
        model = SmallCNN(K)
        criterion = SaflexLoss(model, _val(), method=method)
        x, target = _batch(batch=16)
        criterion(_logits(criterion, model, x), target).backward()
        held = _tensors_held(criterion)
        assert held, "the criterion should at least keep last_step"
        assert not any(t.requires_grad or t.grad_fn is not None for t in held)

    @pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
    @pytest.mark.parametrize("method", METHODS)
    def test_1000_steps_do_not_grow_memory(self, method):
        # A fresh interpreter: the allocator state left by earlier tests in this process would be noise here.
        code = f"from tests.test_hardening import _memory_run; print(*_memory_run({method!r}))"
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
        early, late, tensors_early, tensors_late = map(int, out.stdout.split())
        assert late - early < 2 * 2**20, f"RSS grew by {(late - early) / 2**20:.2f} MiB over 700 steps"
        assert tensors_late <= tensors_early, f"live tensors grew from {tensors_early} to {tensors_late}"


def _memory_run(method: str) -> tuple[int, int, int, int]:
    """1,000 SAFLEX steps of a small MLP: median RSS of steps 200-300 and 900-1000, live tensors at 199 and 999."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, K))
    g = torch.Generator().manual_seed(0)
    val = [(torch.randn(32, 16, generator=g), torch.randint(0, K, (32,), generator=g)) for _ in range(7)]
    criterion = SaflexLoss(model, DataLoader(TensorDataset(*map(torch.cat, zip(*val, strict=False))), batch_size=32),
                           method=method)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs = torch.randn(10, 64, 16, generator=g)
    ys = torch.randint(0, K, (10, 64), generator=g)
    is_aug = torch.arange(64) >= 16
    rss, tensors = {}, {}
    for step in range(1000):
        x = xs[step % 10]
        target = SaflexTarget(ys[step % 10], is_aug, op=torch.where(is_aug, step % 3, -1))
        loss = criterion(_logits(criterion, model, x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if 200 <= step < 300 or 900 <= step < 1000:
            rss[step] = _rss_bytes()
        if step in (199, 999):  # counted outside the RSS windows: the scan itself allocates
            gc.collect()
            tensors[step] = _live_tensors()
    early = sorted(rss[s] for s in range(200, 300))[50]  # medians: robust to a transient allocation
    late = sorted(rss[s] for s in range(900, 1000))[50]
    return early, late, tensors[199], tensors[999]


# ---------------------------------------------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------------------------------------------
class TestMixedPrecision:
    @pytest.mark.parametrize("method", METHODS)
    def test_bf16_autocast_decides_like_float32_and_solves_in_float32(self, method, monkeypatch):
        solved_dtypes = []
        original = saflex_math.rule_targets

        def spy(pi, *args, **kwargs):
            solved_dtypes.append(pi.dtype)
            return original(pi, *args, **kwargs)

        monkeypatch.setattr(saflex_math, "rule_targets", spy)  # what Rule.decide calls
        x, target = _batch()
        decisions = {}
        for precision in ("float32", "bfloat16"):
            torch.manual_seed(0)
            model = SmallCNN(K)
            # a hard rule: decisions compared bit for bit (the gated default's soft weights follow float rounding)
            criterion = SaflexLoss(model, _val(), method=method, rule="margin")
            solved_dtypes.clear()  # the constructor validates its settings on a dummy problem
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                logits = _logits(criterion, model, x)
                loss = criterion(logits, target)
            assert logits.dtype == getattr(torch, precision)
            assert loss.dtype == torch.float32 and criterion.last_step["weights"].dtype == torch.float32
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())
            decisions[precision] = _decisions(criterion)
            assert solved_dtypes == [torch.float32]
        aug = target.is_augmented
        (w32, y32), (w16, y16) = decisions["float32"], decisions["bfloat16"]
        agree = ((w32 == w16) & (y32 == y16))[aug].float().mean().item()
        assert agree >= 0.95, f"only {agree:.1%} of the decisions agree"

    @pytest.mark.needs_cuda
    @pytest.mark.parametrize("method", METHODS)
    def test_fp16_autocast_with_grad_scaler_on_cuda(self, method):
        x, target = _batch()
        x = x.cuda()
        decisions = {}
        for precision in ("float32", "float16"):
            torch.manual_seed(0)
            model = SmallCNN(K).cuda()
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            scaler = torch.amp.GradScaler("cuda", enabled=precision == "float16")
            # a hard rule: decisions compared bit for bit (the gated default's soft weights follow float rounding)
            criterion = SaflexLoss(model, _val(), method=method, rule="margin")
            with torch.autocast("cuda", dtype=torch.float16, enabled=precision == "float16"):
                loss = criterion(_logits(criterion, model, x), target)
            assert loss.dtype == torch.float32
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            decisions[precision] = [t.cpu() for t in _decisions(criterion)]
        aug = target.is_augmented
        (w32, y32), (w16, y16) = decisions["float32"], decisions["float16"]
        assert ((w32 == w16) & (y32 == y16))[aug].float().mean().item() >= 0.95


# ---------------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------------
class _CompiledNet(SmallCNN):
    """Own class (own code object): dynamo caches are per code object, so other tests' compiles cannot interfere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_vs_eager(method: str, backend: str) -> None:
    x, target = _batch(batch=64)
    decisions, losses = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = _CompiledNet(K)
        net = torch.compile(model, backend=backend) if compiled else model
        # the compiled wrapper is unwrapped; a hard rule: decisions compared bit for bit
        criterion = SaflexLoss(net, _val(), method=method, rule="margin")
        for _step in range(2):  # the second step reuses the compiled graph
            loss = criterion(net(x), target)
            loss.backward()
        decisions.append(_decisions(criterion))
        losses.append(loss.detach())
    (w_eager, y_eager), (w_compiled, y_compiled) = decisions
    assert torch.equal(w_eager, w_compiled) and torch.equal(y_eager, y_compiled)
    torch.testing.assert_close(losses[0], losses[1])


class TestCompile:
    @pytest.mark.parametrize("method", ["jvp", "last_layer"])
    def test_compiled_model_decides_like_eager(self, method, fresh_dynamo):
        _compiled_vs_eager(method, backend="aot_eager")

    @pytest.mark.slow
    def test_compiled_model_with_inductor_decides_like_eager(self, fresh_dynamo):
        _compiled_vs_eager("last_layer", backend="inductor")

    def test_criterion_built_after_a_compiled_call_fails_loudly(self, fresh_dynamo):
        # torch.compile does not guard on hooks (torch._dynamo.config.skip_nnmodule_hook_guards): a graph compiled
        # before SaflexLoss registered its hook never calls it. The loss must then raise, never reuse stale features.
        torch.manual_seed(0)
        net = torch.compile(_CompiledNet(K), backend="aot_eager")
        x, target = _batch(batch=16)
        net(x)  # e.g. a sanity check before the training loop
        criterion = SaflexLoss(net, _val(), method="last_layer")
        with pytest.raises(RuntimeError, match="saw no forward of the classifier 'fc' since the previous loss call"):
            criterion(net(x), target)
        torch._dynamo.reset()  # the documented fix
        assert torch.isfinite(criterion(net(x), target))


# ---------------------------------------------------------------------------------------------------------------
# channels_last
# ---------------------------------------------------------------------------------------------------------------
def _float64_cnn(x: torch.Tensor, channels_last: bool):
    """A seeded float64 SmallCNN, the inputs and the validation ``prepare``, in channels_last or not."""
    torch.manual_seed(0)
    model = SmallCNN(K).double()
    if not channels_last:
        return model, x, None
    return (model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last),
            lambda v: v.contiguous(memory_format=torch.channels_last))


class TestChannelsLast:
    @pytest.mark.parametrize("method", METHODS)
    def test_channels_last_model_and_inputs(self, method):
        x, target = _batch(batch=32, dtype=torch.float64)
        results = []
        for channels_last in (False, True):
            model, inputs, prepare = _float64_cnn(x, channels_last)
            val = _val(dtype=torch.float64)
            # a hard rule: decisions compared bit for bit (the gated default's soft weights follow float rounding)
            criterion = SaflexLoss(model, val, method=method, prepare=prepare, rule="margin")
            loss = criterion(_logits(criterion, model, inputs), target)
            loss.backward()
            if channels_last:
                assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
            results.append((*_decisions(criterion), loss.detach(), model.conv.weight.grad.clone()))
        (w1, y1, l1, g1), (w2, y2, l2, g2) = results
        assert torch.equal(w1, w2) and torch.equal(y1, y2)
        torch.testing.assert_close(l1, l2, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# the gated default under bf16, channels_last and torch.compile: soft weights, compared with a stated tolerance
# ---------------------------------------------------------------------------------------------------------------
def _default_run(method: str, model: nn.Module, x: torch.Tensor, target: SaflexTarget, steps: int = 3, *,
                 val=None, prepare=None, autocast: torch.dtype | None = None) -> tuple[torch.Tensor, dict, list]:
    """``steps`` steps of the default SaflexLoss (rule gated_prior): the last weights, the gate's state, the losses."""
    criterion = SaflexLoss(model, _val() if val is None else val, method=method, prepare=prepare)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = criterion(_logits(criterion, model, x), target)
        assert loss.dtype == x.dtype if x.dtype == torch.float64 else loss.dtype == torch.float32
        loss.backward()
        losses.append(loss.detach())
    assert criterion.rule.name == "gated_prior"
    return criterion.last_step["weights"].clone(), {k: v.clone() for k, v in criterion.rule_state.items()}, losses


class TestGatedDefault:
    @pytest.mark.parametrize("method", METHODS)
    def test_bf16_autocast_weights_follow_float32(self, method):
        """The weights are p[y] of the bf16 logits (about 3 significant digits): within 0.03 of float32's; the
        gate's state stays float32 and decides alike."""
        x, target = _batch()
        runs = {}
        for precision in (None, torch.bfloat16):
            torch.manual_seed(0)
            runs[precision] = _default_run(method, SmallCNN(K), x, target, autocast=precision)
        (w32, s32, _), (w16, s16, _) = runs[None], runs[torch.bfloat16]
        assert w16.dtype == torch.float32 and all(v.dtype == torch.float32 for v in s16.values())
        assert bool((w16[~target.is_augmented] == 1).all()) and float(w16.min()) < 1  # soft weights, aug rows only
        torch.testing.assert_close(w16, w32, rtol=0, atol=3e-2)
        assert float(s16["strength"]) == float(s32["strength"])

    @pytest.mark.parametrize("method", METHODS)
    def test_channels_last_float64_weights_and_state_agree(self, method):
        x, target = _batch(batch=32, dtype=torch.float64)
        runs = []
        for channels_last in (False, True):
            model, inputs, prepare = _float64_cnn(x, channels_last)
            runs.append(_default_run(method, model, inputs, target, val=_val(dtype=torch.float64), prepare=prepare))
        (w1, s1, l1), (w2, s2, l2) = runs
        torch.testing.assert_close(w1, w2, rtol=1e-10, atol=1e-12)  # float64: other kernels, the same numbers
        torch.testing.assert_close(torch.stack(l1), torch.stack(l2), rtol=1e-10, atol=1e-12)
        for k in s1:  # the gate's state is float32 (its own precision), fed with float64 gains
            torch.testing.assert_close(s1[k], s2[k], rtol=1e-6, atol=1e-7)

    @pytest.mark.parametrize("method", ["jvp", "last_layer"])
    def test_compiled_model_weights_follow_eager(self, method, fresh_dynamo):
        x, target = _batch(batch=64)
        runs = []
        for compiled in (False, True):
            torch.manual_seed(0)
            model = _CompiledNet(K)
            net = torch.compile(model, backend="aot_eager") if compiled else model
            runs.append(_default_run(method, net, x, target, steps=2))
        (w1, s1, l1), (w2, s2, l2) = runs
        torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-6)  # float32 rounding of the compiled graph
        torch.testing.assert_close(torch.stack(l1), torch.stack(l2), rtol=1e-5, atol=1e-6)
        assert float(s1["strength"]) == float(s2["strength"])
