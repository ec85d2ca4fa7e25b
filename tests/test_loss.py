"""SaflexLoss: the criterion a training loop calls as ``loss = criterion(logits, target)``."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saflex_data.functional as SF
from saflex_data import SaflexLoss, SaflexTarget
from saflex_data.loss import unwrap_model
from tests.conftest import SmallCNN

K = 4


def _val(batches: int = 3, size: int = 8, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 6, 6, generator=g, dtype=dtype), torch.randint(0, K, (size,), generator=g))
            for _ in range(batches)]


def _batch(seed: int = 1, batch: int = 10, n_aug: int = 5, dtype=torch.float32, soft: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 6, 6, generator=g, dtype=dtype)
    y = torch.randint(0, K, (batch,), generator=g)
    labels = F.one_hot(y, K).to(dtype) * 0.7 + 0.3 / K if soft else y
    is_aug = torch.arange(batch) >= batch - n_aug
    op = torch.where(is_aug, torch.arange(batch) % 2, -1)
    return x, SaflexTarget(labels, is_aug, index=torch.arange(batch), op=op, op_names=("rotate", "erase"))


def _model(seed: int = 0, dtype=torch.float32, batchnorm: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(K, batchnorm=batchnorm).to(dtype).train()


METHODS = ["jvp", "last_layer", "single_pass"]


def _forward(criterion: SaflexLoss, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return criterion.forward_train(x) if criterion.method == "single_pass" else model(x)


class TestSaflexLoss:
    def test_repr_and_state_dict_hold_no_model_parameters(self):
        model = _model()
        criterion = SaflexLoss(model, _val())
        assert "method='last_layer'" in repr(criterion) and "rule=Rule(name='gated_prior', beta=2.0" in repr(criterion)
        assert list(criterion.state_dict()) == ["_extra_state"]
        assert list(criterion.parameters()) == []

    @pytest.mark.parametrize("soft", [False, True])
    @pytest.mark.parametrize("smoothing", [0.0, 0.1])
    def test_disabled_is_exactly_plain_cross_entropy(self, soft, smoothing):
        model = _model()
        criterion = SaflexLoss(model, _val(), enabled=False, label_smoothing=smoothing)
        x, target = _batch(soft=soft)
        logits = model(x)
        expected = F.cross_entropy(logits, target.labels, label_smoothing=smoothing)
        assert torch.equal(criterion(logits, target), expected)
        assert criterion.step == 0

    @pytest.mark.parametrize("method", METHODS)
    @pytest.mark.parametrize("temperature", [1.0, 4.0, math.inf])
    @pytest.mark.parametrize("rule", ["paper", "margin", "margin_fix"])
    def test_loss_is_the_weighted_soft_label_cross_entropy(self, method, temperature, rule):
        model = _model(dtype=torch.float64, batchnorm=False)
        criterion = SaflexLoss(model, _val(dtype=torch.float64), method=method, rule=SF.Rule(rule, beta=0.2, tau=None),
                               val_temperature=temperature)
        x, target = _batch(dtype=torch.float64)
        logits = _forward(criterion, model, x)
        loss = criterion(logits, target)
        # The same decisions from the pure functions.
        model.eval()
        val_x, val_y = _val(dtype=torch.float64)[0]
        val_grad = SF.validation_gradient(model, val_x, val_y, temperature=temperature)
        model.train()
        pi = SF.grad_inner_products(model, x[5:], val_grad, method="last_layer" if method == "last_layer" else "jvp")
        w, soft = SF.saflex_targets(pi, target.labels[5:], beta=0.2, tau=None, rule=rule)
        weights = torch.cat([torch.ones(5, dtype=torch.float64), w])
        labels = torch.cat([F.one_hot(target.labels[:5], K).double(), soft])
        expected = (weights * F.cross_entropy(logits, labels, reduction="none")).sum() / 10
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
        # Clean samples keep their label and weight 1.
        assert torch.equal(criterion.last_step["weights"][:5], torch.ones(5, dtype=torch.float64))
        assert torch.equal(criterion.last_step["targets"][:5], F.one_hot(target.labels[:5], K).double())
        loss.backward()

    @pytest.mark.parametrize("method", METHODS)
    def test_extra_passes_change_no_buffer_grad_or_mode(self, method):
        model = _model()
        criterion = SaflexLoss(model, _val(), method=method)
        x, target = _batch()
        logits = _forward(criterion, model, x)
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.25)
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        criterion(logits, target)
        for k, v in model.named_buffers():
            assert torch.equal(v, buffers[k]), k
        assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
        assert model.training

    def test_plain_forward_updates_running_stats_once(self):
        model = _model()
        twin = copy.deepcopy(model)
        criterion = SaflexLoss(model, _val())
        x, target = _batch()
        criterion(model(x), target)
        twin(x)
        for (k, a), (_, b) in zip(model.named_buffers(), twin.named_buffers(), strict=False):
            assert torch.equal(a, b), k

    @pytest.mark.parametrize("method", METHODS)
    def test_trains_and_reports_stats(self, method):
        model = _model()
        criterion = SaflexLoss(model, _val(), method=method)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(4):
            x, target = _batch(seed=step)
            loss = criterion(_forward(criterion, model, x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert torch.isfinite(loss)
        stats = criterion.stats
        assert stats["step"] == 4 and stats["augmented_fraction"] == 0.5
        assert 0 <= stats["kept_fraction"] <= 1 and 0 <= stats["relabeled_fraction"] <= 1
        ops = criterion.op_stats()
        assert set(ops) == {"rotate", "erase"} and sum(v["count"] for v in ops.values()) == 20

    def test_num_splits_tags_by_position(self):
        model = _model()
        criterion = SaflexLoss(model, _val(), num_splits=2)
        x, target = _batch()
        y = target.labels[:5].repeat(2)
        loss = criterion(model(x), y)
        assert criterion.stats["augmented_fraction"] == 0.5
        assert torch.equal(criterion.last_step["is_augmented"], torch.arange(10) >= 5)
        loss.backward()

    def test_batch_without_augmented_samples_is_plain_ce(self):
        model = _model()
        criterion = SaflexLoss(model, _val())
        x, target = _batch(n_aug=0)
        logits = model(x)
        torch.testing.assert_close(criterion(logits, target), F.cross_entropy(logits, target.labels))
        assert criterion.stats["augmented_fraction"] == 0.0

    def test_all_augmented(self):
        model = _model()
        criterion = SaflexLoss(model, _val())
        x, target = _batch(n_aug=10)
        criterion(model(x), target).backward()
        assert criterion.stats["augmented_fraction"] == 1.0

    def test_no_grad_context_is_plain_ce(self):
        model = _model()
        criterion = SaflexLoss(model, _val())
        x, target = _batch()
        with torch.no_grad():
            logits = model(x)
            assert torch.equal(criterion(logits, target), F.cross_entropy(logits, target.labels))

    def test_val_every_reuses_the_validation_gradient(self):
        model = _model()
        criterion = SaflexLoss(model, _val(batches=10), val_every=3)
        for step in range(6):
            x, target = _batch(seed=step)
            criterion(model(x), target)
        assert criterion._val.drawn == 2  # refreshed at steps 0 and 3

    def test_val_loader_is_cycled(self):
        model = _model()
        criterion = SaflexLoss(model, _val(batches=2))
        for step in range(5):
            x, target = _batch(seed=step)
            criterion(model(x), target)
        assert criterion._val.drawn == 5

    def test_unwraps_compiled_and_parallel_wrappers(self):
        model = _model()
        assert unwrap_model(nn.DataParallel(model)) is model
        assert unwrap_model(torch.compile(model)) is model


class TestResume:
    @pytest.mark.parametrize("method", ["jvp", "last_layer"])
    def test_state_dict_resume_gives_identical_decisions(self, method):
        def run(steps, model, criterion, opt, start=0):
            out = []
            for step in range(start, start + steps):
                x, target = _batch(seed=step)
                loss = criterion(model(x), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                out.append((criterion.last_step["weights"].clone(), criterion.last_step["targets"].clone()))
            return out

        model = _model(batchnorm=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        criterion = SaflexLoss(model, _val(batches=2), method=method, seed=7, val_every=2)
        run(3, model, criterion, opt)
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "loss": criterion.state_dict()}, buffer)
        expected = run(4, model, criterion, opt, start=3)

        buffer.seek(0)
        state = torch.load(buffer, weights_only=False)
        model2 = _model(seed=123, batchnorm=False)
        model2.load_state_dict(state["model"])
        opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
        opt2.load_state_dict(state["opt"])
        criterion2 = SaflexLoss(model2, _val(batches=2), method=method, seed=0, val_every=2)
        criterion2.load_state_dict(state["loss"])
        got = run(4, model2, criterion2, opt2, start=3)
        for (w1, y1), (w2, y2) in zip(expected, got, strict=False):
            assert torch.equal(w1, w2) and torch.equal(y1, y2)


    def test_last_layer_state_of_the_tuple_signal_format_loads(self):
        # Before the Π methods became classes, a last_layer loss saved its signal as (grad_weight, grad_bias) with
        # shapes keyed "weight"/"bias"; such a state loads and decides as the same state in today's format.
        model = _model(batchnorm=False)
        criterion = SaflexLoss(model, _val(batches=2), method="last_layer", seed=7)
        x, target = _batch(seed=0)
        criterion(model(x), target)
        state = criterion.state_dict()
        extra = dict(state["_extra_state"])
        name = criterion.classifier_name
        extra["signal"] = (extra["signal"][f"{name}.weight"], extra["signal"][f"{name}.bias"])
        extra["signal_shapes"] = {k.rsplit(".", 1)[1]: v for k, v in extra["signal_shapes"].items()}
        old = SaflexLoss(model, _val(batches=2), method="last_layer", val_every=5)
        old.load_state_dict({"_extra_state": extra})
        new = SaflexLoss(model, _val(batches=2), method="last_layer", val_every=5)
        new.load_state_dict(state)
        assert old._signal.keys() == new._signal.keys() == {f"{name}.weight", f"{name}.bias"}
        x, target = _batch(seed=1)
        logits = model(x)
        old(logits, target)
        new(logits, target)
        assert torch.equal(old.last_step["weights"], new.last_step["weights"])
        extra["signal_shapes"] = {"weight": (3, 3), "bias": (3,)}
        with pytest.raises(ValueError, match="the saved validation signal does not fit this model"):
            SaflexLoss(model, _val(), method="last_layer").load_state_dict({"_extra_state": extra})


class TestFallback:
    def test_nonfinite_validation_gradient_keeps_upstream_labels(self):
        model = _model()
        val = _val()
        val[0][0][0, 0, 0, 0] = float("nan")
        criterion = SaflexLoss(model, val)
        x, target = _batch()
        with pytest.warns(RuntimeWarning, match="non-finite inner products"):
            loss = criterion(model(x), target)
        assert torch.isfinite(loss)
        assert criterion.stats["nonfinite_steps"] == 1
        assert torch.equal(criterion.last_step["weights"], torch.ones(10))
        assert torch.equal(criterion.last_step["targets"], F.one_hot(target.labels, K).float())
        x, target = _batch(seed=2)
        criterion._signal = None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            criterion(model(x), target)


class TestErrors:
    def test_plain_tensor_target_without_tags(self):
        model = _model()
        criterion = SaflexLoss(model, _val())
        x, target = _batch()
        with pytest.raises(TypeError, match="target must be a SaflexTarget.*SaflexCollate.*num_splits=2"):
            criterion(model(x), target.labels)

    def test_num_splits_not_dividing_the_batch(self):
        model = _model()
        criterion = SaflexLoss(model, _val(), num_splits=3)
        x, target = _batch()
        with pytest.raises(ValueError, match="batch size must be a multiple of 3, but logits have 10 rows"):
            criterion(model(x), target.labels)

    def test_target_of_another_batch(self):
        model = _model()
        criterion = SaflexLoss(model, _val())
        x, target = _batch()
        with pytest.raises(ValueError, match="target has 9 samples but logits have 10"):
            criterion(model(x), target[:9])

    def test_labels_out_of_range(self):
        model = _model()
        criterion = SaflexLoss(model, _val())
        x, target = _batch()
        target.labels[0] = K
        with pytest.raises(ValueError, match=r"target labels must be class indices in \[0, 4\)"):
            criterion(model(x), target)

    def test_soft_labels_not_summing_to_one(self):
        model = _model()
        criterion = SaflexLoss(model, _val())
        x, target = _batch(soft=True)
        target.labels *= 2
        with pytest.raises(ValueError, match="target labels given as probabilities must be non-negative and sum"):
            criterion(model(x), target)

    def test_logits_wrong_shape(self):
        criterion = SaflexLoss(_model(), _val())
        with pytest.raises(ValueError, match=r"logits must be a float tensor of shape \(B, K\)"):
            criterion(torch.zeros(3), SaflexTarget(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.bool)))

    def test_single_class(self):
        criterion = SaflexLoss(_model(), _val())
        with pytest.raises(ValueError, match="at least 2 classes"):
            criterion(torch.zeros(3, 1, requires_grad=True),
                      SaflexTarget(torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool)))

    def test_empty_validation_loader(self):
        model = _model()
        criterion = SaflexLoss(model, [])
        x, target = _batch()
        with pytest.raises(ValueError, match="val_loader yielded no batches"):
            criterion(model(x), target)

    def test_exhausted_one_shot_validation_iterator(self):
        model = _model()
        criterion = SaflexLoss(model, iter(_val(batches=1)))
        x, target = _batch()
        criterion(model(x), target)
        with pytest.raises(ValueError, match="val_loader is a one-shot iterator .* has run out after 1 batches"):
            criterion(model(x), target)

    def test_validation_batch_not_a_pair(self):
        model = _model()
        criterion = SaflexLoss(model, [torch.zeros(2, 1, 6, 6)])
        x, target = _batch()
        with pytest.raises(TypeError, match=r"val_loader must yield \(inputs, targets\) pairs"):
            criterion(model(x), target)

    def test_validation_labels_out_of_range(self):
        model = _model()
        criterion = SaflexLoss(model, [(torch.zeros(2, 1, 6, 6), torch.tensor([0, 9]))])
        x, target = _batch()
        with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 4\)"):
            criterion(model(x), target)

    def test_last_layer_without_classifier(self):
        model = nn.Sequential(nn.Conv2d(1, K, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        with pytest.raises(ValueError, match="could not find the model's classifier.*classifier="):
            SaflexLoss(model, _val(), method="last_layer")

    def test_last_layer_with_postprocessed_logits(self):
        class Scaled(nn.Module):
            def __init__(self):
                super().__init__()
                self.body, self.fc = nn.Flatten(), nn.Linear(36, K)

            def forward(self, x):
                return self.fc(self.body(x)) / 2

        model = Scaled()
        criterion = SaflexLoss(model, _val(), method="last_layer")
        x, target = _batch()
        message = "are not the output of any of the last 1 forwards of the classifier 'fc'"
        with pytest.raises(RuntimeError, match=message):
            criterion(model(x), target)

    def test_loss_called_without_a_model_forward(self):
        model = _model()
        criterion = SaflexLoss(model, _val(), method="jvp")
        x, target = _batch()
        criterion(model(x), target)
        with pytest.raises(RuntimeError, match=r"not the output of any of the last 1 forwards of the model since"):
            criterion(torch.randn(10, K, requires_grad=True), target)

    def test_forward_train_needs_single_pass(self):
        criterion = SaflexLoss(_model(), _val())
        with pytest.raises(RuntimeError, match="forward_train is for method='single_pass'"):
            criterion.forward_train(torch.zeros(2, 1, 6, 6))

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"method": "fd"}, "method must be one of"),
            ({"val_every": 0}, "val_every must be an int >= 1"),
            ({"val_ema": 1.0}, r"val_ema must be None or a decay in \[0, 1\)"),
            ({"reference": "train"}, r"reference must be one of \('heldout', 'batch'\), but got 'train'"),
            ({"val_temperature": 0.0}, r"val_temperature must be a float > 0 \(math.inf allowed\), but got 0.0"),
            ({"num_splits": 1}, "num_splits must be None or an int >= 2"),
            ({"rule": "x"}, "rule must be one of"),
        ],
    )
    def test_bad_options(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            SaflexLoss(_model(), _val(), **kwargs)

    def test_bad_types(self):
        with pytest.raises(TypeError, match="model must be an nn.Module"):
            SaflexLoss(lambda x: x, _val())
        with pytest.raises(TypeError, match="val_loader must be an iterable"):
            SaflexLoss(_model(), None)
        with pytest.raises(TypeError, match="prepare must be a callable"):
            SaflexLoss(_model(), _val(), prepare=3)

    @pytest.mark.needs_cuda
    def test_target_on_another_device_is_moved(self):
        model = _model().cuda()
        criterion = SaflexLoss(model, _val())
        x, target = _batch()
        loss = criterion(model(x.cuda()), target)  # target left on the CPU: moved, not reinterpreted
        assert loss.device.type == "cuda"


class TestSaflexTarget:
    def test_to_pin_index_cat(self):
        _, target = _batch(soft=True)
        moved = target.to("cpu", non_blocking=True)
        assert moved == target and moved is not target
        assert target.to(torch.float64).labels.dtype == torch.float64
        assert target.to(torch.float64).is_augmented.dtype == torch.bool
        both = SaflexTarget.cat([target[:3], target[3:]])
        assert both == target
        assert len(target[target.is_augmented]) == 5
        assert "augmented=5" in repr(target)

    def test_cat_mixes_hard_and_soft(self):
        hard = SaflexTarget(torch.tensor([1, 2]), torch.tensor([False, False]))
        soft = SaflexTarget(torch.full((1, 3), 1 / 3), torch.tensor([True]))
        out = SaflexTarget.cat([hard, soft])
        assert out.labels.shape == (3, 3) and out.labels[0].argmax() == 1

    def test_errors(self):
        with pytest.raises(TypeError, match=r"is_augmented must be a bool tensor of shape \(2,\)"):
            SaflexTarget(torch.tensor([0, 1]), torch.tensor([0, 1]))
        with pytest.raises(TypeError, match=r"labels must be a tensor of shape \(B,\)"):
            SaflexTarget([0, 1], torch.tensor([True, False]))
        with pytest.raises(TypeError, match=r"op must be an int tensor of shape \(2,\)"):
            SaflexTarget(torch.tensor([0, 1]), torch.tensor([True, False]), op=torch.zeros(3, dtype=torch.long))
        with pytest.raises(ValueError, match="non-empty sequence"):
            SaflexTarget.cat([])

    def test_pin_memory_in_a_dataloader(self):
        if not torch.cuda.is_available():
            pytest.skip("pin_memory needs an accelerator")
        _, target = _batch()
        assert target.pin_memory().labels.is_pinned()


def test_validation_pass_restores_each_submodule_mode():
    model = _model()
    model.bn.eval()  # e.g. a frozen BatchNorm inside a training model
    criterion = SaflexLoss(model, _val())
    x, target = _batch()
    criterion(model(x), target)
    assert model.training and not model.bn.training


def test_jvp_through_eval_mode_multihead_attention():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, K)

        def forward(self, x):
            return self.fc(self.mha(x, x, x, need_weights=False)[0].mean(1))

    model = Attn().eval()  # eval mode takes MHA's fused fast path, which has no forward-mode derivative
    x, y = torch.randn(3, 5, 8), torch.tensor([0, 1, 2])
    g = SF.validation_gradient(model, x, y)
    assert SF.grad_inner_products(model, x, g, method="jvp").shape == (3, K)
    assert torch.backends.mha.get_fastpath_enabled()
