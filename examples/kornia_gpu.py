# needs: pip install '.[kornia,timm]' (in a clone)
"""SAFLEX with augmentation on the device: timm loader -> kornia pipeline (tagged) -> normalise -> model -> SaflexLoss.

kornia expects ``[0, 1]`` RGB, and timm's prefetcher normalises on the device, so the loaders are built with
``mean=(0, 0, 0), std=(1, 1, 1)`` (the prefetcher then only divides by 255), kornia augments on the device, and
the ImageNet normalisation runs after it. The validation stream comes from the same kind of loader and
``ValPrepare(mean=..., std=...)`` gives it the same normalisation, on the device.

    python examples/kornia_gpu.py --device cuda                 # a tiny synthetic PNG folder is written to a temp dir
    python examples/kornia_gpu.py --data-dir DATA --policy randaugment --steps 100
"""

# %%
from __future__ import annotations

import argparse
import math
import tempfile
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import kornia.augmentation as K
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset, create_loader
from timm.models import create_model
from timm.optim import create_optimizer_v2
from timm.utils import random_seed

from saflex_data import SaflexLoss
from saflex_data.adapters.kornia import KorniaAugment
from saflex_data.adapters.timm import ValPrepare, create_val_loader


def write_demo_folder(root: Path, n_per_class: int = 16, size: int = 32) -> Path:
    """Two classes of noisy colour images, PNG files in ``root/{train,holdout}/class{c}/``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "holdout"):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                img = np.zeros((size, size, 3), np.float32)
                img[..., c] = 180
                img = np.clip(img + rng.normal(0, 40, img.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="", help="ImageFolder root with train/ and holdout/ (default: synthetic)")
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("-b", "--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--policy", default="jitter", choices=("jitter", "randaugment"),
                   help="jitter: kornia ops with per-sample p; randaugment: kornia RandAugment on a random subset")
    p.add_argument("--aug-prob", type=float, default=0.5, help="subset probability for --policy randaugment")
    p.add_argument("--method", default="last_layer", choices=("last_layer", "jvp"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-interval", type=int, default=5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    random_seed(args.seed)
    device = torch.device(args.device)
    data_dir = Path(args.data_dir) if args.data_dir else write_demo_folder(Path(tempfile.mkdtemp()) / "data")

    # %% loaders: [0, 1] images on the device (the prefetcher divides by 255: mean 0, std 1)
    size = (3, args.img_size, args.img_size)
    unit = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), device=device, num_workers=args.workers)
    dataset_train = create_dataset("", root=str(data_dir), split="train", is_training=True)
    loader_train = create_loader(  # base augmentation (random resized crop + flip) in the workers, no colour ops
        dataset_train, size, args.batch_size, is_training=True, color_jitter=None, **unit
    )
    dataset_holdout = create_dataset("", root=str(data_dir), split="holdout", is_training=False)
    loader_val = create_val_loader(dataset_holdout, size, args.batch_size, train_loader=loader_train,
                                   num_workers=args.workers, seed=args.seed)

    # %% the device pipeline: kornia augmentation (tagged), then the ImageNet normalisation
    if args.policy == "randaugment":  # kornia's policies augment every row they see: pick the rows ourselves
        gpu_aug = KorniaAugment(K.auto.RandAugment(n=2, m=10), mode="subset", p=args.aug_prob)
    else:  # per-op probabilities: kornia's batch_prob says which rows were augmented
        gpu_aug = KorniaAugment(K.AugmentationSequential(
            K.ColorJiggle(0.4, 0.4, 0.4, 0.05, p=0.5),
            K.RandomAffine(degrees=20.0, translate=(0.1, 0.1), p=0.3),
            K.RandomGaussianBlur((3, 3), (0.1, 1.5), p=0.2),
        ))
    # (kornia's random ops hold no tensors: they follow the input's device, no .to(device) needed)
    normalize = K.Normalize(mean=torch.tensor(IMAGENET_DEFAULT_MEAN), std=torch.tensor(IMAGENET_DEFAULT_STD))

    # %% model, SAFLEX loss (validation inputs get the same on-device normalisation), optimizer
    num_classes = len(dataset_train.reader.class_to_idx)
    model = create_model(args.model, num_classes=num_classes).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    prepare = ValPrepare.from_model(model, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    criterion = SaflexLoss(model, loader_val, method=args.method, prepare=prepare, seed=args.seed)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=0.05)
    autocast = partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16) if args.amp else nullcontext

    # %% train
    losses: list[float] = []
    stats: list[dict] = []
    step = 0
    model.train()
    while step < args.steps:
        for x, y in loader_train:  # x in [0, 1], already on the device (PrefetchLoader)
            with torch.no_grad():
                x, target = gpu_aug(x, y)  # target: SaflexTarget (is_augmented from kornia's batch_prob)
                x = normalize(x)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            prepare.observe_train(x)  # reference statistics for the validation-normalisation check
            with autocast():
                loss = criterion(model(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            stats.append(criterion.stats)
            if step % args.log_interval == 0 or step == 1:
                s = stats[-1]
                print(f"step {step}: loss {losses[-1]:.4f} | saflex aug {s['augmented_fraction']:.2f} "
                      f"kept {s['kept_fraction']:.2f} relabeled {s['relabeled_fraction']:.2f}", flush=True)
            if step >= args.steps:
                break
    print("per-op keep/relabel rates:", criterion.op_stats())
    return {"losses": losses, "saflex": stats, "op_stats": criterion.op_stats(),
            "finite": all(math.isfinite(v) for v in losses)}


if __name__ == "__main__":
    main()
