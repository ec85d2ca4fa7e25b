"""The JVP with train-mode BatchNorm: the exact whole-batch Π, and the fixed-statistics Π of a subset of the batch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from saflex_data import SaflexLoss, SaflexTarget
from saflex_data import functional as SF

from ._reference import reference_inner_products, reference_validation_gradient
from .conftest import DTYPE_PRECISIONS, make_inputs, make_model


def _reference_fixed_stats(model: nn.Module, inputs: torch.Tensor, rows: torch.Tensor, val_grad: dict) -> torch.Tensor:
    """Π of ``inputs[rows]`` in float64 by per-sample autograd, with every train-mode BatchNorm normalising with the
    whole ``inputs`` batch's mean and biased variance as constants (eval mode with those as running statistics)."""
    clone = copy.deepcopy(model)
    bns = {n: m for n, m in clone.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            mean = x.mean(dims)
            shape = [1, -1] + [1] * (x.dim() - 2)
            seen[name] = (mean, ((x - mean.view(shape)) ** 2).mean(dims))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in bns.items()]
    with torch.no_grad():
        clone(inputs)
    for h in handles:
        h.remove()
    for n, m in bns.items():
        m.eval()
        m.running_mean.copy_(seen[n][0])
        m.running_var.copy_(seen[n][1])
    return reference_inner_products(clone, inputs[rows], val_grad)


def _setup(kind: str, batch: int = 10):
    model = make_model(kind).train()
    x = make_inputs(kind, batch)
    xv, yv = make_inputs(kind, 7, seed=2), torch.arange(7) % 4
    model.eval()
    g = reference_validation_gradient(model, xv, yv)
    model.train()
    return model, x, g


class TestExactJvp:
    @pytest.mark.parametrize("kind", ["mlp_bn", "cnn"])
    def test_whole_batch_jvp_of_a_subset_matches_reference(self, kind):
        model, x, g = _setup(kind)
        rows = torch.arange(4, 10)
        got = SF.grad_inner_products(model, x, g, method="jvp")[rows]
        expected = reference_inner_products(model, x, g)[rows]
        torch.testing.assert_close(got, expected, rtol=DTYPE_PRECISIONS[torch.float64][0],
                                   atol=DTYPE_PRECISIONS[torch.float64][1])


class TestFixedBatchStats:
    @pytest.mark.parametrize("kind", ["mlp_bn", "cnn"])
    @pytest.mark.parametrize("rows", [[9], [4, 5, 6, 7, 8, 9], list(range(10))])
    def test_matches_float64_reference(self, kind, rows):
        model, x, g = _setup(kind)
        rows = torch.tensor(rows)
        capture = SF.BatchStatsCapture(model)
        model(x)  # the training forward records the statistics
        stats = capture.pop()
        capture.remove()
        got = SF.grad_inner_products(model, x[rows], g, method="jvp", batch_stats=stats)
        expected = _reference_fixed_stats(model, x, rows, g)
        rtol, atol = DTYPE_PRECISIONS[torch.float64]
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)

    def test_is_a_different_quantity_from_the_exact_pi(self):
        # The exact Π of a train-mode BatchNorm batch carries the tangent of the batch statistics.
        model, x, g = _setup("cnn")
        capture = SF.BatchStatsCapture(model)
        model(x)
        fixed = SF.grad_inner_products(model, x, g, method="jvp", batch_stats=capture.pop())
        exact = SF.grad_inner_products(model, x, g, method="jvp")
        assert (fixed - exact).abs().max() > 1e-3 * exact.abs().max()

    def test_without_batchnorm_equals_the_exact_pi(self):
        model, x, g = _setup("mlp")
        capture = SF.BatchStatsCapture(model)
        model(x)
        stats = capture.pop()
        assert stats == {} and capture.handles == []
        rows = torch.arange(3, 10)
        got = SF.grad_inner_products(model, x[rows], g, method="jvp", batch_stats=stats)
        torch.testing.assert_close(got, SF.grad_inner_products(model, x, g, method="jvp")[rows], rtol=1e-12, atol=1e-14)

    def test_eval_mode_batchnorm_needs_no_statistics(self):
        model, x, g = _setup("cnn")
        model.eval()
        got = SF.grad_inner_products(model, x[3:], g, method="jvp", batch_stats={})
        torch.testing.assert_close(got, reference_inner_products(model, x, g)[3:], rtol=1e-10, atol=1e-12)

    def test_capture_and_jvp_leave_the_model_alone(self):
        model, x, g = _setup("cnn")
        capture = SF.BatchStatsCapture(model)
        model(x)
        before = copy.deepcopy(model.state_dict())
        SF.grad_inner_products(model, x[5:], g, method="jvp", batch_stats=capture.pop())
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert "forward" not in model.bn.__dict__ and model.training and model.bn.track_running_stats
        capture.remove()
        model(x)
        assert capture.stats == {}

    def test_skip_pauses_the_capture(self):
        model, x, _ = _setup("cnn")
        paused = [True]
        capture = SF.BatchStatsCapture(model, skip=lambda: paused[0])
        model(x)
        assert capture.stats == {} and capture.batch_size is None
        paused[0] = False
        model(x[:4])
        assert capture.batch_size == 4 and set(capture.stats) == {"bn"}

    def test_missing_statistics(self):
        model, x, g = _setup("cnn")
        with pytest.raises(ValueError, match="batch_stats has no entry for the BatchNorm 'bn'"):
            SF.grad_inner_products(model, x, g, method="jvp", batch_stats={})
        assert "forward" not in model.bn.__dict__

    def test_batch_stats_only_with_jvp(self):
        model, x, g = _setup("cnn")
        with pytest.raises(ValueError, match="batch_stats is for method='jvp' only"):
            SF.grad_inner_products(model, x, g, method="last_layer", batch_stats={})


class TestSaflexLossFrozenStats:
    def _loss(self, method):
        model = make_model("cnn").train()
        x = make_inputs("cnn", 10)
        y = torch.arange(10) % 4
        val = [(make_inputs("cnn", 7, seed=2), torch.arange(7) % 4)]
        crit = SaflexLoss(model, val, method=method, val_temperature=1.0, rule="margin")  # one Π call per step
        target = SaflexTarget(y, torch.arange(10) >= 4)
        return model, x, y, val, crit, target

    def test_uses_the_fixed_statistics_pi(self):
        model, x, y, val, crit, target = self._loss("jvp_frozen_stats")
        seen = {}
        original = crit._method.inner_products

        def spy(*args):
            seen["pi"] = original(*args)
            return seen["pi"]

        crit._method.inner_products = spy
        logits = model(x)
        reference_model = copy.deepcopy(model)  # after the step's running-statistics update, which g sees
        loss = crit(logits, target)
        loss.backward()
        reference_model.eval()
        g = reference_validation_gradient(reference_model, *val[0])
        reference_model.train()
        expected = _reference_fixed_stats(reference_model, x, torch.arange(4, 10), g)
        torch.testing.assert_close(seen["pi"][4:], expected, rtol=1e-10, atol=1e-12)  # the augmented rows

    def test_statistics_belong_to_the_forward_of_the_logits(self):
        model, x, y, val, crit, target = self._loss("jvp_frozen_stats")
        logits = model(x)
        model(x[:6])  # another forward in between: its statistics are its own
        first, second = crit._method.captures
        assert first["output"].shape[0] == 10 and second["output"].shape[0] == 6
        assert not torch.equal(first["bn_stats"]["bn"][0], second["bn_stats"]["bn"][0])
        assert torch.isfinite(crit(logits, target))

    def test_remove_hooks_removes_the_capture(self):
        model, x, y, val, crit, target = self._loss("jvp_frozen_stats")
        crit.remove_hooks()
        model(x)
        assert crit._method.captures == [] and crit._method.bn_stats == {}
