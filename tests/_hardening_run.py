"""A small, complete SAFLEX training job for the determinism and resume tests (``tests/test_hardening.py``).

It is what a real job does, at toy size: a ``SaflexBatchSampler`` over a ``DistributedSampler`` (one replica) feeds
a ``SaflexDataset`` through a ``DataLoader`` (0 or 2 workers); a CNN with BatchNorm and dropout (so the global RNG
and buffers matter) trains with AdamW, a StepLR schedule and ``SaflexLoss``; the validation stream is its own
``DataLoader``. Each step records the criterion's weights and soft labels.

``python -m tests._hardening_run full OUT`` runs ``STEPS`` steps, writing the checkpoint of step ``STOP`` (mid-epoch)
and the records to ``OUT``; ``python -m tests._hardening_run resume OUT`` loads that checkpoint in a fresh process
and finishes the run, writing its records next to it. The test compares both, bit for bit.
"""

from __future__ import annotations

import sys
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from saflex_data import SaflexLoss

K = 4
N_TRAIN = 96
BATCH = 8  # 12 batches per epoch
STEPS = 24
STOP = 15  # mid-epoch: epoch 1, batch 3; the validation stream has wrapped around twice by then
METHODS = ("jvp", "last_layer", "single_pass")


def noise(x: torch.Tensor) -> torch.Tensor:
    """The upstream augmentation: draws from the global RNG, which SaflexDataset seeds per sample."""
    return x + 0.5 * torch.randn_like(x)


def flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(24, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1)
        return self.fc(self.drop(h))


def data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_TRAIN, 1, 6, 6, generator=g)
    y = torch.randint(0, K, (N_TRAIN,), generator=g)
    vx = torch.randn(36, 1, 6, 6, generator=g)
    vy = torch.randint(0, K, (36,), generator=g)
    return TensorDataset(x, y), TensorDataset(vx, vy)


def val_loader(val_set: TensorDataset, shuffle: bool) -> DataLoader:
    # Its own generator: the validation stream then never draws from the training's global RNG.
    return DataLoader(val_set, batch_size=8, shuffle=shuffle, generator=torch.Generator().manual_seed(7))


def build(method: str, *, num_workers: int = 0, val_shuffle: bool = False, seed: int = 0, data_seed: int = 0
          ) -> dict[str, Any]:
    """Everything a job builds before its loop (a fresh process does exactly this, then loads the checkpoint).

    ``seed`` initialises the model and the criterion (a resumed job must not depend on it); ``data_seed`` is the
    data pipeline's configuration (the sampler's seed, like ``--seed`` of a training script).
    """
    from saflex_data.sampler import SaflexBatchSampler, SaflexDataset

    torch.manual_seed(seed)
    train_set, val_set = data()
    dataset = SaflexDataset(train_set, [noise, flip])
    inner = DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=data_seed)
    sampler = SaflexBatchSampler(inner, batch_size=BATCH, p=0.5, seed=data_seed)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    criterion = SaflexLoss(
        model, val_loader(val_set, val_shuffle), method=method, val_every=2, seed=seed,
    )
    return {
        "model": model, "optimizer": optimizer, "scheduler": scheduler, "criterion": criterion, "sampler": sampler,
        "dataset": dataset, "num_workers": num_workers,
    }


def loader(job: dict[str, Any], epoch: int, skip: int) -> DataLoader:
    """The epoch's loader, starting after ``skip`` batches (the sampler's decisions depend only on seed and epoch)."""
    job["sampler"].set_epoch(epoch)
    batches = list(islice(iter(job["sampler"]), skip, None))
    return DataLoader(
        job["dataset"], batch_sampler=batches, collate_fn=job["dataset"].collate_fn(),
        num_workers=job["num_workers"], generator=torch.Generator().manual_seed(epoch),
    )


def train(job: dict[str, Any], start: int, stop: int, checkpoint: Path | None = None, at: int = -1) -> list:
    """Steps ``start .. stop-1``; returns ``[(weights, soft labels, loss)]``; checkpoints before step ``at``."""
    model, optimizer, scheduler, criterion = job["model"], job["optimizer"], job["scheduler"], job["criterion"]
    per_epoch = len(job["sampler"])
    records = []
    step = start
    while step < stop:
        epoch, skip = divmod(step, per_epoch)
        for x, target in loader(job, epoch, skip):
            if step == at and checkpoint is not None:
                save(job, step, checkpoint)
            if step >= stop:
                break
            logits = criterion.forward_train(x) if criterion.method == "single_pass" else model(x)
            loss = criterion(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            records.append((criterion.last_step["weights"].clone(), criterion.last_step["targets"].clone(),
                            loss.detach().clone()))
            step += 1
    return records


def save(job: dict[str, Any], step: int, path: Path) -> None:
    per_epoch = len(job["sampler"])
    torch.save(
        {
            "model": job["model"].state_dict(),
            "optimizer": job["optimizer"].state_dict(),
            "scheduler": job["scheduler"].state_dict(),
            "criterion": job["criterion"].state_dict(),
            "sampler": {"epoch": step // per_epoch, "batches_done": step % per_epoch},
            "step": step,
            "rng": torch.get_rng_state(),
        },
        path,
    )


def resume(method: str, path: Path, val_shuffle: bool) -> tuple[dict[str, Any], int]:
    job = build(method, val_shuffle=val_shuffle, seed=99)  # different seeds: everything must come from the file
    state = torch.load(path, weights_only=False)
    job["model"].load_state_dict(state["model"])
    job["optimizer"].load_state_dict(state["optimizer"])
    job["scheduler"].load_state_dict(state["scheduler"])
    job["criterion"].load_state_dict(state["criterion"])
    torch.set_rng_state(state["rng"])
    return job, state["step"]


def final_state(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in job["model"].state_dict().items()},
        "criterion": job["criterion"].state_dict()["_extra_state"],
    }


def main(argv: list[str]) -> None:
    mode, out = argv[0], Path(argv[1])
    val_shuffle = len(argv) > 2 and argv[2] == "shuffle"
    methods = argv[3].split(",") if len(argv) > 3 else METHODS
    torch.set_num_threads(1)
    results = {}
    for method in methods:
        ckpt = out / f"{method}.ckpt"
        if mode == "full":
            job = build(method, val_shuffle=val_shuffle)
            records = train(job, 0, STEPS, checkpoint=ckpt, at=STOP)
        else:
            job, step = resume(method, ckpt, val_shuffle)
            records = train(job, step, STEPS)
        results[method] = {"records": records, "final": final_state(job)}
    torch.save(results, out / f"{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
