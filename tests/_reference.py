"""Slow, obviously-correct twins of the fast SAFLEX math, for tests only (float64, per-sample autograd loops)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def reference_validation_gradient(
    model: nn.Module, inputs: Tensor, targets: Tensor, temperature: float = 1.0
) -> dict[str, Tensor]:
    """``∇θ mean T·CE(z/T)`` by a plain ``backward()`` on a deep copy (so nothing of the original is touched).

    ``temperature=inf``: the limit loss ``-(z_y - mean_k z_k)``, written out.
    """
    clone = copy.deepcopy(model)
    clone.zero_grad(set_to_none=True)
    logits = clone(inputs)
    if temperature == float("inf"):
        loss = -(logits.gather(1, targets[:, None]).squeeze(1) - logits.mean(-1)).mean()
    else:
        loss = temperature * F.cross_entropy(logits / temperature, targets)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in clone.named_parameters() if p.requires_grad}


def reference_inner_products(model: nn.Module, inputs: Tensor, val_grad: dict[str, Tensor]) -> Tensor:
    """``Π[i, k] = <∇θ (-log softmax(model(inputs))[i, k]), val_grad>``, one backward per (i, k).

    The whole batch is forwarded once (BatchNorm in train mode couples the samples); each entry differentiates the
    loss of one sample and class. Runs on a deep copy, so running statistics of ``model`` are never touched.
    """
    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    logits = clone(inputs)
    log_p = torch.log_softmax(logits, -1)
    batch, classes = logits.shape
    pi = torch.zeros(batch, classes, dtype=torch.float64)
    for i in range(batch):
        for k in range(classes):
            grads = torch.autograd.grad(-log_p[i, k], [params[n] for n in val_grad], retain_graph=True,
                                        allow_unused=True)
            pi[i, k] = sum(float((g.double() * val_grad[n].double()).sum())
                           for n, g in zip(val_grad, grads, strict=False) if g is not None)
    return pi


def l2r_meta_gradient(model: nn.Module, inputs: Tensor, labels: Tensor, val_inputs: Tensor, val_labels: Tensor,
                      lr: float) -> Tensor:
    """Ren et al. (2018) "Learning to Reweight": ``d/dε_i L_val(θ - lr Σ_j ε_j ∇ℓ_j(θ))`` at ``ε = 0``.

    Computed literally with a differentiable virtual SGD step (double backward).
    """
    clone = copy.deepcopy(model)
    names = [n for n, p in clone.named_parameters() if p.requires_grad]
    params = dict(clone.named_parameters())
    eps = torch.zeros(inputs.shape[0], dtype=inputs.dtype, requires_grad=True)
    losses = F.cross_entropy(clone(inputs), labels, reduction="none")
    grads = torch.autograd.grad((eps * losses).sum(), [params[n] for n in names], create_graph=True)
    stepped = {n: params[n] - lr * g for n, g in zip(names, grads, strict=False)}
    val_loss = F.cross_entropy(torch.func.functional_call(clone, stepped, (val_inputs,)), val_labels)
    (meta,) = torch.autograd.grad(val_loss, eps)
    return meta
