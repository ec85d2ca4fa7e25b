# Needs no extra (torch only). Run: python examples/tabular_cutmix.py [--device cpu] [--epochs 15]
"""SAFLEX + tabular CutMix on synthetic data (SAFLEX Table 2 in miniature).

Upstream augmentation: tabular CutMix (each feature of a row replaced, with probability ``p``, by the same feature
of another row; categorical columns copied as codes). We train the same MLP twice on ``[clean; cutmix]`` batches:
once with plain cross-entropy (``SaflexLoss(enabled=False)`` is exactly that) and once with SAFLEX, which learns a
keep/drop weight and a soft label for every CutMix row from one validation gradient per step.
"""

# %%
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from saflex_data.device import DeviceAugment
from saflex_data.loss import SaflexLoss
from saflex_data.mixing import TabularCutMix

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--device", default="cpu")
parser.add_argument("--epochs", type=int, default=15)
parser.add_argument("--p", type=float, default=0.5, help="per-feature replacement probability of CutMix")
args, _ = parser.parse_known_args()
torch.set_num_threads(1)

# %% Synthetic data: 8 continuous + 2 categorical columns; the label depends on a few columns only.
gen = torch.Generator().manual_seed(0)
n, num_classes = 3000, 3
x_num = torch.randn(n, 8, generator=gen)
x_cat = torch.randint(0, 4, (n, 2), generator=gen).float()
score = x_num[:, 0] + 0.8 * x_num[:, 1] * x_num[:, 2] + 0.7 * (x_cat[:, 0] == 2).float()
y = torch.bucketize(score, torch.quantile(score, torch.tensor([1 / 3, 2 / 3])))
x = torch.cat([x_num, x_cat], dim=1)
categorical = [8, 9]
perm = torch.randperm(n, generator=gen)
train_idx, val_idx, test_idx = perm[:600], perm[600:700], perm[700:]  # small train set: augmentation matters


# %% The upstream augmentation, on the device, after the loader: batches become [clean; cutmix].
def run(saflex: bool) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, num_classes))
    model.to(args.device)
    loader = DataLoader(
        TensorDataset(x[train_idx], y[train_idx]),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )
    val_loader = DataLoader(TensorDataset(x[val_idx], y[val_idx]), batch_size=100, shuffle=True)
    augment = DeviceAugment(
        TabularCutMix(p=args.p, categorical=categorical, generator=torch.Generator().manual_seed(2)),
        mode="copy",  # keep the clean rows, add one CutMix copy of each
    )
    criterion = SaflexLoss(model, val_loader, method="jvp", enabled=saflex)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.epochs):
        for xb, yb in loader:
            xb, target = augment(xb.to(args.device), yb.to(args.device))
            loss = criterion(model(xb), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[test_idx].to(args.device)).argmax(1).cpu() == y[test_idx]).float().mean().item()
    if saflex:
        s = criterion.stats
        print(
            f"  SAFLEX kept {s['kept_fraction']:.2f} of the CutMix rows (last step), relabeled "
            f"{s['relabeled_fraction']:.2f}"
        )
    return acc


# %% Compare (same seeds, same batches, same augmentations).
start = time.perf_counter()
acc_plain = run(saflex=False)
acc_saflex = run(saflex=True)
print(
    f"test accuracy  CutMix: {acc_plain:.3f}   SAFLEX + CutMix: {acc_saflex:.3f}   "
    f"({time.perf_counter() - start:.0f} s on {args.device})"
)
