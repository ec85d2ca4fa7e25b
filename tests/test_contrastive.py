"""Tests of saflex_data.contrastive: SAFLEX for the symmetric CLIP loss (FLYP), docs/method.md#contrastive.

The reference below is deliberately slow and obvious: float64, one ``torch.autograd.grad`` per (image, text) entry of
the logit matrix, and the zero-shot validation gradient written out by hand.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saflex_data.contrastive import SaflexContrastiveLoss, clip_logits, clip_loss
from saflex_data.functional import Rule, saflex_targets


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: intra-op threads only add synchronisation (and contend on a shared CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# A tiny two-tower model with real attention (F.scaled_dot_product_attention) in both towers
# ---------------------------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 2, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return x + self.proj(out.transpose(1, 2).reshape(n, t, d))


class TinyImageTower(nn.Module):
    """1×8×8 images → 4 patches of 4×4 → one attention block → mean pool → embedding."""

    def __init__(self, dim: int = 8, embed: int = 6, batchnorm: bool = False) -> None:
        super().__init__()
        self.patch = nn.Linear(16, dim)
        self.bn = nn.BatchNorm1d(dim) if batchnorm else nn.Identity()
        self.attn = _Attention(dim)
        self.head = nn.Linear(dim, embed)

    def forward(self, images: Tensor) -> Tensor:
        patches = F.unfold(images, 4, stride=4).transpose(1, 2)
        h = self.patch(patches)
        h = self.bn(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.attn(torch.tanh(h)).mean(1))


class TinyTextTower(nn.Module):
    """Token ids (N, 3) → embedding + position → one causal attention block → last token → embedding."""

    def __init__(self, vocab: int = 12, dim: int = 8, embed: int = 6) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.1 * torch.randn(3, dim))
        self.attn = _Attention(dim, causal=True)
        self.head = nn.Linear(dim, embed)

    def forward(self, texts: Tensor) -> Tensor:
        return self.head(self.attn(self.tokens(texts) + self.position)[:, -1])


class TinyCLIP(nn.Module):
    """The same towers behind open_clip's interface, with a log logit scale of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.visual, self.text = TinyImageTower(), TinyTextTower()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        return self.visual(images)

    def encode_text(self, texts: Tensor, normalize: bool = False) -> Tensor:
        return self.text(texts)


NUM_CLASSES = 5
# Class k's prompt is the token sequence (k, k + 5, 11): distinct, shared end token.
PROMPTS = torch.stack([torch.arange(NUM_CLASSES), torch.arange(NUM_CLASSES) + 5, torch.full((NUM_CLASSES,), 11)], 1)


def _problem(seed: int, batch: int = 6, num_val: int = 10, dtype: torch.dtype = torch.float64, batchnorm=False):
    """Towers, a batch of (image, class prompt) pairs with half of it augmented (noisy), and one validation batch."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    towers = (TinyImageTower(batchnorm=batchnorm).to(dtype), TinyTextTower().to(dtype))
    templates = torch.randn(NUM_CLASSES, 1, 8, 8, generator=g, dtype=dtype)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    images = templates[labels] + 0.3 * torch.randn(batch, 1, 8, 8, generator=g, dtype=dtype)
    is_augmented = torch.arange(batch) >= batch // 2
    images[is_augmented] += 1.5 * torch.randn(int(is_augmented.sum()), 1, 8, 8, generator=g, dtype=dtype)
    val_labels = torch.randint(0, NUM_CLASSES, (num_val,), generator=g)
    val_images = templates[val_labels] + 0.3 * torch.randn(num_val, 1, 8, 8, generator=g, dtype=dtype)
    return towers, images, PROMPTS[labels], is_augmented, (val_images, val_labels)


# ---------------------------------------------------------------------------------------------------------------
# The slow float64 reference
# ---------------------------------------------------------------------------------------------------------------
def _reference_logits(image_tower, text_tower, log_scale: Tensor, images: Tensor, texts: Tensor) -> Tensor:
    a = image_tower(images)
    b = text_tower(texts)
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return log_scale.exp() * a @ b.T


def _reference_val_grad(image_tower, text_tower, log_scale, val_images, val_labels, params, temperature=1.0):
    logits = _reference_logits(image_tower, text_tower, log_scale, val_images, PROMPTS)
    return torch.autograd.grad(temperature * F.cross_entropy(logits / temperature, val_labels), params)


def _reference_pi(image_tower, text_tower, log_scale, images, texts, val_grad, params) -> Tensor:
    """Π_ij = <∇θ(-log softmax(L_i)_j), g>, one backward per entry."""
    logits = _reference_logits(image_tower, text_tower, log_scale, images, texts)
    log_p = torch.log_softmax(logits, 1)
    pi = torch.zeros(logits.shape, dtype=torch.float64)
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            grads = torch.autograd.grad(-log_p[i, j], params, retain_graph=True, allow_unused=True)
            pi[i, j] = sum((gr * gv).sum() for gr, gv in zip(grads, val_grad, strict=False) if gr is not None)
    return pi


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def _val_loss(criterion: SaflexContrastiveLoss, params: dict[str, Tensor], val) -> Tensor:
    """The zero-shot validation loss at the given parameters (for the one-step check)."""
    logits = torch.func.functional_call(criterion.towers, params, (val[0],))
    return F.cross_entropy(logits, val[1])


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------
class TestClipLoss:
    def test_matches_open_clip_formula(self):
        torch.manual_seed(0)
        logits = torch.randn(5, 5, dtype=torch.float64)
        labels = torch.arange(5)
        expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        torch.testing.assert_close(clip_loss(logits), expected, rtol=0, atol=0)

    def test_one_hot_targets_and_unit_weights_equal_plain(self):
        logits = torch.randn(4, 4, dtype=torch.float64)
        one_hot = torch.eye(4, dtype=torch.float64)
        torch.testing.assert_close(clip_loss(logits, one_hot, torch.ones(4)), clip_loss(logits))

    def test_fixed_normaliser(self):
        logits = torch.randn(4, 4, dtype=torch.float64)
        weights = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
        rows = F.cross_entropy(logits, torch.arange(4), reduction="none")
        expected = ((rows * weights).sum() / 4 + F.cross_entropy(logits.T, torch.arange(4))) / 2
        torch.testing.assert_close(clip_loss(logits, weights=weights), expected)

    def test_clip_logits(self):
        a, b = torch.randn(3, 4), torch.randn(2, 4)
        expected = 2.0 * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
        torch.testing.assert_close(clip_logits(a, b, torch.tensor(math.log(2.0))), expected)

    def test_non_square_raises(self):
        with pytest.raises(ValueError, match=r"logits must be a square matrix \(B, B\).*\(3, 4\)"):
            clip_loss(torch.randn(3, 4))


class TestInnerProducts:
    @pytest.mark.parametrize("interface", ["pair", "encode_methods"])
    def test_pi_matches_float64_reference(self, interface):
        (image_tower, text_tower), images, texts, _, val = _problem(seed=0)
        if interface == "pair":
            model = (image_tower, text_tower)
        else:
            model = TinyCLIP().double()
            model.visual, model.text = image_tower, text_tower
        criterion = SaflexContrastiveLoss(model, [val], PROMPTS)
        log_scale = criterion.towers.log_scale()
        params = [image_tower.parameters(), text_tower.parameters()]
        params = [p for group in params for p in group] + [log_scale]
        val_grad = _reference_val_grad(image_tower, text_tower, log_scale, *val, params)
        expected = _reference_pi(image_tower, text_tower, log_scale, images, texts, val_grad, params)
        pi = criterion.inner_products(images, texts)
        assert pi.dtype == torch.float64 and pi.shape == (6, 6)
        assert _relative_error(pi, expected) <= 1e-10
        # Rows sum to zero under the softmax: Σ_j p_ij Π_ij = 0 (docs/method.md#zero-mean).
        p = torch.softmax(_reference_logits(image_tower, text_tower, log_scale, images, texts), 1).detach()
        torch.testing.assert_close((p * pi).sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)

    @pytest.mark.parametrize("temperature", [1.0, 3.0])
    def test_validation_gradient_matches_reference_and_leaves_grad_alone(self, temperature):
        (image_tower, text_tower), _, _, _, val = _problem(seed=1)
        image_tower.head.weight.requires_grad_(False)  # frozen parameters are left out
        criterion = SaflexContrastiveLoss(
            (image_tower, text_tower), [val], PROMPTS.clone(), val_temperature=temperature
        )
        g = criterion.refresh_validation_gradient()
        named = dict(criterion.towers.named_parameters())
        assert "image_encoder.head.weight" not in g and "logit_scale" in g
        expected = _reference_val_grad(
            image_tower, text_tower, criterion.logit_scale, *val, [named[n] for n in g], temperature
        )
        for (name, actual), ref in zip(g.items(), expected, strict=False):
            torch.testing.assert_close(actual, ref, rtol=1e-12, atol=1e-14, msg=name)
        assert all(p.grad is None for p in named.values())

    def test_single_pass_equals_jvp(self):
        towers, images, texts, is_augmented, val = _problem(seed=2, batch=8)
        losses, targets = [], []
        for method in ("jvp", "single_pass"):
            criterion = SaflexContrastiveLoss(towers, [val], PROMPTS, method=method,
                                              rule=Rule("paper", beta=0.5, tau=None), init_logit_scale=2.0)
            losses.append(criterion(images, texts, is_augmented))
            targets.append(criterion.last_step["targets"])
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
        torch.testing.assert_close(targets[0], targets[1])


class TestOneStep:
    @pytest.mark.parametrize("seed", range(10))
    def test_first_order_prediction_and_improvement(self, seed):
        """One SGD step with SAFLEX's weights and labels lowers the zero-shot validation loss more than the diagonal
        labels, by the first-order amount -lr/(2B) Σ_aug (w_i y_iᵀΠ_i - Π_ii) (within 5%)."""
        lr = 1e-4
        towers, images, texts, is_augmented, val = _problem(seed=seed, batch=12)
        criterion = SaflexContrastiveLoss(towers, [val], PROMPTS, rule=Rule("paper", beta=0.5, tau=None))
        named = {n: p for n, p in criterion.towers.named_parameters() if p.requires_grad}
        params = list(named.values())

        def stepped(loss: Tensor) -> dict[str, Tensor]:
            grads = torch.autograd.grad(loss, params)
            return {n: p.detach() - lr * g for (n, p), g in zip(named.items(), grads, strict=False)}

        theta_saflex = stepped(criterion(images, texts, is_augmented))
        criterion.enabled = False
        theta_upstream = stepped(criterion(images, texts, is_augmented))
        with torch.no_grad():
            measured = float(_val_loss(criterion, theta_saflex, val) - _val_loss(criterion, theta_upstream, val))

        pi = criterion.inner_products(images, texts)
        augmented = is_augmented.nonzero().squeeze(1)
        weights, labels = saflex_targets(pi[augmented], augmented, beta=0.5, tau=None, rule="paper")
        gain = (weights * (labels * pi[augmented]).sum(1) - pi[augmented, augmented]).sum()
        predicted = float(-lr / (2 * len(images)) * gain)
        assert predicted < 0
        assert measured < 0, f"seed {seed}: SAFLEX's step lowered the validation loss less ({measured:.3e})"
        assert abs(measured - predicted) <= 0.05 * abs(predicted), (seed, measured, predicted)
        print(f"seed {seed}: measured {measured:.6e}, predicted {predicted:.6e}, rel. diff "
              f"{abs(measured - predicted) / abs(predicted):.2e}")


class TestSaflexContrastiveLoss:
    @pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy, pickle.dumps])
    def test_copies_are_refused(self, copier):
        towers, *_, val = _problem(seed=3)
        criterion = SaflexContrastiveLoss(towers, [val], PROMPTS)
        with pytest.raises(TypeError, match=r"SaflexContrastiveLoss cannot be (copied|pickled) .* Build a new loss on "
                                            r"the copy's model"):
            copier(criterion)

    def test_disabled_is_plain_clip_loss_exactly(self):
        towers, images, texts, is_augmented, val = _problem(seed=3)
        criterion = SaflexContrastiveLoss(towers, [val], PROMPTS, enabled=False)
        plain = clip_loss(clip_logits(towers[0](images), towers[1](texts), criterion.logit_scale))
        assert torch.equal(criterion(images, texts, is_augmented), plain)
        assert criterion.val_grad is None and criterion.step == 0

    def test_no_augmented_rows_is_plain_clip_loss(self):
        towers, images, texts, _, val = _problem(seed=3)
        criterion = SaflexContrastiveLoss(towers, [val], PROMPTS)
        plain = clip_loss(clip_logits(towers[0](images), towers[1](texts), criterion.logit_scale))
        assert torch.equal(criterion(images, texts, torch.zeros(6, dtype=torch.bool)), plain)
        assert torch.equal(criterion(images, texts), plain)

    def test_loss_equals_weighted_formula_and_clean_rows_keep_diagonal(self):
        towers, images, texts, is_augmented, val = _problem(seed=4, batch=8)
        criterion = SaflexContrastiveLoss(towers, [val], PROMPTS, rule=Rule("paper", beta=0.0, tau=None))
        loss = criterion(images, texts, is_augmented)
        pi = criterion.inner_products(images, texts)
        aug = is_augmented.nonzero().squeeze(1)
        weights, labels = saflex_targets(pi[aug], aug, beta=0.0, tau=None, rule="paper")
        targets, w = torch.eye(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
        targets[aug], w[aug] = labels, weights
        logits = clip_logits(towers[0](images), towers[1](texts), criterion.logit_scale)
        torch.testing.assert_close(loss, clip_loss(logits, targets, w))
        torch.testing.assert_close(criterion.last_step["targets"][~is_augmented], torch.eye(8)[~is_augmented].double())
        stats = criterion.stats
        assert stats["augmented_fraction"] == 0.5 and stats["step"] == 1.0
        assert stats["kept_fraction"] == float(weights.mean())
        chosen_text = texts[labels.argmax(1)]
        relabeled = (chosen_text != texts[aug]).any(1)  # another column with the same prompt is no relabel
        assert stats["relabeled_fraction"] == float(relabeled.float().mean())
        assert stats["relabeled_fraction"] > 0

    def test_backward_reaches_both_towers_and_logit_scale(self):
        towers, images, texts, is_augmented, val = _problem(seed=5, dtype=torch.float32)
        criterion = SaflexContrastiveLoss(towers, [val], PROMPTS)
        criterion(images, texts, is_augmented).backward()
        assert criterion.logit_scale.grad is not None and torch.isfinite(criterion.logit_scale.grad)
        assert all(p.grad is not None for t in towers for p in t.parameters())
        assert [n for n, _ in criterion.named_parameters()] == ["logit_scale"]
        assert criterion.state_dict().keys() == {"logit_scale", "_extra_state"}

    def test_val_every_and_cycling_loader(self):
        towers, images, texts, is_augmented, val = _problem(seed=6)
        draws = []

        class Loader:
            def __iter__(self):
                for k in range(2):
                    draws.append(k)
                    yield val

        criterion = SaflexContrastiveLoss(towers, Loader(), PROMPTS, val_every=2)
        for _ in range(5):
            criterion(images, texts, is_augmented)
        assert draws == [0, 1, 0]  # steps 0, 2, 4 refresh g; the loader is restarted when it runs out

    def test_batchnorm_tower_runs_and_only_the_training_forward_updates_stats(self):
        towers, images, texts, is_augmented, val = _problem(seed=7, batchnorm=True)
        bn = towers[0].bn
        reference = TinyImageTower(batchnorm=True).double()
        reference.load_state_dict(towers[0].state_dict())
        for method in ("jvp", "single_pass"):
            criterion = SaflexContrastiveLoss(towers, [val], PROMPTS, method=method)
            criterion(images, texts, is_augmented).backward()
            reference(images)  # one plain training forward
            torch.testing.assert_close(bn.running_mean, reference.bn.running_mean)
            torch.testing.assert_close(bn.running_var, reference.bn.running_var)
            assert int(bn.num_batches_tracked) == int(reference.bn.num_batches_tracked)
            assert towers[0].training

    def test_modes_are_restored_module_by_module(self):
        towers, images, texts, is_augmented, val = _problem(seed=7, batchnorm=True)
        towers[0].eval()  # e.g. a frozen image tower
        expected = [m.training for t in towers for m in t.modules()]
        criterion = SaflexContrastiveLoss(towers, [val], PROMPTS)
        criterion(images, texts, is_augmented)
        assert [m.training for t in towers for m in t.modules()] == expected

    def test_seed_makes_gumbel_labels_reproducible(self):
        towers, images, texts, is_augmented, val = _problem(seed=8)
        out = []
        for _ in range(2):
            criterion = SaflexContrastiveLoss(towers, [val], PROMPTS, seed=3, rule=Rule("paper", beta=0.0))
            criterion(images, texts, is_augmented)
            out.append(criterion.last_step["targets"])
        torch.testing.assert_close(out[0], out[1])

    def test_state_dict_round_trip(self):
        towers, images, texts, is_augmented, val = _problem(seed=9)
        criterion = SaflexContrastiveLoss(towers, [val], PROMPTS, val_every=3)
        criterion(images, texts, is_augmented)
        restored = SaflexContrastiveLoss(towers, [val], PROMPTS, val_every=3)
        restored.load_state_dict(criterion.state_dict())
        assert restored.step == 1 and restored.val_grad is not None

    def test_repr(self):
        towers, *_, val = _problem(seed=0)
        text = repr(SaflexContrastiveLoss(towers, [val], PROMPTS, rule=Rule("paper", beta=0.25)))
        assert "beta=0.25" in text and "num_classes=5" in text and "method='jvp'" in text


class TestErrors:
    def _args(self):
        towers, images, texts, is_augmented, val = _problem(seed=0)
        return towers, [val], images, texts, is_augmented

    @pytest.mark.parametrize(
        "model, match",
        [
            (nn.Linear(2, 2), r"model must be an nn.Module with encode_image/encode_text .* but got Linear"),
            ((nn.Linear(2, 2), lambda t: t), r"model given as a pair must be \(image_encoder, text_encoder\)"),
            ((nn.Linear(2, 2),), r"model given as a pair .* but got \['Linear'\]"),
        ],
    )
    def test_bad_model(self, model, match):
        with pytest.raises(TypeError, match=match):
            SaflexContrastiveLoss(model, [], PROMPTS)

    @pytest.mark.parametrize(
        "kwargs, error, match",
        [
            ({"method": "last_layer"}, ValueError, r"method must be one of \('jvp', 'single_pass'\), but got 'last_"),
            ({"val_every": 0}, ValueError, r"val_every must be an int >= 1, but got 0"),
            ({"val_temperature": -1}, ValueError, r"val_temperature must be a float > 0 \(math.inf allowed\), but"),
            ({"rule": 3}, TypeError, r"rule must be a Rule or a rule name \(str\), but got int"),
            ({"prepare": 3}, TypeError, r"prepare must be a callable or None, but got int"),
        ],
    )
    def test_bad_options(self, kwargs, error, match):
        towers, val_loader, *_ = self._args()
        with pytest.raises(error, match=match):
            SaflexContrastiveLoss(towers, val_loader, PROMPTS, **kwargs)

    def test_bad_val_loader_and_prompts(self):
        towers, val_loader, images, texts, is_augmented = self._args()
        with pytest.raises(TypeError, match=r"val_loader must be an iterable of \(images, labels\) batches"):
            SaflexContrastiveLoss(towers, None, PROMPTS)
        with pytest.raises(ValueError, match=r"class_prompts must be a tensor .*at least 2.* but got \(1, 3\)"):
            SaflexContrastiveLoss(towers, val_loader, PROMPTS[:1])
        with pytest.raises(ValueError, match=r"val_loader yielded no batches"):
            SaflexContrastiveLoss(towers, [], PROMPTS)(images, texts, is_augmented)
        with pytest.raises(TypeError, match=r"val_loader must yield \(inputs, targets\) pairs, but it yielded Tensor"):
            SaflexContrastiveLoss(towers, [val_loader[0][0]], PROMPTS)(images, texts, is_augmented)
        bad_labels = [(val_loader[0][0], val_loader[0][1] + NUM_CLASSES)]
        with pytest.raises(ValueError, match=r"validation labels must be class indices \(V,\) into the 5 class_prompt"):
            SaflexContrastiveLoss(towers, bad_labels, PROMPTS)(images, texts, is_augmented)

    def test_bad_batch(self):
        towers, val_loader, images, texts, is_augmented = self._args()
        criterion = SaflexContrastiveLoss(towers, val_loader, PROMPTS)
        with pytest.raises(ValueError, match=r"images and texts must be tensors with the same batch size B"):
            criterion(images, texts[:3], is_augmented)
        with pytest.raises(ValueError, match=r"is_augmented must be a bool tensor of shape \(6,\), but got a tensor"):
            criterion(images, texts, is_augmented.long())
        with pytest.raises(ValueError, match=r"must return embeddings \(N, D\) of the same dimension D"):
            SaflexContrastiveLoss((towers[0], nn.Embedding(12, 3).double()), val_loader, PROMPTS)(images, texts[:, 0])


# ---------------------------------------------------------------------------------------------------------------
# open_clip (optional extra)
# ---------------------------------------------------------------------------------------------------------------
def _tiny_open_clip():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    vision_cfg = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16, "mlp_ratio": 2.0}
    text_cfg = {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    model = open_clip.CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg)
    tokenizer = open_clip.SimpleTokenizer(context_length=8)  # its BPE vocabulary ships in the wheel
    prompts = tokenizer([f"a photo of the digit {name}." for name in ["zero", "one", "two", "three"]])
    return model, prompts


class TestOpenClip:
    def test_forward_backward_cpu(self):
        model, prompts = _tiny_open_clip()
        g = torch.Generator().manual_seed(0)
        images = torch.randn(6, 3, 16, 16, generator=g)
        labels = torch.tensor([0, 1, 2, 3, 0, 1])
        val = [(torch.randn(8, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0]))]
        for method in ("jvp", "single_pass"):
            model.zero_grad(set_to_none=True)
            criterion = SaflexContrastiveLoss(model, val, prompts, method=method)
            assert list(criterion.parameters()) == []  # the model's logit_scale is used, not a new one
            loss = criterion(images, prompts[labels], torch.arange(6) >= 3)
            loss.backward()
            assert torch.isfinite(loss)
            assert model.logit_scale.grad is not None
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.visual.parameters())
            assert criterion.stats["augmented_fraction"] == 0.5

    def test_pi_matches_reference_in_eval_mode(self):
        """Eval-mode nn.MultiheadAttention takes a fused fast path without forward AD; the loss switches it off."""
        model, prompts = _tiny_open_clip()
        model = model.double().eval()
        g = torch.Generator().manual_seed(1)
        images = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
        texts = prompts[torch.tensor([0, 2, 3])]
        val_images, val_labels = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
        criterion = SaflexContrastiveLoss(model, [(val_images, val_labels)], prompts)
        pi = criterion.inner_products(images, texts)
        assert torch.backends.mha.get_fastpath_enabled()  # restored afterwards
        assert not any(m.training for m in model.modules())  # the validation pass left the modes alone

        params = [p for p in model.parameters() if p.requires_grad]
        val_logits = model.logit_scale.exp() * F.normalize(model.encode_image(val_images), dim=-1) @ F.normalize(
            model.encode_text(prompts), dim=-1
        ).T
        val_grad = torch.autograd.grad(F.cross_entropy(val_logits, val_labels), params, allow_unused=True)
        val_grad = [torch.zeros_like(p) if v is None else v for p, v in zip(params, val_grad, strict=False)]
        towers = (model.encode_image, model.encode_text)
        expected = _reference_pi(*towers, model.logit_scale, images, texts, val_grad, params)
        assert _relative_error(pi, expected) <= 1e-10


class TestTrainingLoop:
    def test_eval_mode_is_the_plain_clip_loss(self):
        towers, images, texts, is_augmented, val = _problem(seed=11)
        criterion = SaflexContrastiveLoss(towers, [val], PROMPTS)
        for tower in towers:
            tower.eval()
        loss = criterion(images, texts, is_augmented)
        assert torch.equal(loss, clip_loss(criterion.towers((images, texts))))
        assert criterion.step == 0 and criterion._val.drawn == 0

    @pytest.mark.parametrize("method", ["jvp", "single_pass"])
    def test_global_random_state_is_untouched(self, method):
        towers, images, texts, is_augmented, val = _problem(seed=12)
        before = torch.get_rng_state()
        criterion = SaflexContrastiveLoss(towers, [val], PROMPTS, method=method)
        criterion(images, texts, is_augmented).backward()
        assert torch.equal(torch.get_rng_state(), before)
