"""The pure SAFLEX math against slow float64 references (tests/_reference.py) and the facts of docs/method.md."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saflex_data._autodiff as SF_autodiff
import saflex_data.functional as SF
from tests._reference import (
    l2r_meta_gradient,
    reference_inner_products,
    reference_validation_gradient,
)
from tests.conftest import make_inputs, make_model

KINDS = ["mlp", "mlp_bn", "cnn"]


def _problem(kind: str, batch: int = 7, classes: int = 4, train: bool = True, seed: int = 0):
    model = make_model(kind, classes, seed=seed).train(train)
    x = make_inputs(kind, batch, seed=seed + 1)
    xv = make_inputs(kind, 6, seed=seed + 2)
    yv = torch.randint(0, classes, (6,), generator=torch.Generator().manual_seed(seed + 3))
    return model, x, xv, yv


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def _assert_untouched(model: nn.Module, snap) -> None:
    state, grads, modes = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"
    for p, g in zip(model.parameters(), grads, strict=False):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == modes


class TestValidationGradient:
    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("train", [True, False])
    def test_matches_backward(self, kind, train):
        model, _, xv, yv = _problem(kind, train=train)
        ref = reference_validation_gradient(model, xv, yv)
        got = SF.validation_gradient(model, xv, yv)
        assert list(got) == list(ref)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-12, atol=1e-14)

    def test_probability_targets_equal_index_targets(self):
        model, _, xv, yv = _problem("mlp")
        a = SF.validation_gradient(model, xv, yv)
        b = SF.validation_gradient(model, xv, F.one_hot(yv, 4).double())
        for name in a:
            torch.testing.assert_close(a[name], b[name])

    @pytest.mark.parametrize("kind", KINDS)
    def test_leaves_buffers_grads_and_mode_alone(self, kind):
        model, _, xv, yv = _problem(kind)
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)
        snap = _snapshot(model)
        SF.validation_gradient(model, xv, yv)
        _assert_untouched(model, snap)

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("temperature", [0.5, 4.0, float("inf")])
    def test_tempered_matches_backward(self, kind, temperature):
        model, _, xv, yv = _problem(kind, train=False)
        ref = reference_validation_gradient(model, xv, yv, temperature)
        got = SF.validation_gradient(model, xv, yv, temperature=temperature)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-12, atol=1e-14)

    def test_tempered_large_t_approaches_the_limit(self):
        model, _, xv, yv = _problem("mlp")
        limit = SF.validation_gradient(model, xv, yv, temperature=float("inf"))
        near = SF.validation_gradient(model, xv, yv, temperature=1e8)
        for name in limit:
            torch.testing.assert_close(near[name], limit[name], rtol=1e-6, atol=1e-9)

    @pytest.mark.parametrize("temperature", [1.0, 3.0, float("inf")])
    def test_last_layer_closed_form_matches_autograd(self, temperature):
        model, _, xv, yv = _problem("mlp", train=False)
        full = SF.validation_gradient(model, xv, yv, temperature=temperature)
        with torch.no_grad():
            h = model[:-1](xv)
        gw, gb = SF.last_layer_validation_gradient(h, model[-1](h), yv, temperature=temperature)
        torch.testing.assert_close(gw, full["4.weight"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gb, full["4.bias"], rtol=1e-12, atol=1e-14)

    def test_validation_residual(self):
        z = torch.randn(5, 3, dtype=torch.float64)
        y = torch.tensor([0, 2, 1, 1, 0])
        e = F.one_hot(y, 3).double()
        torch.testing.assert_close(SF.validation_residual(z, y), z.softmax(-1) - e)
        torch.testing.assert_close(SF.validation_residual(z, e, 2.0), (z / 2).softmax(-1) - e)
        torch.testing.assert_close(SF.validation_residual(z, y, float("inf")), torch.full_like(e, 1 / 3) - e)
        with pytest.raises(ValueError, match=r"targets must have shape \(5,\) to match logits of shape \(5, 3\)"):
            SF.validation_residual(z, y[:4])

    @pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True, "4"])
    def test_bad_temperature(self, bad):
        model, _, xv, yv = _problem("mlp")
        with pytest.raises(ValueError, match=r"temperature must be a float > 0 \(math.inf allowed\), but got"):
            SF.validation_gradient(model, xv, yv, temperature=bad)
        with pytest.raises(ValueError, match="temperature must be a float > 0"):
            SF.validation_residual(torch.zeros(2, 3), torch.tensor([0, 1]), bad)

    def test_only_trainable_parameters(self):
        model, _, xv, yv = _problem("mlp")
        model[0].weight.requires_grad_(False)
        got = SF.validation_gradient(model, xv, yv)
        assert "0.weight" not in got and "0.bias" in got

    def test_last_layer_closed_form(self):
        model, _, xv, yv = _problem("cnn")
        full = SF.validation_gradient(model, xv, yv)
        features, logits = SF_autodiff.forward_features(model, model.fc, xv)
        gw, gb = SF.last_layer_validation_gradient(features, logits, yv)
        torch.testing.assert_close(gw, full["fc.weight"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gb, full["fc.bias"], rtol=1e-10, atol=1e-12)


class TestGradInnerProducts:
    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("train", [True, False])
    @pytest.mark.parametrize("method", ["jvp", "autograd"])
    def test_exact_methods_match_reference(self, kind, train, method):
        model, x, xv, yv = _problem(kind, train=train)
        g = SF.validation_gradient(model, xv, yv)
        ref = reference_inner_products(model, x, g)
        got = SF.grad_inner_products(model, x, g, method=method)
        assert got.dtype == torch.float64 and got.shape == (7, 4)
        rel = (got - ref).abs().max() / ref.abs().max()
        assert rel <= 1e-10, f"relative error {rel:.3g}"

    @pytest.mark.parametrize("kind", KINDS)
    def test_last_layer_is_exact_for_the_last_layer_block(self, kind):
        model, x, xv, yv = _problem(kind)
        g = SF.validation_gradient(model, xv, yv)
        name, _ = SF.find_classifier(model)
        last_only = {n: (v if n.startswith(name + ".") else torch.zeros_like(v)) for n, v in g.items()}
        ref = reference_inner_products(model, x, last_only)
        got = SF.grad_inner_products(model, x, g, method="last_layer")
        rel = (got - ref).abs().max() / ref.abs().max()
        assert rel <= 1e-10, f"relative error {rel:.3g}"

    @pytest.mark.parametrize("kind", KINDS)
    def test_last_layer_correlates_with_exact(self, kind):
        model, x, xv, yv = _problem(kind, batch=16)
        g = SF.validation_gradient(model, xv, yv)
        exact = SF.grad_inner_products(model, x, g, method="jvp").flatten()
        approx = SF.grad_inner_products(model, x, g, method="last_layer").flatten()
        assert torch.corrcoef(torch.stack([exact, approx]))[0, 1] > 0.3

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("method", ["jvp", "last_layer", "autograd"])
    def test_identity_probability_weighted_sum_is_zero(self, kind, method):
        model, x, xv, yv = _problem(kind)
        g = SF.validation_gradient(model, xv, yv)
        pi = SF.grad_inner_products(model, x, g, method=method)
        with torch.no_grad():
            p = torch.softmax(copy.deepcopy(model)(x), -1)
        assert (p * pi).sum(-1).abs().max() < 1e-12 * max(1.0, float(pi.abs().max()))
        assert bool((pi.amax(-1) >= -1e-15).all())  # hence max_k Π_ik >= 0

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("method", ["jvp", "last_layer", "autograd"])
    def test_leaves_buffers_grads_and_mode_alone(self, kind, method):
        model, x, xv, yv = _problem(kind)
        g = SF.validation_gradient(model, xv, yv)
        for p in model.parameters():
            p.grad = torch.full_like(p, -1.0)
        snap = _snapshot(model)
        SF.grad_inner_products(model, x, g, method=method)
        _assert_untouched(model, snap)

    @pytest.mark.parametrize("batch", [1, 2, 5])
    def test_batch_sizes(self, batch):
        model, x, xv, yv = _problem("mlp", batch=batch)
        g = SF.validation_gradient(model, xv, yv)
        assert SF.grad_inner_products(model, x, g).shape == (batch, 4)

    def test_l2r_equivalence(self):
        """Learning-to-Reweight's meta-gradient of sample i is -lr/B · Π[i, y_i] (docs/method.md#l2r)."""
        model, x, xv, yv = _problem("mlp")
        y = torch.randint(0, 4, (7,), generator=torch.Generator().manual_seed(9))
        lr = 0.1
        meta = l2r_meta_gradient(model, x, y, xv, yv, lr)
        pi = SF.grad_inner_products(model, x, SF.validation_gradient(model, xv, yv))
        torch.testing.assert_close(meta, -lr * pi[torch.arange(7), y], rtol=1e-9, atol=1e-14)

    def test_single_pass_matches_jvp_and_backpropagates(self):
        model, x, xv, yv = _problem("mlp_bn")
        g = SF.validation_gradient(model, xv, yv)
        twin = copy.deepcopy(model)
        expected = SF.grad_inner_products(model, x, g, method="jvp")
        logits, tangent = SF.forward_with_tangent(model, x, g)
        torch.testing.assert_close(SF.inner_products_from_tangent(logits, tangent), expected, rtol=1e-10, atol=1e-13)
        F.cross_entropy(logits, yv.new_zeros(7)).backward()
        F.cross_entropy(twin(x), yv.new_zeros(7)).backward()
        for p, q in zip(model.parameters(), twin.parameters(), strict=False):
            torch.testing.assert_close(p.grad, q.grad)
        # The single pass is the real training forward: running statistics advance as in a plain forward.
        torch.testing.assert_close(model[1].running_mean, twin[1].running_mean)
        assert not model[1].running_mean.requires_grad

    def test_attention_model_jvp(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), _SelfAttention(8), nn.Linear(8, 3)).double()
        x = torch.randn(4, 6, 5, dtype=torch.float64)
        xv, yv = torch.randn(3, 6, 5, dtype=torch.float64), torch.tensor([0, 1, 2])
        g = SF.validation_gradient(model, xv, yv)
        ref = reference_inner_products(model, x, g)
        got = SF.grad_inner_products(model, x, g, method="jvp")
        assert (got - ref).abs().max() / ref.abs().max() <= 1e-10


class _SelfAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v).mean(1)


class TestSaflexTargets:
    def test_argmax_without_bonus_picks_the_best_class_and_keeps_everything(self):
        pi = torch.tensor([[0.3, -0.1, -0.2], [-0.5, 0.1, 0.4]])
        w, y = SF.saflex_targets(pi, torch.tensor([1, 0]), beta=0.0, tau=None, rule="paper")
        assert y.argmax(1).tolist() == [0, 2] and w.tolist() == [1.0, 1.0]

    def test_bonus_keeps_upstream_label_unless_another_wins_by_beta(self):
        # Normalised scale: mean_i max_k |Π_ik| = 1.
        pi = torch.tensor([[0.2, 0.6, -0.8], [1.2, 0.0, -1.2]]) / 1.0
        w, y = SF.saflex_targets(pi, torch.tensor([0, 1]), beta=0.5, tau=None, normalize="none", rule="paper")
        assert y.argmax(1).tolist() == [0, 0]  # 0.2+0.5 > 0.6 keeps label 0; 0.0+0.5 < 1.2 moves to 0
        w, y = SF.saflex_targets(pi, torch.tensor([0, 1]), beta=0.3, tau=None, normalize="none", rule="paper")
        assert y.argmax(1).tolist() == [1, 0]

    def test_weight_drops_a_kept_label_with_negative_gain(self):
        pi = torch.tensor([[-0.1, 0.15, -0.05]])
        w, y = SF.saflex_targets(pi, torch.tensor([0]), beta=1.0, tau=None, normalize="none", rule="paper")
        assert y.argmax(1).tolist() == [0] and w.tolist() == [0.0]

    def test_weight_uses_raw_pi_not_the_bonus(self):
        pi = torch.tensor([[0.5, -0.2, -0.3]])
        w, _ = SF.saflex_targets(pi, torch.tensor([1]), beta=10.0, tau=None, rule="paper")
        assert w.tolist() == [0.0]

    def test_soft_upstream_labels_get_a_soft_bonus(self):
        pi = torch.zeros(1, 3)
        w, y = SF.saflex_targets(pi, torch.tensor([[0.3, 0.7, 0.0]]), beta=1.0, tau=None, rule="paper")
        assert y.argmax(1).tolist() == [1] and w.tolist() == [1.0]

    def test_gumbel_is_reproducible_and_concentrated(self):
        pi = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
        t = torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(1))
        a = SF.saflex_targets(pi, t, generator=torch.Generator().manual_seed(3), rule="paper")
        b = SF.saflex_targets(pi, t, generator=torch.Generator().manual_seed(3), rule="paper")
        torch.testing.assert_close(a, b)
        assert bool((a[1].amax(1) > 0.99).float().mean() > 0.9)  # τ = 0.01 gives nearly one-hot labels
        torch.testing.assert_close(a[1].sum(1), torch.ones(64))

    def test_gumbel_samples_softmax_of_the_score(self):
        """At small τ, the Gumbel-softmax label is a draw from softmax(S)."""
        pi = torch.tensor([[0.0, 1.0, -1.0]]).expand(4000, 3)
        g = torch.Generator().manual_seed(0)
        _, y = SF.saflex_targets(pi, torch.zeros(4000, dtype=torch.long), beta=0.0, normalize="none", generator=g,
                                 rule="paper")
        freq = y.argmax(1).bincount(minlength=3).double() / 4000
        torch.testing.assert_close(freq, torch.softmax(torch.tensor([0.0, 1.0, -1.0]), 0).double(), atol=0.03,
                                   rtol=0)

    def test_normalisation_is_scale_free(self):
        pi = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
        t = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(1))
        for normalize in ["batch_max", "row_max"]:
            a = SF.saflex_targets(pi, t, tau=None, normalize=normalize, rule="paper")
            b = SF.saflex_targets(pi * 1e-6, t, tau=None, normalize=normalize, rule="paper")
            torch.testing.assert_close(a, b)

    def test_centered_rule_removes_a_batch_global_direction(self):
        base = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)) * 0.1
        shifted = base + torch.tensor([5.0, 0.0, 0.0, 0.0])
        t = torch.zeros(32, dtype=torch.long)
        _, paper = SF.saflex_targets(shifted, t, beta=0.0, tau=None, rule="paper")
        _, centered = SF.saflex_targets(shifted, t, beta=0.0, tau=None, rule="centered")
        assert bool((paper.argmax(1) == 0).all())
        assert (centered.argmax(1) == 0).float().mean() < 0.6


class TestOneStepFirstOrder:
    """One SGD step with SAFLEX's weights and labels lowers the validation loss more than the upstream labels, by
    the amount the first-order expansion predicts (docs/method.md#pi)."""

    @pytest.mark.parametrize("seed", range(10))
    @pytest.mark.parametrize("beta", [0.0, 0.5])
    def test_saflex_step_beats_upstream_and_matches_prediction(self, seed, beta):
        lr, classes = 1e-4, 4
        model = make_model("mlp", classes, seed=seed)
        g = torch.Generator().manual_seed(100 + seed)
        x_clean, x_aug = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g,
                                                                                          dtype=torch.float64)
        y_clean, y_aug = torch.randint(0, classes, (8,), generator=g), torch.randint(0, classes, (8,), generator=g)
        xv, yv = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, classes, (16,), generator=g)
        val_grad = SF.validation_gradient(model, xv, yv)
        pi = SF.grad_inner_products(model, x_aug, val_grad)
        w, soft = SF.saflex_targets(pi, y_aug, beta=beta, tau=None, rule="paper")
        n = 16

        def val_loss_after_step(weights, labels):
            m = copy.deepcopy(model)
            opt = torch.optim.SGD(m.parameters(), lr=lr)
            loss = (F.cross_entropy(m(x_clean), y_clean, reduction="sum")
                    + (weights * F.cross_entropy(m(x_aug), labels, reduction="none")).sum()) / n
            loss.backward()
            opt.step()
            with torch.no_grad():
                return float(F.cross_entropy(m(xv), yv))

        up = F.one_hot(y_aug, classes).double()
        measured = val_loss_after_step(w, soft) - val_loss_after_step(torch.ones(8, dtype=torch.float64), up)
        predicted = -(lr / n) * float((w * (soft * pi).sum(1)).sum() - (up * pi).sum())
        if beta == 0.0:  # the plain LP solution always changes something here, and always for the better
            assert measured < 0, "SAFLEX's step must lower the validation loss more than the upstream labels"
        else:  # with the bonus SAFLEX may keep every upstream label, never for the worse
            assert measured <= 0
            if torch.equal(w, torch.ones(8, dtype=torch.float64)) and torch.equal(soft, up):
                return  # nothing changed: both steps are the same step
        assert abs(measured - predicted) <= 0.05 * abs(predicted)


class TestErrors:
    def test_targets_out_of_range(self):
        with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 3\).*got values in \[0, 5\]"):
            SF.saflex_targets(torch.zeros(2, 3), torch.tensor([0, 5]), rule="paper")

    def test_targets_wrong_shape(self):
        with pytest.raises(ValueError, match=r"targets must have shape \(2,\).*got \(3,\)"):
            SF.saflex_targets(torch.zeros(2, 3), torch.tensor([0, 1, 2]), rule="paper")

    def test_probabilities_must_sum_to_one(self):
        with pytest.raises(ValueError, match="must be non-negative and sum to 1"):
            SF.saflex_targets(torch.zeros(2, 3), torch.full((2, 3), 0.5), rule="paper")

    def test_probabilities_wrong_classes(self):
        with pytest.raises(ValueError, match=r"probabilities must have shape \(2, 3\).*got \(2, 4\)"):
            SF.saflex_targets(torch.zeros(2, 3), torch.full((2, 4), 0.25), rule="paper")

    def test_targets_wrong_kind(self):
        with pytest.raises(ValueError, match="must be class indices of shape"):
            SF.saflex_targets(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), rule="paper")

    def test_logits_wrong_shape(self):
        with pytest.raises(ValueError, match=r"pi must be a float tensor of shape \(B, K\)"):
            SF.saflex_targets(torch.zeros(3), torch.tensor([0, 1, 2]), rule="paper")

    def test_bad_options(self):
        pi, t = torch.zeros(1, 2), torch.tensor([0])
        with pytest.raises(ValueError, match="rule must be one of"):
            SF.saflex_targets(pi, t, rule="magic")
        with pytest.raises(ValueError, match="tau must be a finite positive float"):
            SF.saflex_targets(pi, t, tau=0.0, rule="paper")
        with pytest.raises(ValueError, match="normalize must be one of"):
            SF.saflex_targets(pi, t, normalize="l2", rule="paper")
        with pytest.raises(ValueError, match="beta must be a finite float"):
            SF.saflex_targets(pi, t, beta=float("nan"), rule="paper")

    def test_method_unknown(self):
        model, x, xv, yv = _problem("mlp")
        with pytest.raises(ValueError, match="method must be one of 'jvp', 'last_layer', 'autograd'"):
            SF.grad_inner_products(model, x, {}, method="fd")

    def test_classifier_not_found(self):
        class NoLinear(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 3, 1)

            def forward(self, x):
                return self.conv(x).mean((2, 3))

        with pytest.raises(ValueError, match=r"could not find the model's classifier.*classifier=model.fc"):
            SF.find_classifier(NoLinear())

    def test_classifier_output_not_logits(self):
        class Scaled(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(3, 2)

            def forward(self, x):
                return 2 * self.fc(x)

        model = Scaled()
        g = SF.validation_gradient(model, torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
        with pytest.raises(ValueError, match="transforms the classifier's output"):
            SF.grad_inner_products(model, torch.randn(2, 3), g, method="last_layer")

    def test_classifier_name_unknown(self):
        with pytest.raises(ValueError, match="classifier='nope' is not a submodule"):
            SF.find_classifier(nn.Linear(2, 2), "nope")

    def test_val_grad_with_foreign_keys(self):
        model, x, _, _ = _problem("mlp")
        with pytest.raises(ValueError, match="val_grad has keys that are not parameters"):
            SF.grad_inner_products(model, x, {"nope": torch.zeros(1)})

    def test_no_trainable_parameters(self):
        model = nn.Linear(2, 2).requires_grad_(False)
        with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
            SF.validation_gradient(model, torch.randn(2, 2), torch.tensor([0, 1]))
