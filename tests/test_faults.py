"""Fault matrix of ``SaflexLoss``: what a long training job sees when something upstream goes wrong.

Two promises are checked for every fault: the call never hangs, and the loss never silently trains on garbage.
Each case says which of the documented behaviours (docs/failure_modes.md) applies:

* **propagate** — non-finite logits give the loss exactly the non-finite value ``F.cross_entropy`` would give, so
  ``GradScaler`` step skipping and the loop's own NaN guards work unchanged; the criterion's state is not harmed;
* **fallback** — non-finite ``Π`` (NaN/inf in the inputs, the validation gradient or the logits' tangent): the
  augmented samples keep their upstream labels with weight 1, one ``RuntimeWarning``, counted in
  ``stats["nonfinite_steps"]``; nothing non-finite is cached, so the next good step decides normally;
* **raise** — configuration or data bugs that would otherwise train on garbage (wrong ``K``, NaN labels, a frozen
  head for ``last_layer``, several heads, an empty validation stream) raise a ``ValueError``/``TypeError`` at the
  first step, with the argument and the fix in the message, and leave model and criterion usable;
* **exact** — degenerate but valid batches (no augmented sample, only augmented samples, ``K=2``) work.

Every case documents the behaviour the "Failure modes" table (docs/failure_modes.md) promises.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import saflex_data.functional as SF
from saflex_data import SaflexLoss, SaflexTarget
from tests.conftest import SmallCNN, make_model

K = 4
METHODS = ["jvp", "last_layer", "single_pass"]
RULES = ["paper", "centered", "margin", "margin_relabel"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _val(batches: int = 3, size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 6, 6, generator=g), torch.randint(0, K, (size,), generator=g))
            for _ in range(batches)]


def _batch(seed: int = 1, batch: int = 10, n_aug: int = 5) -> tuple[torch.Tensor, SaflexTarget]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 6, 6, generator=g)
    y = torch.randint(0, K, (batch,), generator=g)
    return x, SaflexTarget(y, torch.arange(batch) >= batch - n_aug)


def _model(batchnorm: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(K, batchnorm=batchnorm).train()


def _logits(criterion: SaflexLoss, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return criterion.forward_train(x) if criterion.method == "single_pass" else model(x)


def _step(criterion: SaflexLoss, model: nn.Module, x: torch.Tensor, target: SaflexTarget) -> torch.Tensor:
    return criterion(_logits(criterion, model, x), target)


class _TwoHeads(nn.Module):
    """A model with a main and an auxiliary head, returning both (Inception/DeiT-distilled style)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU())
        self.head = nn.Linear(16, K)
        self.aux = nn.Linear(16, K)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.head(h), self.aux(h)


class _FirstOutput(nn.Module):
    """The documented fix for several heads: a wrapper that returns the logits the loss is given."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


# ---------------------------------------------------------------------------------------------------------------
# NaN / inf in the batch, the logits, the validation gradient
# ---------------------------------------------------------------------------------------------------------------
class TestNonFinite:
    @pytest.mark.parametrize("method", METHODS)
    @pytest.mark.parametrize("value", [float("nan"), float("inf")])
    def test_nonfinite_augmented_input_falls_back_and_propagates_like_plain_ce(self, method, value):
        model = _model()
        criterion = SaflexLoss(model, _val(), method=method)
        _step(criterion, model, *_batch(seed=9))  # a good first step (see the last_layer first-step case below)
        x, target = _batch()
        x[7, 0, 2, 2] = value  # an augmented row
        with pytest.warns(RuntimeWarning, match="non-finite inner products"):
            logits = _logits(criterion, model, x)
            loss = criterion(logits, target)
        plain = F.cross_entropy(logits, target.labels)
        assert not torch.isfinite(plain)
        assert torch.isnan(loss) == torch.isnan(plain) and not torch.isfinite(loss)  # propagated, not hidden
        assert criterion.stats["nonfinite_steps"] == 1
        assert torch.equal(criterion.last_step["weights"], torch.ones(10))
        assert torch.equal(criterion.last_step["targets"], F.one_hot(target.labels, K).float())

    @pytest.mark.parametrize("method", ["jvp", "single_pass"])
    def test_nonfinite_clean_row_keeps_decisions_of_the_augmented_rows(self, method):
        # Without BatchNorm a bad clean row does not touch the augmented rows: SAFLEX still decides for them, and the
        # loss is NaN exactly as plain cross-entropy is.
        model = _model()
        x, target = _batch()
        reference = SaflexLoss(model, _val(), method=method)
        _step(reference, model, x, target)
        x_bad = x.clone()
        x_bad[0, 0, 0, 0] = float("nan")
        criterion = SaflexLoss(model, _val(), method=method)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback: the augmented rows are finite
            loss = _step(criterion, model, x_bad, target)
        assert torch.isnan(loss)
        assert criterion.stats["nonfinite_steps"] == 0
        aug = target.is_augmented
        assert torch.equal(criterion.last_step["weights"][aug], reference.last_step["weights"][aug])
        assert torch.equal(criterion.last_step["targets"][aug], reference.last_step["targets"][aug])

    @pytest.mark.parametrize("method", METHODS)
    def test_a_nonfinite_step_does_not_harm_the_next_one(self, method):
        # (No BatchNorm here: a NaN batch in train mode poisons the model's own running statistics, as it would
        # with plain cross-entropy; that is the model's state, not the criterion's.)
        model = _model()
        x, target = _batch(seed=6)
        x_bad, target_bad = _batch(seed=5)
        x_bad[6] = float("nan")
        fresh = SaflexLoss(model, _val(), method=method, val_every=3)
        for _ in range(2):
            _step(fresh, model, x, target)
        criterion = SaflexLoss(model, _val(), method=method, val_every=3)
        _step(criterion, model, x, target)
        with pytest.warns(RuntimeWarning):
            assert torch.isnan(_step(criterion, model, x_bad, target_bad))
        loss = _step(criterion, model, x, target)  # reuses the (finite) validation gradient of step 0
        assert torch.isfinite(loss)
        assert criterion.stats["nonfinite_steps"] == 1
        assert torch.equal(criterion.last_step["weights"], fresh.last_step["weights"])
        assert torch.equal(criterion.last_step["targets"], fresh.last_step["targets"])

    @pytest.mark.parametrize("method", ["jvp", "single_pass"])
    def test_overflowing_logits_give_the_plain_ce_value(self, method):
        model = _model()
        with torch.no_grad():
            model.fc.weight.mul_(1e38)  # finite weights whose logits overflow to +-inf
        criterion = SaflexLoss(model, _val(), method=method)
        x, target = _batch()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            logits = _logits(criterion, model, x * 100)
            loss = criterion(logits, target)
        plain = F.cross_entropy(logits, target.labels)
        assert torch.isinf(logits).any() and not torch.isfinite(plain)
        assert not torch.isfinite(loss)
        assert criterion.step == 1  # the step is counted; the caller's NaN guard / GradScaler decides what to do

    def test_last_layer_first_step_with_nan_logits_falls_back(self):
        model = _model()
        criterion = SaflexLoss(model, _val(), method="last_layer")
        x, target = _batch()
        x[7, 0, 0, 0] = float("nan")
        with pytest.warns(RuntimeWarning, match="non-finite inner products"):
            loss = criterion(model(x), target)
        assert torch.isnan(loss) and criterion.stats["nonfinite_steps"] == 1

    def test_last_layer_later_step_with_nan_logits_falls_back(self):
        model = _model()
        criterion = SaflexLoss(model, _val(), method="last_layer")
        _step(criterion, model, *_batch(seed=3))
        x, target = _batch()
        x[7, 0, 0, 0] = float("nan")
        with pytest.warns(RuntimeWarning, match="non-finite inner products"):
            loss = criterion(model(x), target)
        assert torch.isnan(loss) and criterion.stats["nonfinite_steps"] == 1

    def test_nan_soft_labels_raise(self):
        model = _model()
        criterion = SaflexLoss(model, _val())
        x, target = _batch()
        labels = F.one_hot(target.labels, K).float()
        labels[6, 0] = float("nan")
        with pytest.raises(ValueError, match="target labels given as probabilities must be non-negative and sum to 1"):
            criterion(model(x), SaflexTarget(labels, target.is_augmented))

    @pytest.mark.parametrize("method", ["jvp", "last_layer"])
    def test_nonfinite_validation_gradient_recovers_at_the_next_refresh(self, method):
        model = _model()
        val = _val(batches=2)
        val[0][0][3] = float("inf")  # the first validation batch is bad, the second good
        criterion = SaflexLoss(model, val, method=method, val_every=2)
        counts = []
        with pytest.warns(RuntimeWarning):
            for step in range(6):
                x, target = _batch(seed=step)
                assert torch.isfinite(_step(criterion, model, x, target))
                counts.append(criterion.stats["nonfinite_steps"])
        # Refreshes alternate bad/good batches: only the bad batch's steps fall back (at most val_every each).
        assert counts[0] == 1 and counts[-1] <= 4
        assert any(a == b for a, b in zip(counts, counts[1:], strict=False))  # the good batch's steps decide

    def test_nonfinite_validation_gradient_does_not_poison_the_ema(self):
        model = _model()
        val = _val(batches=3)
        val[1][0][0] = float("nan")  # one bad validation batch out of three
        criterion = SaflexLoss(model, val, val_ema=0.5)
        with pytest.warns(RuntimeWarning):
            for step in range(9):
                x, target = _batch(seed=step)
                criterion(model(x), target)
        assert criterion.stats["nonfinite_steps"] <= 3  # the bad batch is seen 3 times in 9 steps; the rest decide


# ---------------------------------------------------------------------------------------------------------------
# the validation loader
# ---------------------------------------------------------------------------------------------------------------
class _Boom(RuntimeError):
    pass


class _RaisingDataset(Dataset):
    def __init__(self, bad: int) -> None:
        self.x, self.y = _val(batches=1, size=16)[0]
        self.bad = bad

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        if i == self.bad:
            raise _Boom(f"corrupt validation sample {i}")
        return self.x[i], self.y[i]


class TestValidationLoader:
    def test_raising_loader_propagates_and_leaves_everything_usable(self):
        model = _model(batchnorm=True)
        good = _val(batches=2)

        class Flaky:
            calls = 0

            def __iter__(self):
                Flaky.calls += 1
                yield good[0]
                if Flaky.calls == 1:
                    raise _Boom("network storage hiccup")
                yield good[1]

        criterion = SaflexLoss(model, Flaky())
        x, target = _batch()
        criterion(model(x), target)
        with pytest.raises(_Boom, match="network storage hiccup"):
            criterion(model(x), target)
        assert model.training and criterion.step == 1
        assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        loss = criterion(model(x), target)  # the stream restarts; the job can go on if the caller chooses to
        assert torch.isfinite(loss) and criterion.step == 2

    def test_validation_forward_that_raises_restores_the_model(self):
        model = _model(batchnorm=True)
        bad = (torch.randn(4, 3, 6, 6), torch.zeros(4, dtype=torch.long))  # 3 channels for a 1-channel model
        criterion = SaflexLoss(model, [bad] + _val(batches=1))
        x, target = _batch()
        with pytest.raises(RuntimeError, match="channels"):
            criterion(model(x), target)
        assert model.training
        assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        assert torch.isfinite(criterion(model(x), target))  # hooks still capture (not stuck in "own pass" mode)

    @pytest.mark.timeout(60)
    def test_dataloader_worker_error_propagates_without_hanging(self):
        model = _model()
        loader = DataLoader(_RaisingDataset(bad=3), batch_size=8, num_workers=2)
        criterion = SaflexLoss(model, loader)
        x, target = _batch()
        with pytest.raises(_Boom, match="corrupt validation sample 3"):
            criterion(model(x), target)

    @pytest.mark.parametrize(
        "loader",
        [
            pytest.param(DataLoader(TensorDataset(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long))),
                         id="empty-dataset"),
            pytest.param(DataLoader(TensorDataset(torch.zeros(5, 1, 6, 6), torch.zeros(5, dtype=torch.long)),
                                    batch_size=8, drop_last=True), id="shorter-than-a-batch-drop-last"),
            pytest.param((b for b in []), id="empty-generator"),
        ],
    )
    def test_empty_validation_stream_raises_at_the_first_step(self, loader):
        model = _model()
        criterion = SaflexLoss(model, loader)
        x, target = _batch()
        with pytest.raises(ValueError, match="val_loader yielded no batches.*drop_last=True"):
            criterion(model(x), target)
        assert criterion.step == 0

    def test_validation_set_shorter_than_one_batch_is_cycled(self):
        model = _model()
        x_val, y_val = _val(batches=1, size=5)[0]
        loader = DataLoader(TensorDataset(x_val, y_val), batch_size=8)  # one short batch of 5
        criterion = SaflexLoss(model, loader, method="jvp")
        reference = SF.validation_gradient(model.eval(), x_val, y_val, temperature=criterion.val_temperature)
        model.train()
        for step in range(3):
            x, target = _batch(seed=step)
            assert torch.isfinite(criterion(model(x), target))
        assert criterion._val.drawn == 3
        for name, grad in criterion._signal.items():
            torch.testing.assert_close(grad, reference[name])

    def test_validation_targets_of_another_label_space_raise(self):
        model = _model()
        soft = torch.full((4, K + 1), 1.0 / (K + 1))
        criterion = SaflexLoss(model, [(torch.randn(4, 1, 6, 6), soft)])
        x, target = _batch()
        with pytest.raises(ValueError, match=r"targets given as probabilities must have shape \(4, 4\)"):
            criterion(model(x), target)


# ---------------------------------------------------------------------------------------------------------------
# degenerate batches
# ---------------------------------------------------------------------------------------------------------------
class TestDegenerateBatches:
    @pytest.mark.parametrize("method", METHODS)
    def test_no_augmented_sample_is_plain_ce_and_costs_no_validation_pass(self, method):
        model = _model()
        val = _val()
        criterion = SaflexLoss(model, val, method=method)
        x, target = _batch(n_aug=0)
        logits = _logits(criterion, model, x)
        loss = criterion(logits, target)
        torch.testing.assert_close(loss, F.cross_entropy(logits, target.labels))
        assert criterion.step == 1 and criterion.stats["augmented_fraction"] == 0.0
        # The JVP methods count the augmented rows on the host (their one synchronisation) before the validation
        # pass; last_layer never reads the tags on the host, so its (cheap) validation pass runs; single_pass needs
        # the signal for its forward, before the tags are known.
        assert criterion._val.drawn == (0 if method in ("jvp", "jvp_frozen_stats") else 1)
        loss.backward()

    @pytest.mark.parametrize("method", METHODS)
    @pytest.mark.parametrize("rule", RULES)
    @pytest.mark.parametrize("batch", [1, 7])
    def test_only_augmented_samples(self, method, rule, batch):
        model = _model()
        criterion = SaflexLoss(model, _val(), method=method, rule=rule)
        x, target = _batch(batch=batch, n_aug=batch)
        loss = _step(criterion, model, x, target)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        weights, targets = criterion.last_step["weights"], criterion.last_step["targets"]
        assert set(weights.tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(targets.sum(-1), torch.ones(batch))
        assert criterion.stats["augmented_fraction"] == 1.0

    def test_binary_classification_works(self):
        torch.manual_seed(0)
        model = SmallCNN(2)
        g = torch.Generator().manual_seed(0)
        val = [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 2, (8,), generator=g))]
        criterion = SaflexLoss(model, val, method="jvp")
        x = torch.randn(6, 1, 6, 6, generator=g)
        target = SaflexTarget(torch.randint(0, 2, (6,), generator=g), torch.arange(6) >= 3)
        loss = criterion(model(x), target)
        assert torch.isfinite(loss) and criterion.last_step["targets"].shape == (6, 2)

    def test_single_output_model_raises_before_any_validation_pass(self):
        torch.manual_seed(0)
        model = SmallCNN(1)
        criterion = SaflexLoss(model, _val())
        x, target = _batch()
        with pytest.raises(ValueError, match=r"at least 2 classes for SAFLEX, but got shape \(10, 1\)"):
            criterion(model(x), SaflexTarget(torch.zeros(10, dtype=torch.long), target.is_augmented))
        assert criterion._val.drawn == 0

    def test_soft_targets_of_another_label_space_raise(self):
        model = _model()
        criterion = SaflexLoss(model, _val())
        x, target = _batch()
        soft = torch.full((10, K + 1), 1.0 / (K + 1))
        with pytest.raises(ValueError, match=r"target labels given as probabilities must have shape \(10, 4\)"):
            criterion(model(x), SaflexTarget(soft, target.is_augmented))

    def test_float_class_indices_raise(self):
        model = _model()
        criterion = SaflexLoss(model, _val())
        x, target = _batch()
        with pytest.raises(ValueError, match=r"target labels must be class indices of shape \(10,\) \(int\)"):
            criterion(model(x), SaflexTarget(target.labels.float(), target.is_augmented))


class TestBatchNormInTrainMode:
    def test_a_single_augmented_row_with_batchnorm1d(self):
        model = make_model("mlp_bn", K, dtype=torch.float32).train()
        g = torch.Generator().manual_seed(0)
        val = [(torch.randn(8, 5, generator=g), torch.randint(0, K, (8,), generator=g))]
        criterion = SaflexLoss(model, val, method="jvp")
        x = torch.randn(10, 5, generator=g)
        target = SaflexTarget(torch.randint(0, K, (10,), generator=g), torch.arange(10) == 9)
        assert torch.isfinite(criterion(model(x), target))

    def test_jvp_matches_the_exact_single_pass_with_batchnorm_in_train_mode(self):
        g = torch.Generator().manual_seed(0)
        val = [(torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, K, (8,), generator=g))]
        x = torch.randn(12, 5, generator=g, dtype=torch.float64)
        target = SaflexTarget(torch.randint(0, K, (12,), generator=g), torch.arange(12) >= 6)
        decisions = {}
        for method in ("jvp", "single_pass"):
            model = make_model("mlp_bn", K).train()
            # momentum 0: the running statistics the validation pass uses stay put, whatever the order of the passes.
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.momentum = 0.0
            # tau=1: the soft labels are a smooth function of Π (same Gumbel draws), so they compare Π itself.
            criterion = SaflexLoss(model, val, method=method, rule=SF.Rule("paper", tau=1.0, normalize="none"))
            _step(criterion, model, x, target)
            decisions[method] = (criterion.last_step["weights"], criterion.last_step["targets"])
        assert torch.equal(decisions["jvp"][0], decisions["single_pass"][0])
        torch.testing.assert_close(decisions["jvp"][1], decisions["single_pass"][1], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# frozen parameters
# ---------------------------------------------------------------------------------------------------------------
class TestFrozenParameters:
    @pytest.mark.parametrize("method", ["jvp", "single_pass"])
    def test_only_trainable_parameters_count(self, method):
        model = _model()
        model.conv.requires_grad_(False)
        val = _val(batches=1)
        criterion = SaflexLoss(model, val, method=method, rule=SF.Rule("paper", tau=None, normalize="none"))
        x, target = _batch()
        _step(criterion, model, x, target)
        assert set(criterion._signal) == {"fc.weight", "fc.bias"}
        # Reference: Π over the trainable parameters only; it differs from Π over all parameters.
        model.eval()
        trainable = SF.validation_gradient(model, *val[0])
        model.conv.requires_grad_(True)
        everything = SF.validation_gradient(model, *val[0])
        model.train()
        aug = target.is_augmented
        pi_trainable = SF.grad_inner_products(model, x[aug], trainable)
        pi_all = SF.grad_inner_products(model, x[aug], everything)
        w, y = SF.saflex_targets(pi_trainable, target.labels[aug], tau=None, normalize="none", rule="paper")
        assert torch.equal(criterion.last_step["weights"][aug], w)
        assert torch.equal(criterion.last_step["targets"][aug], y)
        assert not torch.allclose(pi_trainable, pi_all)

    def test_unfreezing_mid_run_without_ema(self):
        model = _model()
        model.conv.requires_grad_(False)
        criterion = SaflexLoss(model, _val(), method="jvp", val_every=2)
        for step in range(4):
            if step == 1:
                model.conv.requires_grad_(True)  # a backbone unfrozen after a warm-up
            x, target = _batch(seed=step)
            assert torch.isfinite(criterion(model(x), target))
        assert "conv.weight" in criterion._signal

    def test_unfreezing_mid_run_with_ema(self):
        model = _model()
        model.conv.requires_grad_(False)
        criterion = SaflexLoss(model, _val(), method="jvp", val_ema=0.9)
        for step in range(3):
            if step == 1:
                model.conv.requires_grad_(True)
            x, target = _batch(seed=step)
            assert torch.isfinite(criterion(model(x), target))

    def test_last_layer_with_a_frozen_classifier_raises(self):
        model = _model()
        model.fc.requires_grad_(False)
        criterion = SaflexLoss(model, _val(), method="last_layer")
        x, target = _batch()
        with pytest.raises(ValueError, match="trainable classifier.*method='jvp'"):
            criterion(model(x), target)

    @pytest.mark.parametrize("case", ["frozen_bias", "no_bias"])
    def test_last_layer_counts_the_bias_only_when_trainable(self, case):
        model = _model()
        if case == "no_bias":
            model.fc = nn.Linear(24, K, bias=False)
        else:
            model.fc.bias.requires_grad_(False)
        val = _val(batches=1)
        criterion = SaflexLoss(model, val, method="last_layer", rule=SF.Rule("paper", tau=None, normalize="none"))
        x, target = _batch()
        criterion(model(x), target)
        model.eval()
        grads = SF.validation_gradient(model, *val[0])
        model.train()
        aug = target.is_augmented
        pi = SF.grad_inner_products(model, x[aug], grads, method="last_layer")
        w, y = SF.saflex_targets(pi, target.labels[aug], tau=None, normalize="none", rule="paper")
        assert torch.equal(criterion.last_step["weights"][aug], w)
        assert torch.equal(criterion.last_step["targets"][aug], y)


# ---------------------------------------------------------------------------------------------------------------
# several heads
# ---------------------------------------------------------------------------------------------------------------
class TestSeveralHeads:
    @pytest.mark.parametrize("method", METHODS)
    def test_tuple_output_raises_at_the_first_step(self, method):
        model = _TwoHeads()
        criterion = SaflexLoss(model, _val(), method=method)
        x, target = _batch()
        with pytest.raises(ValueError, match=r"must be a float tensor of shape \(B, K\), but got <class 'tuple'>"):
            out = _logits(criterion, model, x)
            criterion(out[0], target)
        assert criterion.step == 0

    def test_last_layer_with_the_wrong_head_raises(self):
        model = _FirstOutput(_TwoHeads())
        criterion = SaflexLoss(model, _val(), method="last_layer")  # picks the last nn.Linear: model.aux
        x, target = _batch()
        with pytest.raises(RuntimeError, match="not the output of any of the last 1 forwards of the classifier "
                           "'model.aux'.*classifier="):
            criterion(model(x), target)

    def test_last_layer_with_the_head_named_works(self):
        model = _FirstOutput(_TwoHeads())
        criterion = SaflexLoss(model, _val(), method="last_layer", classifier="model.head")
        x, target = _batch()
        assert torch.isfinite(criterion(model(x), target))

    @pytest.mark.parametrize("method", ["jvp", "single_pass"])
    def test_a_wrapper_returning_the_logits_works(self, method):
        model = _FirstOutput(_TwoHeads())
        criterion = SaflexLoss(model, _val(), method=method)
        x, target = _batch()
        assert torch.isfinite(_step(criterion, model, x, target))
        assert "model.aux.weight" in criterion._signal  # unused head: zero gradient, harmless
        assert torch.count_nonzero(criterion._signal["model.aux.weight"]) == 0


# ---------------------------------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------------------------------
class TestDevices:
    def test_target_on_a_device_without_data_raises(self):
        model = _model()
        criterion = SaflexLoss(model, _val())
        x, target = _batch()
        with pytest.raises(NotImplementedError, match="meta"):
            criterion(model(x), target.to("meta"))
        assert criterion.step == 0

    @pytest.mark.needs_cuda
    @pytest.mark.parametrize("method", METHODS)
    def test_cpu_target_for_cuda_logits_is_moved_and_decides_the_same(self, method):
        x, target = _batch()
        results = []
        for device in ("cpu", "cuda"):
            model = _model().double().to(device)
            val = [(vx.double(), vy) for vx, vy in _val()]  # left on the CPU: moved by the loss
            criterion = SaflexLoss(model, val, method=method)
            loss = _step(criterion, model, x.double().to(device), target)  # target left on the CPU
            assert loss.device.type == device
            results.append({k: v.cpu() for k, v in criterion.last_step.items()})
        assert torch.equal(results[0]["weights"], results[1]["weights"])
        assert torch.equal(results[0]["targets"].argmax(1), results[1]["targets"].argmax(1))


# ---------------------------------------------------------------------------------------------------------------
# references kept across steps
# ---------------------------------------------------------------------------------------------------------------
def test_a_forward_without_a_loss_call_keeps_no_graph_alive():
    model = _model()
    criterion = SaflexLoss(model, _val(), method="last_layer")  # its hooks see the forward
    x, _ = _batch()
    logits = model(x)
    assert criterion._method.captures  # the forward is remembered, detached
    ref = weakref.ref(logits)
    del logits
    gc.collect()
    assert ref() is None
