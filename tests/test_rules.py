"""Rules of ``functional.saflex_targets`` beyond the paper's: ``margin``, ``margin_relabel``, ``margin_fix``.

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
        rules = r"\('paper', 'centered', 'margin', 'margin_relabel', 'margin_fix'\)"
        with pytest.raises(ValueError, match=f"rule must be one of {rules}"):
            SF.saflex_targets(torch.zeros(2, 3), torch.tensor([0, 1]), rule="margins")

    def test_beta_must_be_finite_or_none(self):
        with pytest.raises(ValueError, match="beta must be a finite float or None"):
            SF.saflex_targets(torch.zeros(2, 3), torch.tensor([0, 1]), rule="margin", beta=float("inf"))

    def test_normalize_checked_for_every_rule(self):
        with pytest.raises(ValueError, match="normalize must be one of"):
            SF.saflex_targets(torch.zeros(2, 3), torch.tensor([0, 1]), rule="margin", normalize="l2")
