# needs: only torch.  Run: python examples/quickstart.py [--device cpu|cuda] [--steps N]
# %% [markdown]
# # saflex_data quick start
# Each step SAFLEX scores every augmented sample against a validation gradient. This script uses the hard-decision
# rule "margin" (the library's default until 0.2; since 0.2 the default is "gated_prior", which weights augmented
# samples by the model's own confidence p[y] while they help less than the clean ones): it drops (weight 0) a sample
# whose upstream label trails the class the validation data supports by a clear margin, keeps the rest with their
# upstream label, and never relabels; `--rule margin_fix` or `--rule paper` also relabel.
# Here the "upstream" is a deliberately bad one: noisy copies of the inputs with 40% of their labels flipped at random.
# The same code runs on synthetic data in a few seconds on a CPU.

# %%
import argparse

import torch
from torch import nn

from saflex_data import SaflexLoss, SaflexTarget

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cpu")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--method", default="last_layer", choices=["last_layer", "jvp"])
parser.add_argument("--rule", default="margin", choices=["margin", "margin_fix", "margin_relabel", "paper", "centered"])
args = parser.parse_args()
torch.manual_seed(0)
device = torch.device(args.device)

# %% A 3-class problem: clusters in 20 dimensions.
centers = torch.randn(3, 20) * 2


def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 3, (n,))
    return centers[y] + torch.randn(n, 20), y


val_loader = [sample(128) for _ in range(8)]  # any iterable of (inputs, targets); cycled forever
x_test, y_test = sample(2000)

# %% The model, the loss swap and the loop.
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3)).to(device)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
criterion = SaflexLoss(
    model,  # held by reference (not a submodule); hooks capture what the loss needs
    val_loader,  # the validation stream SAFLEX learns from
    method=args.method,  # "last_layer" (default, nearly free), "jvp" or "single_pass" (exact)
    rule=args.rule,  # "margin" (drop, never relabel; the library default is "gated_prior") or "paper" (relabels)
)

fixed, kept_good = [], []  # per step: share of wrong labels repaired, share of good labels kept as they are
for step in range(args.steps):
    x, y = sample(32)
    x_aug, y_aug = x + 0.5 * torch.randn_like(x), y.clone()  # the upstream augmentation...
    flip = torch.rand(32) < 0.4
    y_aug[flip] = torch.randint(0, 3, (int(flip.sum()),))  # ...which breaks 40% of its labels
    inputs = torch.cat([x, x_aug]).to(device)
    target = SaflexTarget(torch.cat([y, y_aug]), torch.arange(64) >= 32).to(device)  # which rows are augmented
    loss = criterion(model(inputs), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    # What SAFLEX did with the augmented rows this step (the truth is known here: `flip` and `y`).
    weights, labels = criterion.last_step["weights"][32:].cpu(), criterion.last_step["targets"][32:].cpu()
    wrong = y_aug != y
    repaired = (weights == 0) | (labels.argmax(1) == y)  # dropped, or labelled with the true class
    fixed.append(repaired[wrong].float().mean().item() if wrong.any() else float("nan"))
    kept_good.append(((weights > 0) & (labels.argmax(1) == y))[~wrong].float().mean().item())
    if step % 50 == 0 or step == args.steps - 1:
        print(f"step {step:3d}  loss {loss.item():.3f}  kept {criterion.stats['kept_fraction']:.2f}  "
              f"relabeled {criterion.stats['relabeled_fraction']:.2f}")

with torch.no_grad():
    accuracy = (model(x_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()
recent = slice(args.steps // 2, None)  # the second half of training
print(f"test accuracy {accuracy:.3f}")
print(f"wrong upstream labels dropped or corrected: {torch.tensor(fixed[recent]).nanmean():.2f}; "
      f"good upstream labels kept: {torch.tensor(kept_good[recent]).mean():.2f}")
