"""kornia adapter: batch_prob masks are the changed rows, clean rows are bit-identical, mix labels match pixels."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("kornia")
warnings.filterwarnings("ignore", module="kornia")
import kornia.augmentation as K  # noqa: E402
from kornia.augmentation.auto import AutoAugment, RandAugment, TrivialAugment  # noqa: E402

from saflex_data.adapters.kornia import KorniaAugment, KorniaTagger, batch_prob_mask, kornia_record_to_soft  # noqa: E402
from saflex_data.batch import SaflexTarget  # noqa: E402


def devices() -> list:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]


def need(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def images(b: int = 16, device: str = "cpu") -> torch.Tensor:
    return torch.rand(b, 3, 10, 10, generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("device", devices())
def test_sequential_mask_is_changed_rows(device: str) -> None:
    need(device)
    torch.manual_seed(0)
    x, y = images(device=device), torch.arange(16, device=device) % 4
    aug = KorniaAugment(K.AugmentationSequential(K.RandomHorizontalFlip(p=0.5), K.ColorJitter(0.3, 0.3, p=0.5)))
    out, target = aug(x, y)
    changed = (out != x).flatten(1).any(1)
    assert torch.equal(target.is_augmented, changed)
    assert torch.equal(out[~changed], x[~changed])
    assert target.op_names == ("RandomHorizontalFlip", "ColorJitter")
    params = aug.fn.last_params
    flip = batch_prob_mask(params[0], 16, x.device)
    jitter = batch_prob_mask(params[1], 16, x.device)
    # op id = the first op that fired on the row
    expected = torch.where(flip, 0, torch.where(jitter, 1, -1))
    assert torch.equal(target.op, expected)
    assert torch.equal(target.labels, y) and target.device.type == device


@pytest.mark.parametrize(
    "make",
    [lambda: RandAugment(n=2, m=10), lambda: TrivialAugment(), lambda: AutoAugment()],
    ids=["RandAugment", "TrivialAugment", "AutoAugment"],
)
def test_auto_policies_augment_a_subset(make) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    x, y = images(), torch.arange(16) % 4
    aug = KorniaAugment(make(), mode="subset", p=0.5, generator=torch.Generator().manual_seed(3))
    out, target = aug(x, y)
    aug_rows = target.is_augmented
    assert 0 < int(aug_rows.sum()) < 16
    assert torch.equal(out[~aug_rows], x[~aug_rows])


def test_auto_policy_clean_copy() -> None:
    x, y = images(4), torch.arange(4)
    out, target = KorniaAugment(TrivialAugment(), mode="copy")(x, y)
    assert out.shape == (8, 3, 10, 10) and torch.equal(out[:4], x)
    assert target.is_augmented.tolist() == [False] * 4 + [True] * 4 and target.index.tolist() == [0, 1, 2, 3] * 2


@pytest.mark.parametrize("device", devices())
def test_mixup_v2_soft_labels_match_pixels(device: str) -> None:
    need(device)
    torch.manual_seed(2)
    x, y = images(8, device), torch.arange(8, device=device) % 5
    aug = KorniaAugment(K.RandomMixUpV2(p=1.0), num_classes=5)
    out, target = aug(x, y)
    params = aug.fn.last_params
    pairs, lam = params["mixup_pairs"].to(x.device), params["mixup_lambdas"].to(x.device)
    mixed = target.is_augmented
    assert torch.equal(mixed, pairs != torch.arange(8, device=device))
    expected = x * (1 - lam.view(-1, 1, 1, 1)) + x[pairs] * lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(out[mixed], expected[mixed])
    assert torch.equal(out[~mixed], x[~mixed])
    onehot = torch.nn.functional.one_hot(y, 5).float()
    soft = (1 - lam)[:, None] * onehot + lam[:, None] * onehot[pairs]
    torch.testing.assert_close(target.labels, torch.where(mixed[:, None], soft, onehot))
    assert set(target.op[mixed].tolist()) == {0} and target.op_names == ("RandomMixUpV2",)


@pytest.mark.filterwarnings("ignore:RandomCutMixV2 currently uses the old")
@pytest.mark.parametrize("correct", [False, True])
def test_cutmix_v2_partner_share_is_pixel_fraction(correct: bool) -> None:
    torch.manual_seed(3)
    b = 8
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 16, 16).contiguous()
    y = torch.arange(b)
    aug = KorniaAugment(K.RandomCutMixV2(p=1.0, use_correct_lambda=correct), num_classes=b)
    out, target = aug(x, y)
    from_partner = (out != x).float().mean(dim=(1, 2, 3))
    partner_share = 1 - target.labels[torch.arange(b), y]
    mixed = target.is_augmented
    torch.testing.assert_close(partner_share[mixed], from_partner[mixed])
    assert torch.equal(out[~mixed], x[~mixed]) and (partner_share[~mixed] == 0).all()


def test_record_to_soft_several_mixes() -> None:
    record = torch.tensor([[[0.0, 1.0, 0.25]], [[0.0, 2.0, 0.25]]])  # (num_mix=2, B=1, 3)
    soft = kornia_record_to_soft(record, torch.tensor([0]), 3)
    torch.testing.assert_close(soft, torch.tensor([[0.5, 0.25, 0.25]]))


def test_keeps_existing_tags_and_appends_name() -> None:
    x = images(4)
    t = SaflexTarget(
        torch.arange(4),
        torch.tensor([True, False, False, False]),
        torch.arange(4),
        torch.tensor([0, -1, -1, -1]),
        ("offline",),
    )
    _, target = KorniaAugment(K.RandomHorizontalFlip(p=1.0))(x, t)
    assert target.op_names == ("offline", "RandomHorizontalFlip") and target.op.tolist() == [1, 1, 1, 1]


class TestErrors:
    def test_mix_needs_num_classes(self) -> None:
        with pytest.raises(ValueError, match=r"KorniaTagger\(RandomMixUpV2\): num_classes is required"):
            KorniaAugment(K.RandomMixUpV2())

    def test_mix_needs_hard_labels(self) -> None:
        aug = KorniaAugment(K.RandomMixUpV2(), num_classes=3)
        with pytest.raises(
            TypeError,
            match=r"kornia mix ops need class-index labels of shape \(B,\), but got labels "
            r"of shape \(4, 3\)",
        ):
            aug(images(4), torch.full((4, 3), 1 / 3))

    def test_not_kornia(self) -> None:
        with pytest.raises(TypeError, match="KorniaTagger: module must be a kornia augmentation"):
            KorniaTagger(torch.nn.Identity())

    def test_subset_of_shape_changing_op(self) -> None:
        aug = KorniaAugment(K.RandomResizedCrop((5, 5), p=1.0), mode="subset", p=1.0)
        with pytest.raises(ValueError, match=r"KorniaAugment\(RandomResizedCrop\): fn returned shape \(4, 3, 5, 5\)"):
            aug(images(4), torch.arange(4))
