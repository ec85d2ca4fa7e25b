"""SaflexLoss inside real training loops: extra forwards, copies of the model, checkpoints, eval mode, random state,
resumed states, label dtypes, and the reference taken from the batch itself."""

from __future__ import annotations

import copy
import gc
import inspect
import io
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saflex_data.functional as SF
from saflex_data import SaflexLoss, SaflexTarget
from saflex_data.functional import Rule

K, D = 4, 6


def _mlp(seed: int = 0, dropout: float = 0.0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(D, 16), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(16, K)]
    return nn.Sequential(*layers).to(dtype).train()


def _val(n: int = 3, seed: int = 5, dtype=torch.float64) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, D, generator=g, dtype=dtype), torch.randint(0, K, (12,), generator=g)) for _ in range(n)]


def _batch(seed: int = 1, n: int = 10, dtype=torch.float64) -> tuple[torch.Tensor, SaflexTarget]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=dtype)
    return x, SaflexTarget(torch.randint(0, K, (n,), generator=g), torch.arange(n) >= n // 2)


def _decisions(criterion: SaflexLoss) -> tuple[torch.Tensor, torch.Tensor]:
    return criterion.last_step["weights"].clone(), criterion.last_step["targets"].clone()


def _reference(method: str, batches: list, **kwargs) -> list:
    """The decisions of one forward then one loss call per batch, on a fresh copy of the same model."""
    model = _mlp()
    criterion = SaflexLoss(model, _val(), method=method, **kwargs)
    out = []
    for x, target in batches:
        criterion(model(x), target)
        out.append(_decisions(criterion))
    return out


METHODS = ("jvp", "last_layer")


# ---------------------------------------------------------------------------------------------------------------
# 1. the decisions belong to the logits passed to the loss
# ---------------------------------------------------------------------------------------------------------------
class TestDecisionsFollowTheLogits:
    @pytest.mark.parametrize("method", METHODS)
    @pytest.mark.parametrize("no_grad", [False, True])
    def test_extra_forward_between_forward_and_loss(self, method, no_grad):
        batch, other = _batch(1), _batch(2)
        model = _mlp()
        criterion = SaflexLoss(model, _val(), method=method)
        for _ in range(2):  # the second step too (last_layer used to go wrong from the second step on)
            logits = model(batch[0])
            with torch.no_grad() if no_grad else torch.enable_grad():
                model(other[0])  # a teacher / monitoring pass
            criterion(logits, batch[1])
        reference = _reference(method, [batch, batch])
        for got, want in zip(_decisions(criterion), reference[-1], strict=False):
            assert torch.equal(got, want)

    @pytest.mark.parametrize("method", METHODS)
    def test_two_views_each_get_their_own_decisions(self, method):
        view1, view2 = _batch(1), _batch(2)
        model = _mlp()
        criterion = SaflexLoss(model, _val(), method=method)
        out1, out2 = model(view1[0]), model(view2[0])
        criterion(out1, view1[1])
        first = _decisions(criterion)
        criterion(out2, view2[1])
        second = _decisions(criterion)
        reference = _reference(method, [view1, view2])
        for got, want in zip((*first, *second), (*reference[0], *reference[1]), strict=False):
            assert torch.equal(got, want)

    def test_two_losses_on_one_model_do_not_see_each_other(self):
        batch = _batch(3)
        model = _mlp()
        losses = [SaflexLoss(model, _val(), method="jvp"), SaflexLoss(model, _val(seed=9), method="last_layer")]
        logits = model(batch[0])
        sum(criterion(logits, batch[1]) for criterion in losses).backward()
        ref_jvp = _reference("jvp", [batch])[0]
        model = _mlp()
        ref_ll = SaflexLoss(model, _val(seed=9), method="last_layer")
        ref_ll(model(batch[0]), batch[1])
        got_all = (*_decisions(losses[0]), *_decisions(losses[1]))
        for got, want in zip(got_all, (*ref_jvp, *_decisions(ref_ll)), strict=False):
            assert torch.equal(got, want)

    @pytest.mark.parametrize("method", METHODS)
    def test_logits_of_no_remembered_forward_raise(self, method):
        model = _mlp()
        criterion = SaflexLoss(model, _val(), method=method)
        x, target = _batch()
        model(x)
        with pytest.raises(RuntimeError, match=r"are not the output of any of the last 2 forwards"):
            criterion(model(x) * 2.0, target)


# ---------------------------------------------------------------------------------------------------------------
# 2. nothing outlives the criterion or travels with the model
# ---------------------------------------------------------------------------------------------------------------
def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class TestNothingLeaks:
    @pytest.mark.parametrize("method", METHODS)
    def test_deleting_the_criterion_removes_its_hooks(self, method):
        model = _mlp()
        refs = []
        for _ in range(30):
            criterion = SaflexLoss(model, _val(), method=method)
            x, target = _batch()
            criterion(model(x), target).backward()
            refs.append(weakref.ref(criterion))
        del criterion
        gc.collect()
        assert all(ref() is None for ref in refs)
        assert _hook_count(model) == 0

    @pytest.mark.parametrize("method", METHODS)
    def test_copies_and_pickles_of_the_model_carry_nothing(self, method):
        bare = pickle.dumps(_mlp())
        model = _mlp()
        criterion = SaflexLoss(model, _val(n=50), method=method)  # some validation data to notice
        x, target = _batch()
        logits = model(x)
        assert abs(len(pickle.dumps(model)) - len(bare)) < 1024
        buffer = io.BytesIO()
        torch.save(model, buffer)
        assert abs(buffer.tell() - len(bare)) < 1024 + 2048  # torch.save's zip container adds its own headers
        clone = copy.deepcopy(model)
        averaged = torch.optim.swa_utils.AveragedModel(model)
        restored = pickle.loads(pickle.dumps(model))
        for other in (clone, averaged, restored):
            assert torch.equal(other(x), model(x))  # forwards exactly like the original ...
        criterion(logits, target)  # ... and none of them fed the criterion: it still finds the training forward
        assert abs(len(pickle.dumps(clone)) - len(bare)) < 1024

    def test_timm_model_ema(self):
        timm_utils = pytest.importorskip("timm.utils")
        model = _mlp()
        criterion = SaflexLoss(model, _val())
        ema = timm_utils.ModelEmaV3(model, decay=0.9)
        x, target = _batch()
        logits = model(x)
        ema.update(model)
        ema.module(x)
        assert torch.isfinite(criterion(logits, target))
        assert abs(len(pickle.dumps(ema.module)) - len(pickle.dumps(_mlp()))) < 1024


# ---------------------------------------------------------------------------------------------------------------
# 3. eval mode, 4. random state
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ("jvp", "last_layer", "single_pass"))
def test_eval_mode_is_plain_cross_entropy(method):
    model = _mlp()
    criterion = SaflexLoss(model, _val(), method=method)
    x, target = _batch()
    model.eval()
    logits = model(x)
    assert torch.equal(criterion(logits, target), F.cross_entropy(logits, target.labels))
    assert criterion.step == 0 and criterion._val.drawn == 0


@pytest.mark.parametrize("method", ("jvp", "last_layer", "single_pass"))
@pytest.mark.parametrize("rule", ("paper", "margin"))
def test_global_random_state_is_untouched(method, rule):
    model = _mlp(dropout=0.3)
    before = torch.get_rng_state()
    criterion = SaflexLoss(model, _val(), method=method, rule=rule)
    assert torch.equal(torch.get_rng_state(), before)
    x, target = _batch()
    logits = criterion.forward_train(x) if method == "single_pass" else model(x)
    after_forward = torch.get_rng_state()
    criterion(logits, target).backward()
    assert torch.equal(torch.get_rng_state(), after_forward)


def test_jvp_uses_the_training_forwards_dropout_masks():
    model = _mlp(dropout=0.4)
    val = _val(n=1)
    criterion = SaflexLoss(model, val, method="jvp")
    seen = []
    inner = criterion._method.inner_products
    criterion._method.inner_products = lambda *args, **kwargs: (seen.append(inner(*args, **kwargs)), seen[-1])[1]
    x, target = _batch(n=8)
    state = torch.get_rng_state()
    criterion(model(x), target)

    # float64 reference: one forward with the same masks, then per-sample, per-class autograd gradients
    params = [p for p in model.parameters()]
    model.eval()
    g = SF.validation_gradient(model, *val[0], temperature=criterion.val_temperature)
    model.train()
    torch.set_rng_state(state)
    log_p = torch.log_softmax(model(x), -1)
    aug = target.is_augmented.nonzero().squeeze(1)
    reference = torch.zeros(len(aug), K, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    for row, i in enumerate(aug.tolist()):
        for k in range(K):
            grads = torch.autograd.grad(-log_p[i, k], params, retain_graph=True)
            reference[row, k] = sum((gr * g[n]).sum() for gr, n in zip(grads, names, strict=False))
    torch.testing.assert_close(seen[0][target.is_augmented], reference, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 6. resumed states are checked when they are loaded
# ---------------------------------------------------------------------------------------------------------------
class TestLoadStateDict:
    def _trained(self, method: str, model: nn.Module) -> SaflexLoss:
        criterion = SaflexLoss(model, _val(), method=method)
        x, target = _batch()
        criterion(model(x), target)
        return criterion

    def test_another_method(self):
        state = self._trained("jvp", _mlp()).state_dict()
        with pytest.raises(ValueError, match=r"saved by method='jvp', but this loss uses method='last_layer'"):
            SaflexLoss(_mlp(), _val(), method="last_layer").load_state_dict(state)

    @pytest.mark.parametrize("method", METHODS)
    def test_another_model(self, method):
        state = self._trained(method, _mlp()).state_dict()
        torch.manual_seed(0)
        other = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K)).double()
        with pytest.raises(ValueError, match=r"the saved validation signal does not fit this model"):
            SaflexLoss(other, _val(), method=method).load_state_dict(state)

    def test_same_setup_resumes(self):
        state = self._trained("jvp", _mlp()).state_dict()
        restored = SaflexLoss(_mlp(), _val(), method="jvp")
        restored.load_state_dict(state)
        assert restored.step == 1


# ---------------------------------------------------------------------------------------------------------------
# 7. labels of any integer dtype
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_integer_label_dtypes_behave_alike(dtype):
    x, target = _batch()
    out = {}
    for name, labels in (("int64", target.labels), ("other", target.labels.to(dtype))):
        model = _mlp()
        criterion = SaflexLoss(model, _val())
        tagged = SaflexTarget(labels, target.is_augmented)
        train = criterion(model(x), tagged)
        with torch.no_grad():
            no_grad = criterion(model(x), tagged)
        criterion.enabled = False
        disabled = criterion(model(x), tagged)
        split = SaflexLoss(model, _val(), num_splits=2)(model(x), labels)
        out[name] = (train, no_grad, disabled, split)
    for a, b in zip(out["int64"], out["other"], strict=False):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# reference="batch": the clean rows of the batch are the reference
# ---------------------------------------------------------------------------------------------------------------
class TestBatchReference:
    @pytest.mark.parametrize("method", METHODS)
    def test_equals_the_functional_pipeline(self, method):
        model = _mlp()
        criterion = SaflexLoss(model, None, method=method, reference="batch", rule="margin")  # a stateless rule
        x, target = _batch(n=12)
        logits = model(x)
        loss = criterion(logits, target)
        clean, aug = ~target.is_augmented, target.is_augmented
        g = SF.validation_gradient(model, x[clean], target.labels[clean], temperature=criterion.val_temperature)
        pi = SF.grad_inner_products(model, x[aug], g, method=method)
        w, y = SF.saflex_targets(pi, target.labels[aug])
        weights = torch.ones(12, dtype=torch.float64)
        labels = F.one_hot(target.labels, K).double()
        weights[aug], labels[aug] = w, y
        expected = (weights * F.cross_entropy(logits, labels, reduction="none")).sum() / 12
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)

    def test_a_batch_without_clean_rows_keeps_everything(self):
        model = _mlp()
        criterion = SaflexLoss(model, None, reference="batch")
        x, _ = _batch()
        target = SaflexTarget(torch.zeros(10, dtype=torch.long), torch.ones(10, dtype=torch.bool))
        logits = model(x)
        loss = criterion(logits, target)
        torch.testing.assert_close(loss, F.cross_entropy(logits, target.labels))
        assert criterion.stats["kept_fraction"] == 1.0

    def test_errors(self):
        with pytest.raises(TypeError, match=r"val_loader must be an iterable .* \(or None with reference='batch'\)"):
            SaflexLoss(_mlp(), None)
        with pytest.raises(ValueError, match=r"reference='batch' needs the batch before its forward"):
            SaflexLoss(_mlp(), None, method="single_pass", reference="batch")


# ---------------------------------------------------------------------------------------------------------------
# the rule value and the lean constructor
# ---------------------------------------------------------------------------------------------------------------
class TestRule:
    def test_defaults_are_resolved(self):
        assert Rule().beta == 1.5 and Rule("paper").beta == 0.5 and Rule.of("margin_fix") == Rule("margin_fix")
        assert SaflexLoss(_mlp(), _val(), rule="paper").rule == Rule("paper")

    @pytest.mark.parametrize(
        "kwargs, error, match",
        [
            ({"name": "median"}, ValueError, r"rule must be one of \('paper', 'centered', 'margin', 'margin_relabel'"),
            ({"beta": float("nan")}, ValueError,
             r"beta must be a finite float or None \(the rule's default\), but got nan"),
            ({"tau": 0.0}, ValueError,
             r"tau must be a finite positive float \(0, inf\) or None \(argmax\), but got 0.0"),
            ({"normalize": "l2"}, ValueError,
             r"normalize must be one of \('batch_max', 'row_max', 'none'\), but got 'l2'"),
        ],
    )
    def test_bad_settings(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            Rule(**kwargs)

    @pytest.mark.parametrize("name", ["gain", "gain_auto", "gain_loss"])
    def test_gain_rules_through_the_loss(self, name):
        model = _mlp()
        criterion = SaflexLoss(model, _val(), rule=name)
        x, target = _batch()
        logits = model(x)
        loss = criterion(logits, target)
        aug = target.is_augmented
        pi_seen = []
        gather = criterion._sync.gather
        criterion._sync.gather = lambda pi, *a, **k: (pi_seen.append((pi, k["logits"])), gather(pi, *a, **k))[1]
        loss = criterion(logits, target)
        pi, seen_logits = pi_seen[0]  # every row; the rule decides for the augmented ones
        pi, seen_logits = pi[aug], seen_logits[aug]
        assert torch.equal(seen_logits, logits[aug].detach())
        w, _ = SF.saflex_targets(pi, target.labels[aug], rule=name, logits=logits[aug].detach())
        assert torch.equal(criterion.last_step["weights"][aug], w)
        assert torch.isfinite(loss)

    def test_bad_type(self):
        with pytest.raises(TypeError, match=r"rule must be a Rule or a rule name \(str\), but got float"):
            SaflexLoss(_mlp(), _val(), rule=1.5)

    def test_lean_constructor_and_straight_forward(self):
        assert len(inspect.signature(SaflexLoss).parameters) <= 16
        assert len(inspect.getsource(SaflexLoss.forward).splitlines()) <= 40
