"""MixUp / CutMix / TabularCutMix: the recorded weights match the pixels/features, tags are true."""

from __future__ import annotations

import pytest
import torch

from saflex_data.batch import SaflexTarget
from saflex_data.mixing import CutMix, MixParams, MixUp, TabularCutMix


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def onehot(y: torch.Tensor, k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(y, k).float()


@pytest.mark.parametrize("batch", [1, 5, 8])
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
class TestMixUp:
    def test_pixels_and_labels_match_lam(self, batch: int, p: float) -> None:
        x = torch.randn(batch, 3, 4, 4)
        y = torch.arange(batch) % 4
        mix = MixUp(alpha=0.4, p=p, num_classes=4, generator=gen(1))
        params = mix.forward_parameters(x.shape)
        out, target = mix(x, y, params=params)
        lam = params.lam.view(-1, 1, 1, 1)
        mixed = params.mask
        assert torch.equal(target.is_augmented, mixed)
        assert torch.equal(out[~mixed], x[~mixed])  # clean rows are bit-identical
        expected = lam * x + (1 - lam) * x[params.perm]
        torch.testing.assert_close(out[mixed], expected[mixed])
        soft = params.lam[:, None] * onehot(y, 4) + (1 - params.lam[:, None]) * onehot(y[params.perm], 4)
        torch.testing.assert_close(target.labels, torch.where(mixed[:, None], soft, onehot(y, 4)))
        assert target.op.tolist() == [0 if m else -1 for m in mixed.tolist()]
        if p == 0.0 or batch == 1:
            assert not mixed.any()


class TestMixUpFeatures:
    def test_record_is_kornia_style(self) -> None:
        y = torch.tensor([0, 1, 2, 3])
        params = MixUp(num_classes=4, generator=gen()).forward_parameters((4, 2))
        rec = params.record(y)
        assert rec.shape == (4, 3)
        assert torch.equal(rec[:, 1], y[params.perm].float()) and torch.equal(rec[:, 2], params.lam)

    def test_same_on_batch_and_roll(self) -> None:
        params = MixUp(num_classes=2, same_on_batch=True, pairing="roll", generator=gen()).forward_parameters((6, 1))
        assert params.lam.unique().numel() == 1 and params.perm.tolist() == [5, 0, 1, 2, 3, 4]

    def test_soft_input_labels_and_existing_target(self) -> None:
        x = torch.randn(6, 2)
        target = SaflexTarget(
            torch.softmax(torch.randn(6, 3), 1),
            torch.tensor([True] + [False] * 5),
            torch.arange(6),
            torch.tensor([0, -1, -1, -1, -1, -1]),
            ("flip",),
        )
        out, t = MixUp(generator=gen(2))(x, target)
        assert t.op_names == ("flip", "mixup")
        assert t.is_augmented[0] and set(t.op[t.is_augmented & (torch.arange(6) > 0)].tolist()) <= {1}
        torch.testing.assert_close(t.labels.sum(1), torch.ones(6))

    def test_uint8_is_rounded(self) -> None:
        x = torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8)
        mix = MixUp(num_classes=2, generator=gen())
        params = mix.forward_parameters(x.shape)
        out, _ = mix(x, torch.zeros(4, dtype=torch.long), params=params)
        lam = params.lam.view(-1, 1, 1, 1)
        ref = (lam * x.float() + (1 - lam) * x[params.perm].float()).round()
        assert out.dtype == torch.uint8 and (out.float() - ref).abs().max() <= 1

    def test_generator_is_deterministic(self) -> None:
        x = torch.randn(8, 3)
        a = MixUp(num_classes=2, generator=gen(5))(x, torch.zeros(8, dtype=torch.long))
        b = MixUp(num_classes=2, generator=gen(5))(x, torch.zeros(8, dtype=torch.long))
        assert torch.equal(a[0], b[0]) and a[1] == b[1]

    @pytest.mark.parametrize(
        "labels, match",
        [
            (torch.rand(4), r"MixUp: labels must be int class indices of shape \(B,\)"),
            (torch.zeros(4, 2, dtype=torch.long), r"\(B, K\) labels must be float probabilities"),
            ("y", "labels must be a tensor or a SaflexTarget, but got an object of type str"),
        ],
    )
    def test_bad_labels(self, labels: object, match: str) -> None:
        with pytest.raises(TypeError, match=match):
            MixUp(num_classes=2)(torch.randn(4, 3), labels)

    def test_missing_num_classes_and_size_mismatch(self) -> None:
        with pytest.raises(ValueError, match="num_classes is required"):
            MixUp()(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
        with pytest.raises(ValueError, match="inputs have 4 rows but labels have 3"):
            MixUp(num_classes=2)(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(alpha=0.0), "alpha must be a positive number"),
            (dict(p=-0.1), r"p must be a probability in \[0, 1\]"),
            (dict(pairing="flip"), "pairing must be 'random' or 'roll'"),
        ],
    )
    def test_bad_arguments(self, kwargs: dict, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            MixUp(**kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cutmix_lam_is_pixel_fraction(seed: int) -> None:
    b, h, w = 8, 10, 12
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 2, h, w).contiguous()
    y = torch.arange(b) % 3
    mix = CutMix(alpha=1.0, p=0.8, num_classes=3, generator=gen(seed))
    params = mix.forward_parameters(x.shape)
    out, target = mix(x, y, params=params)
    from_partner = (out != x).float().mean(dim=(1, 2, 3))
    mixed = params.mask
    assert torch.equal(target.is_augmented, mixed)
    torch.testing.assert_close(from_partner, torch.where(mixed, 1 - params.lam, torch.zeros(b)))
    assert torch.equal(out[~mixed], x[~mixed])
    for r in range(b):  # the box is where the pixels came from
        y1, x1, y2, x2 = params.region[r].tolist()
        if mixed[r]:
            assert torch.equal(out[r, :, y1:y2, x1:x2], x[params.perm[r], :, y1:y2, x1:x2])
    soft = params.lam[:, None] * onehot(y, 3) + (1 - params.lam[:, None]) * onehot(y[params.perm], 3)
    torch.testing.assert_close(target.labels, torch.where(mixed[:, None], soft, onehot(y, 3)))


def test_cutmix_needs_images() -> None:
    with pytest.raises(TypeError, match="CutMix: inputs must be a tensor with at least 3 dims"):
        CutMix(num_classes=2)(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def test_params_of_wrong_batch() -> None:
    params = MixUp(num_classes=2).forward_parameters((3, 2))
    with pytest.raises(ValueError, match=r"params must be MixParams for a batch of 4, but got \(3,\)"):
        MixUp(num_classes=2)(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), params=params)


class TestTabularCutMix:
    @pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
    def test_features_come_from_partner(self, p: float) -> None:
        x = torch.randn(16, 6)
        x[:, 4] = torch.randint(0, 5, (16,)).float()  # a categorical column (codes)
        y = torch.arange(16) % 2
        mix = TabularCutMix(p=p, categorical=[4], generator=gen(3))
        params = mix.forward_parameters(x.shape)
        out, target = mix(x, y, params=params)
        features: torch.Tensor = params.region
        partner = x[params.perm]
        assert torch.equal(out[features], partner[features])
        assert torch.equal(out[~features], x[~features])
        torch.testing.assert_close(params.lam, 1 - features.float().mean(1))
        assert torch.equal(target.is_augmented, features.any(1))
        assert torch.equal(target.labels, y)  # hard mode keeps the upstream label
        if p == 0.0:
            assert not target.is_augmented.any() and torch.equal(out, x)
        # rows tagged clean are bit-identical
        assert torch.equal(out[~target.is_augmented], x[~target.is_augmented])

    def test_categorical_probability(self) -> None:
        x = torch.randn(64, 5)
        params = TabularCutMix(p=0.9, categorical=[0, 3], p_categorical=0.0, generator=gen()).forward_parameters(
            x.shape
        )
        assert not params.region[:, [0, 3]].any() and params.region[:, [1, 2, 4]].any()

    def test_row_p(self) -> None:
        params = TabularCutMix(p=1.0, row_p=0.0, generator=gen()).forward_parameters((10, 3))
        assert not params.mask.any()

    def test_soft_labels_use_kept_fraction(self) -> None:
        x = torch.randn(8, 10)
        y = torch.arange(8) % 4
        mix = TabularCutMix(p=0.5, num_classes=4, label_mode="soft", generator=gen(1))
        params = mix.forward_parameters(x.shape)
        _, target = mix(x, y, params=params)
        soft = params.lam[:, None] * onehot(y, 4) + (1 - params.lam[:, None]) * onehot(y[params.perm], 4)
        torch.testing.assert_close(target.labels, torch.where(params.mask[:, None], soft, onehot(y, 4)))

    def test_errors(self) -> None:
        with pytest.raises(TypeError, match=r"TabularCutMix: inputs must be a tensor of shape \(B, D\)"):
            TabularCutMix()(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))
        with pytest.raises(ValueError, match=r"categorical column indices \[7\] are out of range for D=3"):
            TabularCutMix(categorical=[7])(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
        with pytest.raises(ValueError, match="duplicate column indices"):
            TabularCutMix(categorical=[1, 1])
        with pytest.raises(ValueError, match="label_mode must be 'hard' or 'soft'"):
            TabularCutMix(label_mode="mixed")  # type: ignore[arg-type]


def test_mixparams_record_needs_hard_labels() -> None:
    params = MixParams(torch.arange(2), torch.ones(2), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"record needs class indices of shape \(B,\)"):
        params.record(torch.zeros(2, 3))
