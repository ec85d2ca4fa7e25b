"""Rules of ``functional.saflex_targets`` beyond the paper's: the margin rules and the gain rules.

The paper rule's own behaviour is pinned in ``test_functional.py``; here it is checked only to stay exactly the
paper's rule (docs/method.md#rule-paper) when the new ``beta=None`` default is used.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import saflex_data.functional as SF


def _paper_reference(pi, targets, beta, tau, gumbel=None):
    """The paper's rule (docs/method.md#rule-paper), written out: batch_max normalisation, bonus, Gumbel-softmax (or
    argmax), weight on raw Π."""
    k = pi.shape[1]
    y_aug = F.one_hot(targets, k).to(pi.dtype)
    score = pi / pi.abs().amax(-1).mean() + beta * y_aug
    if tau is None:
        labels = F.one_hot(score.argmax(-1), k).to(pi.dtype)
    else:
        labels = torch.softmax((score + gumbel) / tau, -1)
    return ((labels * pi).sum(-1) >= 0).to(pi.dtype), labels


def _planted(seed: int = 0, b: int = 64, k: int = 5, wrong: int = 8, shift: float = 3.0):
    """Π with a batch-global class direction, and ``wrong`` samples whose upstream label clearly loses."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randint(0, k, (b,), generator=g)
    pi = torch.randn(b, k, generator=g, dtype=torch.float64) * 0.3
    pi[torch.arange(b), true] += 1.5  # the true class has the larger gain
    pi = pi + torch.linspace(0.0, shift, k, dtype=torch.float64)  # batch-global direction: last class wins raw
    up = true.clone()
    up[:wrong] = (true[:wrong] + 1) % k
    return pi, up, true


class TestStandardize:
    def test_columns_have_zero_mean_and_unit_rms(self):
        pi = torch.randn(50, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 7 + 3
        z = SF.standardize_inner_products(pi)
        torch.testing.assert_close(z.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(z.pow(2).mean(0), torch.ones(4, dtype=torch.float64))

    def test_invariant_to_scale_and_per_class_shift(self):
        pi = torch.randn(20, 3, generator=torch.Generator().manual_seed(2))
        moved = pi * 1e-4 + torch.tensor([5.0, -1.0, 0.3]) * 1e-4
        torch.testing.assert_close(SF.standardize_inner_products(moved), SF.standardize_inner_products(pi),
                                   atol=1e-3, rtol=1e-3)

    def test_single_sample_and_constant_column_give_zeros(self):
        assert SF.standardize_inner_products(torch.tensor([[0.3, -0.2]])).abs().max() == 0
        z = SF.standardize_inner_products(torch.tensor([[1.0, 2.0], [1.0, 3.0], [1.0, 4.0]]))
        assert z[:, 0].abs().max() == 0 and z[:, 1].abs().max() > 0


class TestWeightScores:
    def test_paper_score_is_the_upstream_gain(self):
        pi = torch.tensor([[0.2, -0.1, -0.1], [-0.3, 0.4, -0.1]])
        torch.testing.assert_close(SF.weight_scores(pi, torch.tensor([0, 0]), rule="paper"), torch.tensor([0.2, -0.3]))

    def test_margin_score_is_non_positive_and_zero_for_the_best_class(self):
        pi, up, true = _planted()
        m = SF.weight_scores(pi, up, rule="margin")
        assert bool((m <= 0).all())
        z = SF.standardize_inner_products(pi)
        torch.testing.assert_close(m[z.argmax(-1) == up], torch.zeros(int((z.argmax(-1) == up).sum()),
                                                                        dtype=torch.float64))

    def test_soft_targets_weight_the_columns(self):
        pi = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
        s = SF.weight_scores(pi, torch.tensor([[0.5, 0.5], [1.0, 0.0]]), rule="paper")
        torch.testing.assert_close(s, torch.tensor([0.0, -1.0]))

    def test_bad_rule_is_refused(self):
        with pytest.raises(ValueError, match="rule must be one of"):
            SF.weight_scores(torch.zeros(2, 3), torch.tensor([0, 1]), rule="magic")


class TestMarginRule:
    def test_drops_the_planted_wrong_labels_despite_a_global_direction(self):
        pi, up, true = _planted()
        w, y = SF.saflex_targets(pi, up, rule="margin", beta=1.0)
        assert w[:8].sum() == 0  # every wrong label dropped
        assert w[8:].mean() > 0.8  # most right labels kept
        torch.testing.assert_close(y, F.one_hot(up, 5).to(torch.float64))  # never relabels

    def test_paper_rule_is_fooled_by_the_global_direction(self):
        # The contrast the margin rule exists for: raw argmax sends most samples to the globally winning class.
        pi, up, true = _planted()
        _, y = SF.saflex_targets(pi, up, rule="paper", beta=0.0, tau=None)
        assert (y.argmax(-1) == 4).float().mean() > 0.6

    def test_weight_is_one_exactly_when_margin_at_least_minus_beta(self):
        pi, up, _ = _planted(seed=3)
        for beta in (0.0, 0.5, 2.0):
            w, _ = SF.saflex_targets(pi, up, rule="margin", beta=beta)
            m = SF.weight_scores(pi, up, rule="margin")
            torch.testing.assert_close(w, (m >= -beta).to(torch.float64))

    def test_default_beta_and_single_sample(self):
        pi, up, _ = _planted(seed=4)
        torch.testing.assert_close(SF.saflex_targets(pi, up, rule="margin")[0],
                                   SF.saflex_targets(pi, up, rule="margin", beta=1.5)[0])
        assert not torch.equal(SF.saflex_targets(pi, up, rule="margin", beta=0.2)[0],
                               SF.saflex_targets(pi, up, rule="margin", beta=1.5)[0])
        w, y = SF.saflex_targets(torch.tensor([[0.1, -0.4]]), torch.tensor([1]), rule="margin")
        assert w.tolist() == [1.0] and y.tolist() == [[0.0, 1.0]]  # one sample carries no batch contrast

    def test_invariant_to_the_scale_of_pi(self):
        pi, up, _ = _planted(seed=5)
        a = SF.saflex_targets(pi, up, rule="margin")
        b = SF.saflex_targets(pi * 1e-7, up, rule="margin")
        torch.testing.assert_close(a, b)

    def test_dtype_kept(self):
        w, y = SF.saflex_targets(torch.randn(6, 3, dtype=torch.float64), torch.zeros(6, dtype=torch.long),
                                 rule="margin")
        assert w.dtype == y.dtype == torch.float64


class TestMarginRelabelRule:
    def test_relabels_planted_wrong_labels_to_the_true_class(self):
        pi, up, true = _planted()
        w, y = SF.saflex_targets(pi, up, rule="margin_relabel", beta=1.0, tau=None)
        assert bool((w == 1).all())
        assert (y.argmax(-1)[:8] == true[:8]).float().mean() >= 0.75
        assert (y.argmax(-1)[8:] == up[8:]).float().mean() > 0.8

    def test_relabels_only_when_another_class_wins_by_beta(self):
        pi, up, _ = _planted(seed=6)
        z = SF.standardize_inner_products(pi)
        _, y = SF.saflex_targets(pi, up, rule="margin_relabel", beta=0.7, tau=None)
        others = z.clone()
        others[torch.arange(len(up)), up] = -torch.inf
        expected = (others.amax(-1) > z[torch.arange(len(up)), up] + 0.7)
        assert torch.equal(y.argmax(-1) != up, expected)

    def test_gumbel_is_reproducible_with_a_generator(self):
        pi, up, _ = _planted(seed=7)
        a = SF.saflex_targets(pi, up, rule="margin_relabel", generator=torch.Generator().manual_seed(0))
        b = SF.saflex_targets(pi, up, rule="margin_relabel", generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(a, b)


class TestMarginFixRule:
    def test_is_margin_plus_relabelling_of_clear_winners(self):
        pi, up, _ = _planted(seed=9)
        beta = 1.0
        z = SF.standardize_inner_products(pi)
        rows = torch.arange(len(up))
        flagged = z[rows, up] - z.amax(-1) < -beta
        top2 = z.topk(2, -1).values
        clear = top2[:, 0] - top2[:, 1] >= beta / 2
        w, y = SF.saflex_targets(pi, up, rule="margin_fix", beta=beta)
        w_margin, _ = SF.saflex_targets(pi, up, rule="margin", beta=beta)
        assert torch.equal(w_margin, (~flagged).double())
        assert torch.equal(w, (~flagged | clear).double())
        expected = torch.where(flagged & clear, z.argmax(-1), up)
        assert torch.equal(y, F.one_hot(expected, pi.shape[1]).double())

    def test_relabels_planted_wrong_labels_to_the_true_class(self):
        pi, up, true = _planted()
        w, y = SF.saflex_targets(pi, up, rule="margin_fix")
        relabeled = (y.argmax(-1) != up) & (w == 1)
        assert relabeled[:8].sum() >= 4 and not relabeled[8:].any()
        assert torch.equal(y.argmax(-1)[relabeled], true[relabeled])
        assert SF.default_beta("margin_fix") == 1.5

    def test_soft_upstream_labels_are_kept_or_replaced_whole(self):
        pi, up, _ = _planted(seed=10)
        soft = F.one_hot(up, pi.shape[1]).double() * 0.8 + 0.2 / pi.shape[1]
        w, y = SF.saflex_targets(pi, soft, rule="margin_fix", beta=0.5)
        kept = (y == soft).all(-1)
        assert bool((kept | (y.max(-1).values == 1)).all()) and w.shape == (len(up),)


class TestPaperRuleUnchanged:
    @pytest.mark.parametrize("tau", [None, 0.01])
    def test_default_beta_is_the_paper_rule(self, tau):
        pi, up, _ = _planted(seed=8)
        gen_seed = 11
        w, y = SF.saflex_targets(pi, up, tau=tau, rule="paper", generator=torch.Generator().manual_seed(gen_seed))
        gumbel = None
        if tau is not None:
            u = torch.rand(pi.shape, generator=torch.Generator().manual_seed(gen_seed), dtype=torch.float64)
            gumbel = -torch.log(-torch.log(u.clamp(torch.finfo(torch.float64).tiny, 1.0 - 1e-7)))
        w_ref, y_ref = _paper_reference(pi, up, 0.5, tau, gumbel)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(w, w_ref)


class TestErrors:
    def test_rule_message_lists_all_rules(self):
        rules = r"\('paper', 'centered', 'margin', 'margin_relabel', 'margin_fix', 'gain', 'gain_auto', 'gain_loss'\)"
        with pytest.raises(ValueError, match=f"rule must be one of {rules}"):
            SF.saflex_targets(torch.zeros(2, 3), torch.tensor([0, 1]), rule="margins")

    def test_beta_must_be_finite_or_none(self):
        with pytest.raises(ValueError, match="beta must be a finite float or None"):
            SF.saflex_targets(torch.zeros(2, 3), torch.tensor([0, 1]), rule="margin", beta=float("inf"))

    def test_normalize_checked_for_every_rule(self):
        with pytest.raises(ValueError, match="normalize must be one of"):
            SF.saflex_targets(torch.zeros(2, 3), torch.tensor([0, 1]), rule="margin", normalize="l2")


class TestOwnLabelGain:
    def test_formula_on_a_small_example(self):
        pi = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
        torch.testing.assert_close(SF.own_label_gain(pi, torch.tensor([2, 0])), torch.tensor([1.0, -1.0]))
        soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
        torch.testing.assert_close(SF.own_label_gain(pi, soft), torch.tensor([-0.5, 2.0]))

    def test_does_not_fade_when_the_sample_is_fitted(self):
        # Π_ik = u_ik - p_iᵀu_i: with p_i → onehot(y_i), y_iᵀΠ_i → 0 but the own-label gain stays u_y - mean_k u_k.
        u = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
        p = torch.tensor([[1 - 2e-9, 1e-9, 1e-9]], dtype=torch.float64)
        pi = u - (p * u).sum(-1, keepdim=True)
        y = torch.tensor([0])
        assert abs(float(SF.weight_scores(pi, y, rule="paper"))) < 1e-8
        torch.testing.assert_close(SF.own_label_gain(pi, y), u[:, 0] - u.mean(-1))


class TestGainRules:
    PI = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0], [2.0, 0.0, 1.0], [0.0, 3.0, 0.0]])
    Y = torch.tensor([2, 0, 0, 1])  # own-label gains 1, -1, 1, 2

    def test_gain_score_is_the_batch_z_score_of_the_own_label_gain(self):
        gain = torch.tensor([1.0, -1.0, 1.0, 2.0])
        ref = (gain - gain.mean()) / gain.std(unbiased=False)
        torch.testing.assert_close(SF.weight_scores(self.PI, self.Y, rule="gain"), ref)
        torch.testing.assert_close(SF.weight_scores(self.PI, self.Y, rule="gain_auto"), ref)

    def test_gain_keeps_exactly_the_scores_at_least_minus_beta(self):
        score = SF.weight_scores(self.PI, self.Y, rule="gain")  # [0, -1.633, 0, 1.225] (z-scores)
        for beta in (0.5, 1.5, 2.0):
            w, y = SF.saflex_targets(self.PI, self.Y, rule="gain", beta=beta)
            torch.testing.assert_close(w, (score >= -beta).float())
            torch.testing.assert_close(y, F.one_hot(self.Y, 3).float())  # never relabels
        assert SF.saflex_targets(self.PI, self.Y, rule="gain", beta=1.5)[0].tolist() == [1.0, 0.0, 1.0, 1.0]

    def test_gain_drops_samples_whose_own_label_helps_far_less_than_the_batch(self):
        # Every upstream label is its row's best class, so no label is "wrong"; two samples barely help.
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 4, (32,), generator=g)
        pi = torch.randn(32, 4, generator=g, dtype=torch.float64) * 0.05
        pi[torch.arange(32), y] += 1.0
        pi[torch.arange(2), y[:2]] -= 0.9  # still the best class of the row, with a tenth of the usual gain
        assert bool((pi.argmax(-1) == y).all())
        w, _ = SF.saflex_targets(pi, y, rule="gain")
        assert w[:2].tolist() == [0.0, 0.0] and w[2:].sum() == 30

    def test_gain_loss_adds_the_z_score_of_the_model_log_likelihood(self):
        logits = torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
        logp = torch.log_softmax(logits, -1)[torch.arange(4), self.Y]
        z = lambda v: (v - v.mean()) / v.std(unbiased=False)  # noqa: E731
        ref = SF.weight_scores(self.PI, self.Y, rule="gain") + z(logp)
        torch.testing.assert_close(SF.weight_scores(self.PI, self.Y, rule="gain_loss", logits=logits), ref)
        w, _ = SF.saflex_targets(self.PI, self.Y, rule="gain_loss", logits=logits, beta=1.0)
        torch.testing.assert_close(w, (ref >= -1.0).float())

    def test_logits_are_ignored_by_the_other_rules(self):
        logits = torch.randn(4, 3)
        for rule in ("margin", "gain", "paper"):
            a = SF.saflex_targets(self.PI, self.Y, rule=rule, tau=None)
            b = SF.saflex_targets(self.PI, self.Y, rule=rule, tau=None, logits=logits)
            torch.testing.assert_close(a, b)

    def test_default_betas(self):
        assert (SF.default_beta("gain"), SF.default_beta("gain_auto"), SF.default_beta("gain_loss")) == (1.5, 0.7, 2.0)

    def test_dtype_kept(self):
        w, y = SF.saflex_targets(self.PI.double(), self.Y, rule="gain")
        assert w.dtype == y.dtype == torch.float64


class TestAdaptiveKeep:
    def test_two_separated_groups_drop_the_low_one(self):
        keep = SF.adaptive_keep(torch.tensor([0.0, 10.0, 0.1, 10.1, 9.9]), 0.7)
        assert keep.tolist() == [False, True, False, True, True]

    def test_pinned_separation(self):
        # Otsu's split of [0, 1, 2, 6]: low = {0, 1, 2}; σ_b² = 3/4 · 1/4 · (1 - 6)² = 4.6875, σ² = 5.1875 → η = 0.904.
        scores = torch.tensor([0.0, 1.0, 2.0, 6.0])
        assert SF.adaptive_keep(scores, 0.90).tolist() == [False, False, False, True]
        assert SF.adaptive_keep(scores, 0.91).tolist() == [True] * 4

    def test_one_group_keeps_everything(self):
        g = torch.Generator().manual_seed(0)
        assert bool(SF.adaptive_keep(torch.randn(512, generator=g), 0.7).all())
        assert bool(SF.adaptive_keep(torch.zeros(5), 0.0).all())
        assert SF.adaptive_keep(torch.tensor([3.0]), 0.0).tolist() == [True]

    def test_gain_auto_adapts_to_the_share_of_bad_samples(self):
        g = torch.Generator().manual_seed(1)
        for bad in (8, 32, 48):
            pi = torch.randn(64, 3, generator=g, dtype=torch.float64) * 0.1
            y = torch.zeros(64, dtype=torch.long)
            pi[:bad, 0] -= 2.0  # the bad samples' own label hurts
            w, _ = SF.saflex_targets(pi, y, rule="gain_auto")
            assert w[:bad].sum() == 0 and w[bad:].sum() == 64 - bad


class TestGainErrors:
    def test_gain_loss_needs_logits(self):
        msg = r"rule='gain_loss' combines Π with the model's own loss and needs logits=<the augmented rows' detached " \
              r"logits, shape \(2, 3\)>, but got logits=None\."
        with pytest.raises(ValueError, match=msg):
            SF.saflex_targets(torch.zeros(2, 3), torch.tensor([0, 1]), rule="gain_loss")
        with pytest.raises(ValueError, match=msg):
            SF.weight_scores(torch.zeros(2, 3), torch.tensor([0, 1]), rule="gain_loss")

    def test_logits_shape_checked(self):
        msg = r"logits must be a float tensor of the shape of pi \(2, 3\), but got shape \(2, 4\) and dtype " \
              r"torch.float32\."
        with pytest.raises(ValueError, match=msg):
            SF.saflex_targets(torch.zeros(2, 3), torch.tensor([0, 1]), rule="gain_loss", logits=torch.zeros(2, 4))

    def test_gain_auto_beta_is_a_share(self):
        msg = r"beta for rule='gain_auto' is a share of variance in \[0, 1\], but got 1.5\."
        with pytest.raises(ValueError, match=msg):
            SF.saflex_targets(torch.zeros(2, 3), torch.tensor([0, 1]), rule="gain_auto", beta=1.5)
