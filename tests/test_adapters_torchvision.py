"""torchvision v2 adapters: the tags are true (clean = fixed part, augmented = upstream output, lam = pixels)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision")
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from saflex_data.adapters.torchvision import (  # noqa: E402
    TaggedAutoAugment,
    TaggedCutMix,
    TaggedMixUp,
    TaggedRandomApply,
    TaggedRandomChoice,
)
from saflex_data.collate import IndexedDataset, SaflexCollate, draw_seed, seeded  # noqa: E402

POST = v2.ToDtype(torch.float32, scale=True)


class Images(Dataset):
    """uint8 CHW images with distinct content; label ``i % 4``."""

    def __init__(self, n: int = 24, size: int = 12) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(100 + i)
        return torch.randint(0, 256, (3, self.size, self.size), generator=g, dtype=torch.uint8), i % 4


def test_random_apply_owns_the_coin_flip() -> None:
    ds = Images(40)
    collate = SaflexCollate(TaggedRandomApply(v2.RandomHorizontalFlip(p=1.0), p=0.5), post_transform=POST, seed=0)
    x, target = collate([ds[i] for i in range(40)])
    assert target.op_names == ("RandomHorizontalFlip",)
    aug = target.is_augmented[40:]
    assert 8 < int(aug.sum()) < 32
    for r in range(40):
        src = ds[r][0]
        assert torch.equal(x[r], POST(src))  # clean rows: the fixed part only
        ref = POST(src.flip(-1)) if aug[r] else POST(src)  # copies: flipped iff tagged
        assert torch.equal(x[40 + r], ref)


def test_random_choice_reports_which() -> None:
    t = TaggedRandomChoice([v2.RandomHorizontalFlip(p=1.0), v2.RandomVerticalFlip(p=1.0)])
    img = Images()[0][0]
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        out, op = t.augment(img, g)
        assert torch.equal(out, img.flip(-1) if op == 0 else img.flip(-2))
        seen.add(t.op_names[op])
    assert seen == {"RandomHorizontalFlip", "RandomVerticalFlip"}


AUTO = [
    pytest.param(lambda: v2.RandAugment(num_ops=1), id="RandAugment"),
    pytest.param(lambda: v2.TrivialAugmentWide(), id="TrivialAugmentWide"),
    pytest.param(lambda: v2.AutoAugment(), id="AutoAugment"),
]


@pytest.mark.parametrize("make", AUTO)
def test_auto_augment_tags_are_true(make) -> None:  # type: ignore[no-untyped-def]
    ds = Images(60)
    wrapped = TaggedAutoAugment(make())
    collate = SaflexCollate(wrapped, p=1.0, seed=0)
    x, target = collate([ds[i] for i in range(60)])
    names = target.op_names
    assert all(n.startswith(type(wrapped.transform).__name__ + ":") for n in names)
    assert target.num_augmented > 30
    for r in range(60):
        if not target.is_augmented[r]:
            assert torch.equal(x[r], ds[r][0])  # only Identity ran (or nothing): bit-identical
    # augmented rows are the upstream transform's output: replay the same seeds through the plain transform
    gen = collate.generator()  # continue from a fresh, known state
    gen.manual_seed(42)
    state = gen.get_state()
    outs = [wrapped.augment(ds[i][0], gen) for i in range(10)]
    gen.set_state(state)
    plain = make()
    for i in range(10):
        with seeded(draw_seed(gen)):
            ref = plain(ds[i][0])
        assert torch.equal(outs[i][0], ref)
    changed = [(o != ds[i][0]).any().item() for i, (o, op) in enumerate(outs) if op >= 0]
    assert sum(changed) >= len(changed) // 2  # most tagged rows differ (weak ops, e.g. posterize 8 bits, may not)


def test_auto_augment_rejects_other_transforms() -> None:
    with pytest.raises(TypeError, match="TaggedAutoAugment: transform must be a torchvision v2 RandAugment"):
        TaggedAutoAugment(v2.RandomHorizontalFlip())


@pytest.mark.parametrize("batch", [2, 7])
def test_mixup_lam_matches_pixels(batch: int) -> None:
    x, y = torch.rand(batch, 3, 6, 6), torch.arange(batch) % 3
    mix = TaggedMixUp(alpha=0.5, num_classes=3)
    out, target = mix(x, y)
    lam = float(mix.last_params.lam[0])
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.roll(1, 0))
    onehot = torch.nn.functional.one_hot(y, 3).float()
    torch.testing.assert_close(target.labels, lam * onehot + (1 - lam) * onehot.roll(1, 0))
    assert target.is_augmented.all() and target.op_names == ("mixup",)
    assert torch.equal(mix.last_params.perm, torch.arange(batch).roll(1))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cutmix_lam_is_one_minus_box_area(seed: int) -> None:
    torch.manual_seed(seed)
    b = 5
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 8, 10).contiguous()
    y = torch.arange(b)
    mix = TaggedCutMix(num_classes=5)
    out, target = mix(x, y)
    lam = mix.last_params.lam
    from_partner = (out != x).float().mean(dim=(1, 2, 3))
    torch.testing.assert_close(from_partner, torch.where(target.is_augmented, 1 - lam, torch.zeros(b)))
    y1, x1, y2, x2 = mix.last_params.region[0].tolist()
    if target.is_augmented.any():
        assert torch.equal(out[:, :, y1:y2, x1:x2], x.roll(1, 0)[:, :, y1:y2, x1:x2])
    onehot = torch.nn.functional.one_hot(y, 5).float()
    torch.testing.assert_close(target.labels, lam[:, None] * onehot + (1 - lam[:, None]) * onehot.roll(1, 0))


def test_mixup_as_batch_transform_in_a_dataloader() -> None:
    loader = DataLoader(
        IndexedDataset(Images(8)),
        batch_size=4,
        num_workers=0,
        collate_fn=SaflexCollate(None, post_transform=POST, num_copies=1, batch_transform=TaggedMixUp(num_classes=4)),
    )
    for x, target in loader:
        assert x.shape == (8, 3, 12, 12) and target.labels.shape == (8, 4)
        assert not target.is_augmented[:4].any() and target.is_augmented[4:].all()
        assert target.op_names == ("mixup",)


def test_mixup_errors() -> None:
    with pytest.raises(TypeError, match=r"TaggedMixUp: inputs must be a batch of shape \(B, C, H, W\)"):
        TaggedMixUp(num_classes=2)(torch.rand(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"TaggedCutMix: labels of shape \(B,\) must be int class indices"):
        TaggedCutMix(num_classes=2)(torch.rand(3, 3, 4, 4), torch.rand(3))


def test_random_apply_bad_p() -> None:
    with pytest.raises(ValueError, match=r"TaggedRandomApply: p must be a probability in \[0, 1\], but got 2"):
        TaggedRandomApply(v2.RandomHorizontalFlip(), p=2)


def test_shape_changing_transform_is_named_in_the_error() -> None:
    ds = Images(6)
    collate = SaflexCollate(TaggedRandomApply(v2.RandomResizedCrop(size=8), p=1.0), num_copies=1)
    with pytest.raises(
        ValueError,
        match=r"SaflexCollate\(transform=TaggedRandomApply\): row 6 \(augmented by "
        r"'RandomResizedCrop'\) came back with shape \(3, 8, 8\)",
    ):
        collate([ds[i] for i in range(6)])
