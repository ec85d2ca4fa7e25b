# needs: only torch.  Run: torchrun --nproc_per_node=2 examples/ddp_train.py [--device cpu|cuda] [--steps N]
"""SAFLEX under DistributedDataParallel, launched with torchrun (gloo on CPU, nccl on GPU).

    torchrun --nproc_per_node=2 examples/ddp_train.py                     # 2 CPU processes, gloo
    torchrun --nproc_per_node=8 examples/ddp_train.py --device cuda       # 8 GPUs, nccl
    python examples/ddp_train.py                                          # one process, no torch.distributed

Three things differ from a one-process SAFLEX loop, all marked ``# DDP``: the process group, the samplers
(``SaflexBatchSampler`` around ``DistributedSampler``: disjoint indices per rank, flags from ``(seed, epoch)``) and
the model wrapper. ``SaflexLoss`` takes the DDP-wrapped model as it is: its extra passes use the raw module, it
averages the validation gradient across ranks and decides on the global batch, so every rank decides exactly like
one process with the global batch would, and ``criterion.stats`` is the same on every rank.

The upstream augmentation here is deliberately harmful: it mirrors a sample (``x -> -x``), which moves it to another
cluster while keeping its label. With the default rule (``"gated_prior"``) SAFLEX weights the augmented samples by the
model's own confidence ``p[y]`` while, on average over the steps, they help less than the clean ones (and weight 1
otherwise); it relabels none. The log prints their mean weight.
"""

# %%
from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from saflex_data import SaflexLoss
from saflex_data.sampler import SaflexBatchSampler, SaflexDataset


def mirror(x: torch.Tensor) -> torch.Tensor:
    """The upstream augmentation (module level, so that DataLoader workers can pickle it)."""
    return -x + 0.1 * torch.randn_like(x)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="'cuda' uses the GPU of LOCAL_RANK and nccl")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps in all")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--method", default="jvp", choices=("jvp", "last_layer"))
    p.add_argument("--no-all-reduce", dest="all_reduce", action="store_false", help="per-rank validation gradient")
    p.add_argument("-j", "--workers", type=int, default=0)
    p.add_argument("--check", action="store_true", help="print whether the model replicas are equal at the end")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    # %% DDP: one process per device; torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device(args.device)
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)  # before the first collective (nccl's object exchange uses it)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    # %% Data: the same synthetic 3-class problem on every rank (a real job reads the same files).
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 20, generator=g) * 2

    def sample(n: int) -> TensorDataset:
        y = torch.randint(0, 3, (n,), generator=g)
        return TensorDataset(centers[y] + torch.randn(n, 20, generator=g), y)

    train, holdout, test = sample(2048), sample(512), sample(2000)

    # DDP: each rank reads its own shard; the flags come from (seed, epoch), so they do not depend on the rank.
    train_set = SaflexDataset(train, mirror)
    shard = DistributedSampler(train, shuffle=True, seed=0) if distributed else torch.utils.data.RandomSampler(train)
    batches = SaflexBatchSampler(shard, args.batch_size, p=0.5, seed=0, drop_last=True)
    loader = DataLoader(train_set, batch_sampler=batches, collate_fn=train_set.collate_fn(), num_workers=args.workers)
    # The held-out stream: each rank its own shard; SaflexLoss averages the ranks' gradients (all_reduce=True).
    val_sampler = DistributedSampler(holdout, shuffle=True, seed=1) if distributed else None
    val_loader = DataLoader(holdout, batch_size=64, sampler=val_sampler, shuffle=val_sampler is None, drop_last=True)

    # %% Model, DDP wrapper, loss.
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if distributed else model  # DDP
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    criterion = SaflexLoss(
        ddp,  # the wrapper is fine: the validation gradient and the JVP run on ddp.module, without reducer hooks
        val_loader,  # this rank's validation shard, cycled; the ranks' loaders may have different lengths
        method=args.method,
        all_reduce=args.all_reduce,  # average the validation gradient and decide on the global batch (default)
    )

    step, epoch = 0, 0
    while step < args.steps:
        batches.set_epoch(epoch)  # DDP: new flags and a new shard order every epoch (forwarded to the sampler)
        for inputs, target in loader:
            inputs, target = inputs.to(device), target.to(device)
            loss = criterion(ddp(inputs), target)
            optimizer.zero_grad()
            loss.backward()  # DDP averages the gradients; SaflexLoss normalises by the local batch size
            optimizer.step()
            if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
                s = criterion.stats  # global: identical on every rank
                print(f"step {step:3d}  loss {loss.item():.3f}  augmented {s['augmented_fraction']:.2f}  "
                      f"mean weight {s['weight_mean']:.2f}  relabeled {s['relabeled_fraction']:.2f}", flush=True)
            step += 1
            if step == args.steps:
                break
        epoch += 1

    # %% Evaluation on rank 0, and the replica check.
    if args.check and distributed:
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        replicas = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(replicas, flat)
        if rank == 0:
            print(f"replicas equal: {all(torch.equal(r, replicas[0]) for r in replicas)}")
    if rank == 0:
        with torch.no_grad():
            x, y = test.tensors
            accuracy = (model(x.to(device)).argmax(1).cpu() == y).float().mean().item()
        print(f"world size {world}, test accuracy {accuracy:.3f}", flush=True)
    if distributed:
        # DDP's reducer (kept alive by the wrapper and the criterion) must go before its process group does:
        # destroyed after it, at interpreter exit, gloo aborts the process ("terminate called ...").
        del ddp, criterion
        gc.collect()
        dist.barrier()  # rank 0 evaluated alone: tear the process group down together
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
