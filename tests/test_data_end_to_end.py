"""Train a tiny model a few steps through every adapter with SaflexLoss; one spawn/pin_memory/persistent run."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from saflex_data.batch import SaflexTarget
from saflex_data.collate import IndexedDataset, SaflexCollate
from saflex_data.device import DeviceAugment
from saflex_data.mixing import CutMix, MixUp, TabularCutMix
from saflex_data.offline import OfflineAugmentations, OfflineAugmentedDataset
from saflex_data.sampler import SaflexBatchSampler, SaflexDataset

SaflexLoss = pytest.importorskip("saflex_data.loss").SaflexLoss
K_CLASSES = 4


class Images(Dataset):
    """uint8 CHW images whose mean colour depends on the label (so a model can learn), label ``i % 4``."""

    def __init__(self, n: int = 32, hwc: bool = False) -> None:
        self.n, self.hwc = n, hwc

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Any, int]:
        g = torch.Generator().manual_seed(i)
        label = i % K_CLASSES
        img = (torch.rand(3, 12, 12, generator=g) * 100 + 40 * label).to(torch.uint8)
        return (img.permute(1, 2, 0).numpy().copy() if self.hwc else img), label


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, K_CLASSES)
    )


def val_images() -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds = Images(200)
    x = torch.stack([to_float(ds[100 + i][0]) for i in range(16)])
    y = torch.tensor([(100 + i) % K_CLASSES for i in range(16)])
    return [(x, y)]


def train(
    model: nn.Module, batches: Iterator[tuple[torch.Tensor, SaflexTarget]], val: list, steps: int = 4
) -> SaflexLoss:
    criterion = SaflexLoss(model, val, method="jvp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _, (x, target) in zip(range(steps), batches, strict=False):
        assert isinstance(target, SaflexTarget) and target.num_augmented > 0
        target = target.to("cpu", non_blocking=True)
        loss = criterion(model(x), target)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert len(losses) == steps
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    stats = criterion.stats
    assert 0.0 < stats["augmented_fraction"] <= 1.0 and 0.0 <= stats["kept_fraction"] <= 1.0
    return criterion


def cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def loader_torchvision() -> Iterator[tuple[torch.Tensor, SaflexTarget]]:
    v2 = pytest.importorskip("torchvision.transforms.v2")
    from saflex_data.adapters.torchvision import TaggedAutoAugment

    collate = SaflexCollate(TaggedAutoAugment(v2.RandAugment()), post_transform=to_float, num_copies=1)
    return cycle(DataLoader(IndexedDataset(Images()), batch_size=8, shuffle=True, collate_fn=collate))


def loader_torchvision_mixup() -> Iterator[tuple[torch.Tensor, SaflexTarget]]:
    pytest.importorskip("torchvision")
    from saflex_data.adapters.torchvision import TaggedCutMix, TaggedMixUp

    def both() -> Iterator[Any]:
        for mix in cycle([TaggedMixUp(num_classes=K_CLASSES), TaggedCutMix(num_classes=K_CLASSES)]):
            collate = SaflexCollate(None, post_transform=to_float, num_copies=1, batch_transform=mix)
            yield next(iter(DataLoader(Images(), batch_size=8, shuffle=True, collate_fn=collate)))

    return both()


def loader_albumentations() -> Iterator[tuple[torch.Tensor, SaflexTarget]]:
    A = pytest.importorskip("albumentations")
    from albumentations.pytorch import ToTensorV2

    from saflex_data.adapters.albumentations import AlbumentationsTransform

    compose = A.Compose(
        [A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(p=0.8), A.ToFloat(max_value=255), ToTensorV2()],
        save_applied_params=True,
    )
    collate = SaflexCollate(AlbumentationsTransform(compose), p=0.7)
    return cycle(DataLoader(Images(hwc=True), batch_size=8, shuffle=True, collate_fn=collate))


def device_loader(aug: Callable[..., Any]) -> Iterator[tuple[torch.Tensor, SaflexTarget]]:
    clean = DataLoader(
        Images(),
        batch_size=8,
        shuffle=True,
        collate_fn=SaflexCollate(None, post_transform=to_float, num_copies=0, target_format="labels"),
    )
    for x, y in cycle(clean):
        yield aug(x, y)


def loader_kornia() -> Iterator[tuple[torch.Tensor, SaflexTarget]]:
    pytest.importorskip("kornia")
    warnings.filterwarnings("ignore", module="kornia")
    import kornia.augmentation as K

    from saflex_data.adapters.kornia import KorniaAugment

    return device_loader(KorniaAugment(K.AugmentationSequential(K.RandomHorizontalFlip(), K.ColorJitter(0.3, 0.3))))


def loader_kornia_mix() -> Iterator[tuple[torch.Tensor, SaflexTarget]]:
    pytest.importorskip("kornia")
    import kornia.augmentation as K

    from saflex_data.adapters.kornia import KorniaAugment

    return device_loader(KorniaAugment(K.RandomMixUpV2(p=1.0), num_classes=K_CLASSES, mode="copy"))


def loader_kornia_auto() -> Iterator[tuple[torch.Tensor, SaflexTarget]]:
    pytest.importorskip("kornia")
    from kornia.augmentation.auto import TrivialAugment

    from saflex_data.adapters.kornia import KorniaAugment

    return device_loader(KorniaAugment(TrivialAugment(), mode="subset", p=0.5))


def loader_mixing() -> Iterator[tuple[torch.Tensor, SaflexTarget]]:
    return device_loader(DeviceAugment(CutMix(num_classes=K_CLASSES, p=0.7), mode="all"))


def loader_mixing_collate() -> Iterator[tuple[torch.Tensor, SaflexTarget]]:
    collate = SaflexCollate(None, post_transform=to_float, p=0.0, batch_transform=MixUp(num_classes=K_CLASSES, p=0.5))
    return cycle(DataLoader(Images(), batch_size=8, shuffle=True, collate_fn=collate))


def loader_offline() -> Iterator[tuple[torch.Tensor, SaflexTarget]]:
    made = torch.stack([Images(64)[32 + j][0] for j in range(16)])  # "generated" images of sources 0..15
    ds = OfflineAugmentedDataset(
        Images(), OfflineAugmentations(made, list(range(16)), name="diffusion"), transform=to_float
    )
    return cycle(
        DataLoader(
            ds, batch_size=8, shuffle=True, collate_fn=ds.collate_fn(), generator=torch.Generator().manual_seed(1)
        )
    )


def loader_sampler() -> Iterator[tuple[torch.Tensor, SaflexTarget]]:
    ds = SaflexDataset(Images(), lambda x: x.flip(-1), post_transform=to_float)
    return cycle(
        DataLoader(
            ds, batch_sampler=SaflexBatchSampler(range(32), batch_size=8, num_copies=1), collate_fn=ds.collate_fn()
        )
    )


LOADERS = [
    loader_torchvision,
    loader_torchvision_mixup,
    loader_albumentations,
    loader_kornia,
    loader_kornia_mix,
    loader_kornia_auto,
    loader_mixing,
    loader_mixing_collate,
    loader_offline,
    loader_sampler,
]


@pytest.mark.parametrize("make_loader", LOADERS, ids=[f.__name__.removeprefix("loader_") for f in LOADERS])
def test_train_a_few_steps(make_loader: Callable[[], Iterator[Any]]) -> None:
    model = cnn()
    train(model, make_loader(), val_images())


def test_tabular_cutmix_mlp() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    x[:, 5] = torch.randint(0, 3, (64,)).float()
    y = (x[:, 0] > 0).long() + 2 * (x[:, 5] == 1).long()
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, K_CLASSES))
    mix = TabularCutMix(p=0.3, categorical=[5], generator=torch.Generator().manual_seed(0))
    aug = DeviceAugment(mix, mode="copy")
    rows = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    val = [(torch.randn(16, 6), torch.randint(0, K_CLASSES, (16,)))]
    train(model, (aug(xb, yb) for xb, yb in cycle(rows)), val, steps=6)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.pin_memory. argument")
def test_spawn_pin_memory_persistent_workers() -> None:
    """Everything the workers need is importable from libraries, as spawn requires."""
    v2 = pytest.importorskip("torchvision.transforms.v2")
    from saflex_data.adapters.torchvision import TaggedRandomApply

    x = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(24) % K_CLASSES
    post = v2.ToDtype(torch.float32, scale=True)
    collate = SaflexCollate(TaggedRandomApply(v2.RandomHorizontalFlip(p=1.0), p=0.5), post_transform=post, num_copies=1)
    loader = DataLoader(
        IndexedDataset(TensorDataset(x, y)),
        batch_size=8,
        shuffle=True,
        num_workers=2,
        multiprocessing_context="spawn",
        persistent_workers=True,
        pin_memory=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    epochs = []
    for _ in range(2):
        seen = []
        for xb, target in loader:
            target = target.to(device, non_blocking=True)
            xb = xb.to(device, non_blocking=True)
            assert xb.shape == (16, 3, 8, 8) and target.device.type == device
            for r in range(16):
                src = x[int(target.index[r])]
                ref = post(src.flip(-1) if target.is_augmented[r] else src)
                assert torch.equal(xb[r].cpu(), ref)
            seen.extend(target.index[:8].tolist())
        epochs.append(sorted(seen))
    assert epochs[0] == epochs[1] == list(range(24))
