# needs: pip install '.[timm]' (in a clone)
"""Train any timm model on an image folder with SAFLEX on or off, built from timm's own factories.

Folder layout (timm's ``create_dataset`` ImageFolder reader): ``DATA/train/<class>/*.png``, ``DATA/holdout/...``
(SAFLEX's held-out stream; never the split you report) and ``DATA/validation/...`` (evaluation).

    python examples/timm_train.py --data-dir DATA --model resnet10t --epochs 2 --device cpu --amp --amp-dtype bfloat16
    python examples/timm_train.py --data-dir DATA --model resnet10t --no-saflex          # plain timm recipe
    python examples/timm_train.py --data-dir DATA --aug-splits 2 --channels-last --torchcompile

The two SAFLEX changes against a plain timm loop are marked ``# SAFLEX``: the training loader
(``create_train_loader`` = ``create_loader`` with tagged targets) and the loss (``SaflexLoss`` with the validation
stream from ``create_val_loader``).
"""

# %%
from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn as nn
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.models import create_model
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import NativeScaler, accuracy, random_seed

from saflex_data import SaflexLoss
from saflex_data.adapters.timm import SaflexTask, ValPrepare, create_train_loader, create_val_loader, has_task_api
from saflex_data.functional import Rule
from saflex_data.loss import DEFAULT_RULE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--train-split", default="train")
    p.add_argument("--saflex-split", default="holdout", help="held-out split for SAFLEX's validation gradient")
    p.add_argument("--val-split", default="validation", help="evaluation split ('' to skip evaluation)")
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("-b", "--batch-size", type=int, default=16)
    p.add_argument("--val-batch-size", type=int, default=None, help="SAFLEX validation minibatch (default: -b)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: full epochs)")
    p.add_argument("--opt", default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--sched", default="cosine")
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--smoothing", type=float, default=0.0)
    p.add_argument("--aa", default="rand-m9-mstd0.5", help="timm auto_augment policy (the augmentation SAFLEX tunes)")
    p.add_argument("--color-jitter", type=float, default=0.4)
    p.add_argument("--aug-prob", type=float, default=0.5, help="fraction of samples that get --aa (per-sample tags)")
    p.add_argument("--aug-splits", type=int, default=0, help="2: timm's [clean; augmented] batches instead")
    p.add_argument("--no-saflex", dest="saflex", action="store_false", help="plain timm training (cross-entropy)")
    p.add_argument("--method", default="last_layer", choices=("last_layer", "jvp", "single_pass"))
    p.add_argument("--rule", default=None, help="SAFLEX rule (default: the library's)")
    p.add_argument("--beta", type=float, default=None, help="original-label bonus (default: the rule's own)")
    p.add_argument("--tau", type=float, default=None, help="Gumbel-softmax temperature (default: the library's)")
    p.add_argument("--use-task", action="store_true", help="use SaflexTask (timm >= 1.0.23) for task(input, target)")
    p.add_argument("--no-prefetcher", dest="prefetcher", action="store_false")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--torchcompile", nargs="?", const="inductor", default=None, help="torch.compile backend")
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--summary", default="", help="write a JSON summary (losses, SAFLEX stats, accuracy) here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    random_seed(args.seed)  # torch, numpy and random (timm's RandAugment draws from random)
    device = torch.device(args.device)

    # %% model, data config, memory format, compile
    dataset_train = create_dataset("", root=args.data_dir, split=args.train_split, is_training=True)
    num_classes = len(dataset_train.reader.class_to_idx)
    model = create_model(args.model, num_classes=num_classes, pretrained=False)
    data_config = resolve_data_config({"img_size": args.img_size} if args.img_size else {}, model=model)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    train_model = torch.compile(model, backend=args.torchcompile) if args.torchcompile else model

    amp_dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext
    loss_scaler = NativeScaler() if args.amp and amp_dtype == torch.float16 and device.type == "cuda" else None

    # %% loaders: timm's create_loader; with SAFLEX the training batches carry SaflexTarget tags
    common = dict(
        mean=data_config["mean"], std=data_config["std"], use_prefetcher=args.prefetcher, device=device,
        num_workers=args.workers, pin_memory=device.type == "cuda",
    )
    train_aug = dict(auto_augment=args.aa, color_jitter=args.color_jitter, interpolation=data_config["interpolation"])
    if args.saflex:
        loader_train = create_train_loader(  # SAFLEX: the loader swap
            dataset_train, data_config["input_size"], args.batch_size,
            aug_prob=args.aug_prob, num_aug_splits=args.aug_splits, **train_aug, **common,
        )
        dataset_saflex = create_dataset("", root=args.data_dir, split=args.saflex_split, is_training=False)
        loader_saflex = create_val_loader(
            dataset_saflex, data_config["input_size"], args.val_batch_size or args.batch_size,
            train_loader=loader_train, crop_pct=data_config["crop_pct"], interpolation=data_config["interpolation"],
            num_workers=args.workers, seed=args.seed,
        )
        # SAFLEX: the loss swap (prepare: channels_last like the model; warns if normalisation differs)
        # Only what was asked for on the command line: everything else keeps the library's defaults.
        settings = {k: getattr(args, k) for k in ("beta", "tau") if getattr(args, k) is not None}
        rule_kwargs = {"rule": Rule(args.rule or DEFAULT_RULE, **settings)} if args.rule or settings else {}
        criterion = SaflexLoss(
            model, loader_saflex, method=args.method, label_smoothing=args.smoothing,
            prepare=ValPrepare.from_model(model), seed=args.seed, **rule_kwargs,
        )
    else:
        loader_train = create_loader(
            dataset_train, data_config["input_size"], args.batch_size, is_training=True, **train_aug, **common,
        )
        criterion = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else nn.CrossEntropyLoss()
    task = None
    if args.use_task:
        if not (args.saflex and has_task_api()):
            raise SystemExit("--use-task needs SAFLEX on and timm >= 1.0.23")
        task = SaflexTask(model, criterion=criterion, device=device, verbose=False)
        if args.torchcompile:
            task.compile(backend=args.torchcompile)

    # %% optimizer and schedule (timm factories)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(loader_train) if not args.steps else min(len(loader_train), args.steps)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        min_lr=args.lr * 0.01, updates_per_epoch=steps_per_epoch,
    )
    num_epochs = args.epochs

    # %% evaluation (timm's create_loader, is_training=False): plain cross-entropy and top-1 before and after
    evaluate = None
    if args.val_split:
        dataset_eval = create_dataset("", root=args.data_dir, split=args.val_split, is_training=False)
        loader_eval = create_loader(
            dataset_eval, data_config["input_size"], args.batch_size, is_training=False,
            crop_pct=data_config["crop_pct"], interpolation=data_config["interpolation"], **common,
        )

        @torch.no_grad()
        def evaluate() -> dict:
            model.eval()
            loss_sum = correct = total = 0.0
            for input, target in loader_eval:
                if not args.prefetcher:
                    input, target = input.to(device), target.to(device)
                if args.channels_last:
                    input = input.contiguous(memory_format=torch.channels_last)
                with amp_autocast():
                    output = model(input)
                loss_sum += float(nn.functional.cross_entropy(output.float(), target, reduction="sum"))
                correct += float(accuracy(output.float(), target, topk=(1,))[0]) * len(target) / 100
                total += len(target)
            return {"loss": loss_sum / max(total, 1), "top1": 100 * correct / max(total, 1)}

    eval_before = evaluate() if evaluate is not None else None

    # %% train
    losses: list[float] = []
    saflex_log: list[dict] = []
    step = 0
    start = time.time()
    for epoch in range(num_epochs):
        model.train()
        for _batch_idx, (input, target) in enumerate(loader_train):
            if not args.prefetcher:
                input, target = input.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                if task is not None:
                    loss = task(input, target)["loss"]
                else:
                    output = train_model(input)
                    loss = criterion(output, target)
            optimizer.zero_grad(set_to_none=True)
            if loss_scaler is not None:
                loss_scaler(loss, optimizer)
            else:
                loss.backward()
                optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
            losses.append(float(loss.detach()))
            if args.saflex:
                saflex_log.append(criterion.stats)
            if step % args.log_interval == 0 or step == 1:
                msg = f"epoch {epoch} step {step}: loss {losses[-1]:.4f} lr {optimizer.param_groups[0]['lr']:.2e}"
                if args.saflex:
                    s = criterion.stats
                    msg += (
                        f" | saflex aug {s['augmented_fraction']:.2f} kept {s['kept_fraction']:.2f} "
                        f"relabeled {s['relabeled_fraction']:.2f} weight {s['weight_mean']:.2f}"
                    )
                print(msg, flush=True)
            if args.steps and step >= args.steps:
                break
        scheduler.step(epoch + 1)
        if args.steps and step >= args.steps:
            break

    # %% evaluate on the evaluation split (timm's create_loader, is_training=False)
    eval_after = evaluate() if evaluate is not None else None
    if eval_after is not None:
        print(f"eval loss {eval_before['loss']:.4f} -> {eval_after['loss']:.4f}, top1 {eval_after['top1']:.2f}%")

    k = max(1, min(5, len(losses) // 3))
    summary = {
        "steps": step,
        "seconds": time.time() - start,
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "losses": losses,
        "saflex": saflex_log,
        "op_stats": criterion.op_stats() if args.saflex else {},
        "eval_before": eval_before,
        "eval_after": eval_after,
        "finite": all(math.isfinite(v) for v in losses),
    }
    print(f"loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f} over {step} steps")
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f)
    return summary


if __name__ == "__main__":
    main()
