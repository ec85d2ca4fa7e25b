"""SAFLEX core math: gradient inner products, sample weights and soft labels.

Ding et al., "SAFLEX: Self-Adaptive Augmentation via Feature Label Extrapolation", ICLR 2024
(https://arxiv.org/abs/2410.02512). The derivation, in the repository's ``docs/method.md``, also says where the
library departs from the paper.

For an augmented sample ``x_i`` with per-class losses ``ℓ_k = -log p_k(x_i)`` and the validation gradient
``g = ∇θ L_val``, the gain of training ``x_i`` with label ``k`` for one SGD step is::

    Π_ik = <∇θ ℓ_k(x_i), g> = u_ik - Σ_j p_ij u_ij,     u_i = J_z(x_i) · (-g)

(one forward-mode JVP of the logits along ``-g``). SAFLEX keeps the upstream label unless another class wins by a
margin, and drops the sample when even the chosen label has negative gain: ``w_i = 1[y_iᵀ Π_i ≥ 0]``.

That is the paper's rule (``rule="paper"``). The recommended rule, ``rule="margin"``, first z-scores each class
column of ``Π`` over the batch (removing the batch-global class direction of ``g``) and drops a sample whose
upstream label trails the best class by more than ``β`` batch standard deviations, without relabelling (the
paper's rule relabels most samples near-randomly). The ``gain`` rules drop samples whose own label helps the
validation loss far less than the batch's, which can act when no label is wrong. How each rule compares with the
alternatives a user already has (the model's own loss, Learning to Reweight, training on the validation split) is
measured on known-truth streams in ``benchmarks/suite``.

``g`` may be the gradient of a tempered validation loss ``T · CE(z / T, y)`` (:func:`validation_residual`, not in
the paper): with ``T = 1`` the validation residuals ``softmax(z) - y`` fade once the model fits the validation
samples, and ``Π`` with them; ``SaflexLoss`` uses ``T = 4`` by default.

Everything here is a pure function: no module state, no global RNG, outputs on the input's device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD
from torch.func import functional_call

from . import rules as _rules
from ._common import as_probabilities as _as_probabilities

__all__ = [
    "validation_gradient",
    "validation_residual",
    "last_layer_validation_gradient",
    "grad_inner_products",
    "inner_products_from_tangent",
    "last_layer_inner_products",
    "forward_with_tangent",
    "saflex_targets",
    "default_beta",
    "standardize_inner_products",
    "weight_scores",
    "own_label_gain",
    "adaptive_keep",
    "find_classifier",
    "BatchStatsCapture",
    "Rule",
    "Method",
    "RuleName",
    "Normalize",
]

Method = Literal["jvp", "last_layer", "autograd"]
RuleName = Literal["paper", "centered", "margin", "margin_relabel", "margin_fix", "gain", "gain_auto", "gain_loss"]
Normalize = Literal["batch_max", "row_max", "none"]

_RULES = ("paper", "centered", "margin", "margin_relabel", "margin_fix", "gain", "gain_auto", "gain_loss")
_MARGIN_RULES = ("margin", "margin_relabel", "margin_fix")
_GAIN_RULES = ("gain", "gain_auto", "gain_loss")
# rules that read saflex_targets(..., logits=) (and the gated rules' p[y]); exchanged under DDP
_RULES_USING_LOGITS: tuple[str, ...] = ("gain_loss", *_rules.GATED_RULES)
_NORMALIZE = ("batch_max", "row_max", "none")
_CLASSIFIER_ATTRS = ("fc", "classifier", "head", "last_linear", "linear", "out", "output")


# ---------------------------------------------------------------------------------------------------------------
# Input checks (one place; the rest of the module trusts its inputs)
# ---------------------------------------------------------------------------------------------------------------
def check_targets(targets: Tensor, batch_size: int, num_classes: int, name: str = "targets") -> None:
    """Raise a clear error unless ``targets`` are class indices `(B,)` in ``[0, K)`` or probabilities `(B, K)`."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"{name} must be a tensor, but got {type(targets).__name__}.")
    if targets.dim() == 1 and not targets.is_floating_point() and targets.dtype != torch.bool:
        if targets.shape[0] != batch_size:
            raise ValueError(
                f"{name} must have shape ({batch_size},) to match logits of shape ({batch_size}, {num_classes}), "
                f"but got {tuple(targets.shape)}."
            )
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
            raise ValueError(
                f"{name} must be class indices in [0, {num_classes}) for a model with {num_classes} outputs, "
                f"but got values in [{int(targets.min())}, {int(targets.max())}]."
            )
        return
    if targets.dim() == 2 and targets.is_floating_point():
        if tuple(targets.shape) != (batch_size, num_classes):
            raise ValueError(
                f"{name} given as probabilities must have shape ({batch_size}, {num_classes}) to match the logits, "
                f"but got {tuple(targets.shape)}."
            )
        sums = targets.sum(-1)
        if targets.numel() and (
            bool((targets < -1e-6).any()) or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3)
        ):
            raise ValueError(
                f"{name} given as probabilities must be non-negative and sum to 1 over classes, but got row sums "
                f"in [{float(sums.min()):.4g}, {float(sums.max()):.4g}] and minimum {float(targets.min()):.4g}."
            )
        return
    raise ValueError(
        f"{name} must be class indices of shape ({batch_size},) (int) or probabilities of shape "
        f"({batch_size}, {num_classes}) (float), but got a tensor of shape {tuple(targets.shape)} and dtype "
        f"{targets.dtype}."
    )


def check_temperature(temperature: float, name: str = "temperature") -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{name} must be a float > 0 (math.inf allowed), but got {temperature!r}.")


def check_logits(logits: Tensor, name: str = "logits") -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"shape {tuple(logits.shape)} and dtype {logits.dtype}" if isinstance(logits, Tensor) else type(logits)
        raise ValueError(f"{name} must be a float tensor of shape (B, K), but got {got}.")


# ---------------------------------------------------------------------------------------------------------------
# Model helpers
# ---------------------------------------------------------------------------------------------------------------
def _trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def _running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Run BatchNorm without touching its buffers.

    With ``track_running_stats=False`` a train-mode BN normalises with the batch statistics and an eval-mode BN with
    its running statistics, as usual, but neither updates a buffer. This also keeps ``torch.func.jvp`` working:
    it refuses the in-place running-stat update of a dual tensor (``docs/method.md#pitfalls``).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def find_classifier(model: nn.Module, classifier: nn.Module | str | None = None) -> tuple[str, nn.Linear]:
    """Return ``(qualified_name, module)`` of the model's final linear layer.

    Looks at ``classifier`` (a module or its name in ``named_modules()``) when given, then timm's
    ``get_classifier()``, then the attributes ``fc``/``classifier``/``head``/..., then the last ``nn.Linear``.

    Raises:
        ValueError: If no ``nn.Linear`` classifier can be found.
    """
    names = {id(m): n for n, m in model.named_modules()}
    hint = (
        "Pass it explicitly, e.g. SaflexLoss(model, val_loader, classifier=model.fc) or classifier='head.fc' "
        "(a torch.nn.Linear producing the logits), or use method='jvp'."
    )
    candidate: nn.Module | None = None
    if isinstance(classifier, str):
        modules = dict(model.named_modules())
        if classifier not in modules:
            raise ValueError(f"classifier={classifier!r} is not a submodule of the model. {hint}")
        candidate = modules[classifier]
    elif isinstance(classifier, nn.Module):
        candidate = classifier
    elif classifier is not None:
        raise TypeError(f"classifier must be an nn.Module, a submodule name or None, but got {type(classifier)}.")
    else:
        get = getattr(model, "get_classifier", None)
        if callable(get):
            with contextlib.suppress(Exception):
                candidate = get()
        if not isinstance(candidate, nn.Linear):
            candidate = None
            for attr in _CLASSIFIER_ATTRS:
                sub = getattr(model, attr, None)
                if isinstance(sub, nn.Linear):
                    candidate = sub
                    break
                if isinstance(sub, nn.Module):
                    linears = [m for m in sub.modules() if isinstance(m, nn.Linear)]
                    if linears:
                        candidate = linears[-1]
                        break
        if candidate is None:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            candidate = linears[-1] if linears else None
    if not isinstance(candidate, nn.Linear) or id(candidate) not in names:
        found = "nothing" if candidate is None else type(candidate).__name__
        raise ValueError(f"could not find the model's classifier for method='last_layer' (found {found}). {hint}")
    return names[id(candidate)], candidate


class _FeatureCapture:
    """Forward hook that records the input of a module (the penultimate features for a classifier)."""

    def __init__(self, module: nn.Module) -> None:
        self.features: Tensor | None = None
        self.output: Tensor | None = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.features, self.output = args[0], output

    def remove(self) -> None:
        self.handle.remove()


def _forward_features(model: nn.Module, classifier: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    capture = _FeatureCapture(classifier)
    try:
        logits = model(inputs)
    finally:
        capture.remove()
    check_logits(logits)
    if capture.features is None or capture.output is None or capture.output.shape != logits.shape:
        raise ValueError(
            f"the classifier {type(classifier).__name__} did not produce the model's logits of shape "
            f"{tuple(logits.shape)}; pass classifier=<the nn.Linear whose output is the logits> or use method='jvp'."
        )
    if capture.output is not logits and not torch.equal(capture.output, logits):
        raise ValueError(
            "the model transforms the classifier's output before returning it, so method='last_layer' would be "
            "wrong; pass classifier=<the nn.Linear whose output is the logits> or use method='jvp'."
        )
    return capture.features.flatten(1), logits


# ---------------------------------------------------------------------------------------------------------------
# Validation gradient
# ---------------------------------------------------------------------------------------------------------------
def validation_residual(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """``softmax(z / T) - y``: what the validation loss pushes on each logit (``T = inf``: ``1/K - y``).

    ``T = 1`` is the cross-entropy gradient w.r.t. the logits. For ``T > 1`` it is the gradient of the tempered
    loss ``T · CE(z / T, y)`` (not in the paper): once the model fits the validation samples, ``softmax(z) - y``
    fades to zero and with it every inner product ``Π``, except for the few misclassified validation samples;
    a tempered residual stays of order one, so each validation sample keeps voting for its class. ``T = inf`` is
    the limit ``1/K - y`` (the gradient of the linear loss ``-(z_y - mean_k z_k)``).

    Args:
        logits: Logits `(V, K)`.
        targets: Class indices `(V,)` or probabilities `(V, K)`.
        temperature: ``T > 0``; ``math.inf`` allowed.

    Returns:
        The residual `(V, K)`, float32 or wider.
    """
    check_temperature(temperature)
    check_logits(logits)
    check_targets(targets, logits.shape[0], logits.shape[1], "targets")
    dtype = torch.promote_types(logits.dtype, torch.float32)  # never below float32, keep float64
    y = _as_probabilities(targets, logits.shape[1], dtype)
    if math.isinf(temperature):
        return torch.full_like(y, 1.0 / logits.shape[1]) - y
    z = logits.detach().to(dtype)
    return torch.softmax(z if temperature == 1.0 else z / temperature, -1) - y


def validation_gradient(
    model: nn.Module, inputs: Tensor, targets: Tensor, *, temperature: float = 1.0
) -> dict[str, Tensor]:
    """Gradient of the mean cross-entropy of ``model(inputs)`` against ``targets``.

    The model runs in its current mode (use ``model.eval()`` first for running-statistics BatchNorm and no dropout).
    No buffer (BatchNorm running statistics), no ``.grad`` and not the mode are changed.

    Args:
        model: Any classifier returning logits of shape `(V, K)`.
        inputs: Validation inputs of batch size `V`.
        targets: Class indices `(V,)` or probabilities `(V, K)`.
        temperature: ``T``: the gradient of the tempered loss ``T · CE(z / T, y)`` instead (see
            :func:`validation_residual`); ``1`` is the plain cross-entropy.

    Returns:
        ``{name: grad}`` for every parameter with ``requires_grad``, keyed as in ``named_parameters()``
        (zeros for parameters the loss does not reach).

    Example:
        >>> model = nn.Linear(3, 2)
        >>> g = validation_gradient(model, torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
        >>> sorted(g), tuple(g["weight"].shape)
        (['bias', 'weight'], (2, 3))
    """
    check_temperature(temperature)
    params = _trainable_parameters(model)
    if not params:
        raise ValueError("model has no parameter with requires_grad=True; there is nothing to compute a gradient of.")
    with torch.enable_grad(), _running_stats_frozen(model):
        logits = model(inputs)
        check_logits(logits, "model(inputs)")
        check_targets(targets, logits.shape[0], logits.shape[1], "targets")
        dtype = torch.promote_types(logits.dtype, torch.float32)  # never below float32, keep float64
        if temperature == 1.0:
            loss = F.cross_entropy(logits.to(dtype), targets.to(dtype) if targets.dim() == 2 else targets.long())
        else:
            # d/dz of T·CE(z/T, y) is the (constant) residual: backpropagate it through the logits.
            residual = validation_residual(logits, targets, temperature)
            loss = (residual * logits.to(dtype)).sum() / logits.shape[0]
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {
        name: (torch.zeros_like(p) if g is None else g.to(p.dtype)) for (name, p), g in zip(params.items(), grads)
    }


def last_layer_validation_gradient(
    features: Tensor, logits: Tensor, targets: Tensor, *, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Closed-form gradient of the mean CE w.r.t. the last linear layer ``z = W h + b``.

    ``G_W = (p - y)ᵀ h / V`` and ``G_b = mean(p - y)``; no backward pass is needed. With ``temperature`` ``T``,
    ``p - y`` is the tempered residual of :func:`validation_residual`.

    Args:
        features: Penultimate features `(V, D)`.
        logits: Logits `(V, K)`.
        targets: Class indices `(V,)` or probabilities `(V, K)`.
        temperature: ``T > 0`` (``math.inf`` allowed); ``1`` is the plain cross-entropy.

    Returns:
        ``(grad_weight (K, D), grad_bias (K,))``.
    """
    residual = validation_residual(logits, targets, temperature)  # checks logits and targets
    # v = validation batch, k = classes, d = feature dim
    grad_weight = torch.einsum("vk,vd->kd", residual, features.to(residual.dtype)) / logits.shape[0]
    return grad_weight, residual.mean(0)


# ---------------------------------------------------------------------------------------------------------------
# Gradient inner products Π
# ---------------------------------------------------------------------------------------------------------------
def inner_products_from_tangent(logits: Tensor, tangent: Tensor) -> Tensor:
    """``Π = u - (p·u) 1ᵀ`` from logits and their directional derivative ``u = J_z · (-g)``.

    Args:
        logits: Logits `(B, K)`.
        tangent: Tangent of the logits along ``-g``, shape `(B, K)`.

    Returns:
        ``Π`` of shape `(B, K)` in float32 (float64 when the inputs are float64).
    """
    dtype = torch.promote_types(torch.promote_types(logits.dtype, tangent.dtype), torch.float32)
    p = torch.softmax(logits.detach().to(dtype), -1)
    u = tangent.detach().to(dtype)
    return u - (p * u).sum(-1, keepdim=True)


def last_layer_inner_products(
    features: Tensor, logits: Tensor, grad_weight: Tensor, grad_bias: Tensor | None = None
) -> Tensor:
    """``Π`` restricted to the last linear layer: ``s_i = G_W h_i + G_b``, ``Π_ik = p_iᵀ s_i - s_ik``
    (``docs/method.md#computing-pi``).

    Args:
        features: Penultimate features `(B, D)` (the classifier's input).
        logits: Logits `(B, K)`.
        grad_weight: Validation gradient of the classifier weight `(K, D)`.
        grad_bias: Validation gradient of the classifier bias `(K,)`, or ``None`` (no or frozen bias).
    """
    dtype = torch.promote_types(torch.promote_types(logits.dtype, grad_weight.dtype), torch.float32)
    # s = h G_Wᵀ + G_b, (B, D) x (D, K): one matrix product (a plain mm; einsum's bmm route measured ~35% slower)
    h, gw = features.detach().to(dtype), grad_weight.to(dtype)
    s = h @ gw.T if grad_bias is None else torch.addmm(grad_bias.to(dtype), h, gw.T)
    # The logit tangent along -g is -s.
    return inner_products_from_tangent(logits, -s)


def _jvp_logits(
    model: nn.Module,
    inputs: Tensor,
    val_grad: Mapping[str, Tensor],
    batch_stats: Mapping[str, tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    params = dict(model.named_parameters())
    unknown = [n for n in val_grad if n not in params]
    if unknown:
        raise ValueError(f"val_grad has keys that are not parameters of the model: {unknown[:3]}.")
    # Forward-mode AD on dual parameters under no_grad: no autograd graph is recorded for the primal or the tangent
    # (the same formulas as torch.func.jvp, measured 20-30% faster on a CPU ResNet-18 without functorch's wrappers).
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(_running_stats_frozen(model))
        if batch_stats is not None:
            stack.enter_context(_fixed_batch_stats(model, batch_stats))
        stack.enter_context(_math_attention())
        stack.enter_context(_quiet_forward_ad())
        stack.enter_context(fwAD.dual_level())
        duals = {}
        for n, g in val_grad.items():
            p = params[n].detach()
            duals[n] = fwAD.make_dual(p, -g.to(dtype=p.dtype, device=p.device))
        out = functional_call(model, duals, (inputs,), strict=False)
        logits, tangent = fwAD.unpack_dual(out)
    check_logits(logits, "model(inputs)")
    if tangent is None:  # no parameter in val_grad reaches the logits
        tangent = torch.zeros_like(logits)
    return logits, tangent


def _uses_batch_stats(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None)


def _batch_statistics(module: nn.Module, args: tuple) -> tuple[Tensor, Tensor] | None:
    """``(mean, biased variance)`` a BatchNorm normalised its input ``args[0]`` with, detached; ``None`` when it used
    its running statistics or ran inside :func:`_fixed_batch_stats`."""
    fixed = getattr(module.__dict__.get("forward"), "fixed_batch_stats", False)
    if fixed or not args or not _uses_batch_stats(module):
        return None
    with torch.no_grad():
        x = args[0].detach()
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
    return mean, var


class BatchStatsCapture:
    """Forward hooks that record the batch statistics each BatchNorm of ``model`` normalises with.

    A train-mode BatchNorm (or one without running statistics) normalises with the mean and biased variance of its
    input batch; the hooks record them, detached, for every forward while ``skip()`` is false. Pass ``stats`` to
    ``grad_inner_products(..., batch_stats=capture.stats)`` to compute ``Π`` of a subset of the batch with the
    whole batch's statistics held fixed. Recording costs one mean/variance reduction per BatchNorm and forward.

    Args:
        model: The model whose BatchNorm modules are watched.
        skip: Called at each forward; nothing is recorded while it returns True (e.g. during a loss's own passes).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
        >>> capture = BatchStatsCapture(model)
        >>> _ = model(torch.randn(8, 3))
        >>> sorted(capture.stats), tuple(capture.stats["1"][0].shape), capture.batch_size
        (['1'], (4,), 8)
        >>> capture.remove()
    """

    def __init__(self, model: nn.Module, skip: Callable[[], bool] | None = None) -> None:
        self.stats: dict[str, tuple[Tensor, Tensor]] = {}
        self.batch_size: int | None = None
        self._skip = skip
        self.handles = [
            m.register_forward_hook(functools.partial(self._record, name))
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]

    def _record(self, name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        stats = None if self._skip is not None and self._skip() else _batch_statistics(module, args)
        if stats is not None:
            self.stats[name] = stats
            self.batch_size = args[0].shape[0]

    def pop(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The statistics recorded since the last ``pop()`` (and forget them)."""
        stats, self.stats, self.batch_size = self.stats, {}, None
        return stats

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@contextlib.contextmanager
def _fixed_batch_stats(model: nn.Module, batch_stats: Mapping[str, tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Every BatchNorm that would normalise with batch statistics normalises with ``batch_stats[name]`` instead.

    The statistics are constants here, so a JVP gives them no tangent.
    """
    patched = []
    try:
        for name, m in model.named_modules():
            if not _uses_batch_stats(m):
                continue
            if name not in batch_stats:
                raise ValueError(
                    f"batch_stats has no entry for the BatchNorm {name!r}, which normalises with batch statistics; "
                    f"got entries for {sorted(batch_stats)[:5]} (record them with BatchStatsCapture during the "
                    "training forward of the same batch)."
                )
            if isinstance(m, nn.SyncBatchNorm) and torch.distributed.is_available() and \
                    torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                raise ValueError(
                    f"batch_stats cannot fix SyncBatchNorm {name!r} across ranks (it normalises with the global "
                    "batch's statistics, the capture sees this rank's); use method='jvp' (exact)."
                )
            mean, var = batch_stats[name]

            def forward(input: Tensor, m: nn.Module = m, mean: Tensor = mean, var: Tensor = var) -> Tensor:
                return F.batch_norm(input, mean.to(input.dtype), var.to(input.dtype), m.weight, m.bias, False, 0.0,
                                    m.eps)

            forward.fixed_batch_stats = True  # type: ignore[attr-defined]
            patched.append((m, m.__dict__.get("forward")))
            m.forward = forward
        yield
    finally:
        for m, previous in patched:
            if previous is None:
                del m.forward
            else:
                m.forward = previous


@contextlib.contextmanager
def _quiet_forward_ad() -> Iterator[None]:
    """torch loads its forward-AD decompositions with ``torch.jit.script`` on first use, which warns that jit is
    deprecated; that warning is about torch's internals, not the user's code."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        yield


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """Forward-mode AD is not implemented for fused SDPA kernels nor for eval-mode ``nn.MultiheadAttention``'s fast
    path (``aten::_native_multi_head_attention``); the math kernel has it."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def _autograd_inner_products(model: nn.Module, inputs: Tensor, val_grad: Mapping[str, Tensor]) -> Tensor:
    params = dict(model.named_parameters())
    names = list(val_grad)
    with torch.enable_grad(), _running_stats_frozen(model):
        logits = model(inputs)
        check_logits(logits, "model(inputs)")
        log_p = torch.log_softmax(logits, -1)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        pi = torch.empty(logits.shape, dtype=dtype, device=logits.device)
        for i in range(logits.shape[0]):
            for k in range(logits.shape[1]):
                grads = torch.autograd.grad(
                    -log_p[i, k], [params[n] for n in names], retain_graph=True, allow_unused=True
                )
                pi[i, k] = sum(
                    (g.to(dtype) * val_grad[n].to(dtype)).sum() for n, g in zip(names, grads) if g is not None
                )
    return pi


def grad_inner_products(
    model: nn.Module,
    inputs: Tensor,
    val_grad: Mapping[str, Tensor],
    *,
    method: Method = "jvp",
    classifier: nn.Module | str | None = None,
    batch_stats: Mapping[str, tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """``Π[i, k] = <∇θ ℓ_k(inputs[i]), val_grad>`` for every sample and class.

    The model runs in its current mode (train-mode BatchNorm normalises with the statistics of ``inputs``, so each
    row depends on the whole batch, exactly as in the training step that forwards this batch). No buffer, no
    ``.grad`` and not the mode are changed.

    Train-mode BatchNorm and a subset of the batch: the exact ``Π`` of the augmented rows of a step also carries
    the tangent of the batch statistics, which depend on ``θ`` through every row, so it needs the JVP of the whole
    batch (forward all rows, keep the augmented ones). ``batch_stats`` (``method="jvp"`` only) is the cheaper,
    different quantity: the statistics recorded during the training forward (:class:`BatchStatsCapture`) are held
    fixed, the JVP runs over ``inputs`` alone, and ``Π`` is the gradient inner product of a network whose
    BatchNorm layers normalise with those constants (no tangent through the statistics). For a model without
    batch-statistics BatchNorm both are the same.

    Args:
        model: The classifier; returns logits `(B, K)`.
        inputs: The samples `(B, ...)`.
        val_grad: ``{parameter name: gradient}``, e.g. from :func:`validation_gradient`. Parameters not in it
            count as zero.
        method: ``"jvp"`` (exact; one forward-mode pass over the batch), ``"last_layer"`` (closed form from the
            penultimate features; only the classifier's block of ``val_grad`` is used) or ``"autograd"`` (exact,
            slow: one backward per sample and class; a reference and a fallback for ops without forward AD).
        classifier: For ``"last_layer"``: the classifier ``nn.Linear`` or its name; found automatically if None.
        batch_stats: For ``"jvp"``: ``{BatchNorm module name: (mean, biased variance)}`` to normalise with instead
            of the statistics of ``inputs``, held fixed (see above); ``None``: the exact ``Π`` of ``inputs``.

    Returns:
        ``Π`` of shape `(B, K)`, float32 (float64 for a float64 model).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
        >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
        >>> pi = grad_inner_products(model, x, validation_gradient(model, x, y))
        >>> tuple(pi.shape)
        (5, 4)
    """
    if batch_stats is not None and method != "jvp":
        raise ValueError(f"batch_stats is for method='jvp' only, but got method={method!r}.")
    if method == "jvp":
        logits, tangent = _jvp_logits(model, inputs, val_grad, batch_stats)
        return inner_products_from_tangent(logits, tangent)
    if method == "last_layer":
        name, linear = find_classifier(model, classifier)
        weight_name = f"{name}.weight" if name else "weight"
        bias_name = f"{name}.bias" if name else "bias"
        if weight_name not in val_grad:
            raise ValueError(
                f"val_grad has no entry for the classifier weight {weight_name!r}; method='last_layer' needs the "
                "classifier to be trainable."
            )
        with torch.no_grad(), _running_stats_frozen(model):
            features, logits = _forward_features(model, linear, inputs)
        return last_layer_inner_products(features, logits, val_grad[weight_name], val_grad.get(bias_name))
    if method == "autograd":
        return _autograd_inner_products(model, inputs, val_grad)
    raise ValueError(f"method must be one of 'jvp', 'last_layer', 'autograd', but got {method!r}.")


def forward_with_tangent(model: nn.Module, inputs: Tensor, val_grad: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The exact single-pass path: one training forward with dual parameters ``(θ, -g)``.

    Returns the logits, attached to the autograd graph as in a plain ``model(inputs)`` (so the usual
    ``loss.backward()`` follows), and their tangent ``u = J_z · (-g)`` (detached). Dropout masks and BatchNorm batch
    statistics are those of the real step by construction; running statistics are updated as in a plain forward.
    Feed ``inner_products_from_tangent(logits, tangent)`` to get ``Π`` for the whole batch.
    """
    params = dict(model.named_parameters())
    names = [n for n in val_grad if n in params]
    with fwAD.dual_level(), _math_attention(), _quiet_forward_ad():
        duals = {n: fwAD.make_dual(params[n], -val_grad[n].to(params[n])) for n in names}
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(m.running_mean, m.running_var) for m in bns]
        out = functional_call(model, duals, (inputs,), strict=False)
        primal, tangent = fwAD.unpack_dual(out)
    # An in-place running-stat update inside the dual level may have left dual buffers behind: keep their primal.
    for m, (mean, var) in zip(bns, saved):
        m.running_mean, m.running_var = mean, var
    check_logits(primal, "model(inputs)")
    if tangent is None:
        tangent = torch.zeros_like(primal)
    return primal, tangent.detach()


# ---------------------------------------------------------------------------------------------------------------
# Weights and soft labels
# ---------------------------------------------------------------------------------------------------------------
def normalize_inner_products(pi: Tensor, normalize: Normalize = "batch_max") -> Tensor:
    """Put ``Π`` on a unit scale before the β bonus and the Gumbel noise are added.

    ``Π`` scales with ``‖g‖``, and with Gumbel noise its scale acts as an inverse temperature, so a fixed β only
    means something after normalising. ``"batch_max"``: ``Π / mean_i max_k |Π_ik|`` (one scale per batch, keeps
    the ranking across samples); ``"row_max"``: each row by its own ``max_k |Π_ik|``; ``"none"``: raw.
    """
    if normalize == "none":
        return pi
    eps = torch.finfo(pi.dtype).tiny
    row = pi.abs().amax(-1, keepdim=True)
    if normalize == "batch_max":
        return pi / row.mean().clamp_min(eps)
    if normalize == "row_max":
        return pi / row.clamp_min(eps)
    raise ValueError(f"normalize must be one of {_NORMALIZE}, but got {normalize!r}.")


def standardize_inner_products(pi: Tensor) -> Tensor:
    """Column-wise z-score of ``Π`` over the batch: ``(Π_ik - mean_j Π_jk) / std_j Π_jk`` (not in the paper).

    The validation gradient has a batch-global class direction (post-ReLU features share a common mean component,
    so ``h_iᵀh_v`` is large for every pair): one class then wins ``argmax_k Π_ik`` for most of the batch.
    Centring each class column removes that direction; scaling it puts every class on the same unit, so a fixed
    margin (``beta``) means "so many batch standard deviations". A batch of one sample gives zeros.

    Args:
        pi: Inner products `(B, K)`.

    Returns:
        The standardised scores `(B, K)`, same dtype.
    """
    centred = pi - pi.mean(0, keepdim=True)
    if pi.shape[0] < 2:
        return centred
    eps = torch.finfo(pi.dtype).eps
    scale = centred.pow(2).mean(0, keepdim=True).sqrt()
    # A constant column (no information) stays zero instead of being blown up.
    return centred / scale.clamp_min(eps * (1.0 + pi.abs().amax()))


def own_label_gain(pi: Tensor, targets: Tensor) -> Tensor:
    """Each sample's gain from its own label against an average label: ``y_iᵀΠ_i - mean_k Π_ik`` (not in the paper).

    With ``u_i = J_z(x_i)·(-g)`` (see the module docstring), ``Π_ik = u_ik - p_iᵀu_i``, so this is
    ``y_iᵀu_i - mean_k u_ik``: the first-order change of the validation loss when the step pushes the logits toward
    ``y_i`` rather than toward no class in particular. Unlike ``y_iᵀΠ_i`` (Ren et al.'s meta-gradient weight), it
    does not fade once the model fits the sample (``p_i → y_i``): it is the limit ``T → ∞`` of a tempered
    training-side loss, as the tempered validation loss is for the validation samples.

    Args:
        pi: Inner products `(B, K)`.
        targets: Upstream labels, class indices `(B,)` or probabilities `(B, K)`.

    Returns:
        `(B,)`, float32 (float64 for float64 ``pi``).
    """
    check_logits(pi, "pi")
    check_targets(targets, pi.shape[0], pi.shape[1], "targets")
    dtype = torch.promote_types(pi.dtype, torch.float32)
    raw = pi.to(dtype)
    return (_as_probabilities(targets, pi.shape[1], dtype) * raw).sum(-1) - raw.mean(-1)


def _zscore(values: Tensor) -> Tensor:
    """``(v - mean) / std`` over the batch (population std); zeros for one sample or a constant vector."""
    centred = values - values.mean()
    if values.shape[0] < 2:
        return centred
    scale = centred.pow(2).mean().sqrt()
    return centred / scale.clamp_min(torch.finfo(values.dtype).eps * (1.0 + values.abs().amax()))


def _check_rule_logits(rule: str, logits: Tensor | None, pi: Tensor) -> None:
    if logits is None:
        if rule == "gain_loss":
            raise ValueError(
                "rule='gain_loss' combines Π with the model's own loss and needs logits=<the augmented rows' detached "
                f"logits, shape {tuple(pi.shape)}>, but got logits=None."
            )
        return
    if not isinstance(logits, Tensor) or tuple(logits.shape) != tuple(pi.shape) or not logits.is_floating_point():
        got = f"shape {tuple(logits.shape)} and dtype {logits.dtype}" if isinstance(logits, Tensor) else type(logits)
        raise ValueError(f"logits must be a float tensor of the shape of pi {tuple(pi.shape)}, but got {got}.")


def weight_scores(pi: Tensor, targets: Tensor, *, rule: RuleName = "margin", logits: Tensor | None = None) -> Tensor:
    """The continuous score behind each sample's keep/drop weight; higher = keep (for AUROC and diagnostics).

    ``paper``/``centered``: the gain of the upstream label ``y_iᵀΠ_i`` (Ren et al.'s meta-gradient; the weight is
    ``1[score ≥ 0]`` when the upstream label is kept). ``margin``/``margin_relabel``/``margin_fix``: the margin
    ``m_i = y_iᵀZ_i - max_k Z_ik ≤ 0`` with ``Z`` from :func:`standardize_inner_products` (``margin``: the
    weight is ``1[m_i ≥ -beta]``). ``gain``/``gain_auto``: the batch z-score of :func:`own_label_gain`.
    ``gain_loss``: that z-score plus the batch z-score of the model's own log-likelihood ``log p_i[y_i]``
    (from ``logits``).

    Args:
        pi: Inner products `(B, K)`.
        targets: Upstream labels, class indices `(B,)` or probabilities `(B, K)`.
        rule: Which rule's score.
        logits: The augmented rows' (detached) training logits `(B, K)`; required by ``gain_loss`` only.

    Returns:
        Scores `(B,)`, float32 (float64 for float64 ``pi``).
    """
    check_logits(pi, "pi")
    check_targets(targets, pi.shape[0], pi.shape[1], "targets")
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {_RULES}, but got {rule!r}.")
    _check_rule_logits(rule, logits, pi)
    dtype = torch.promote_types(pi.dtype, torch.float32)
    raw = pi.to(dtype)
    y = _as_probabilities(targets, pi.shape[1], dtype)
    if rule in _MARGIN_RULES:
        z = standardize_inner_products(raw)
        return (y * z).sum(-1) - z.amax(-1)
    if rule in _GAIN_RULES:
        score = _zscore(own_label_gain(raw, targets))
        if rule == "gain_loss":
            own = (y * torch.log_softmax(logits.detach().to(dtype), -1)).sum(-1)
            score = score + _zscore(own)
        return score
    return (y * raw).sum(-1)


def adaptive_keep(scores: Tensor, min_separation: float) -> Tensor:
    """Keep mask from a threshold that adapts to the share of bad samples (Otsu's split of the batch's scores).

    The scores are split into a low and a high group where the between-group variance ``σ_b²`` is largest (Otsu,
    1979). The low group is dropped only if the split explains at least ``min_separation`` of the total variance
    (``η = σ_b² / σ² ∈ [0, 1]``); otherwise every sample is kept. For reference, ``η ≈ 0.64`` for a normal sample
    and ``0.75`` for a uniform one, so ``min_separation`` above those only fires on two clearly separated groups.

    Args:
        scores: `(B,)`, higher = keep.
        min_separation: ``η`` needed to drop anything, in ``[0, 1]``.

    Returns:
        Bool `(B,)`.
    """
    batch = scores.shape[0]
    keep = torch.ones(batch, dtype=torch.bool, device=scores.device)
    if batch < 2:
        return keep
    ordered, order = scores.sort()
    total = ordered.var(unbiased=False)
    if not total > 0:
        return keep
    low = torch.arange(1, batch, device=scores.device, dtype=scores.dtype)  # size of the low group
    cum = ordered.cumsum(0)[:-1]
    mean_low = cum / low
    mean_high = (ordered.sum() - cum) / (batch - low)
    between = (low / batch) * (1 - low / batch) * (mean_low - mean_high) ** 2
    best = int(between.argmax())
    if float(between[best] / total) >= min_separation:
        keep[order[: best + 1]] = False
    return keep


# margin: 1.5 was the best of {1, 1.5} on both benchmark streams (and 0.5 dropped too many good samples).
# gain/gain_loss: batch standard deviations; gain_auto: the separation Otsu's split needs (see adaptive_keep).
_DEFAULT_BETA = {"paper": 0.5, "centered": 0.5, "margin": 1.5, "margin_relabel": 1.0, "margin_fix": 1.5,
                 "gain": 1.5, "gain_auto": 0.7, "gain_loss": 2.0}  # fmt: skip


def default_beta(rule: RuleName) -> float:
    """The β that ``saflex_targets(..., beta=None)`` uses for ``rule`` (a gated rule: its gate threshold in SEs)."""
    if rule in _rules.GATED_RULES:
        return _rules.DEFAULT_THRESHOLD
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {_RULES}, but got {rule!r}.")
    return _DEFAULT_BETA[rule]


def _check_rule_settings(rule: str, beta: float | None, tau: float | None, normalize: str) -> float:
    """Check a rule's settings (the one place that does); returns ``beta`` with ``None`` resolved to the default."""
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {_RULES}, but got {rule!r}.")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0):
        raise ValueError(f"tau must be a positive float or None (argmax), but got {tau!r}.")
    if beta is None:
        beta = _DEFAULT_BETA[rule]
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite float or None (the rule's default), but got {beta!r}.")
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE}, but got {normalize!r}.")
    if rule == "gain_auto" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta for rule='gain_auto' is a share of variance in [0, 1], but got {beta!r}.")
    return float(beta)


def _check_gate_settings(rule: str, beta: float | None, decay: float | None) -> tuple[float, float]:
    """The gated rules' settings: ``beta`` (threshold in standard errors, > 0) and ``decay`` in ``(0, 1)``."""
    beta = _rules.DEFAULT_THRESHOLD if beta is None else beta
    decay = _rules.DEFAULT_DECAY if decay is None else decay
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta of rule {rule!r} is the gate's threshold in standard errors, a finite float > 0, "
                         f"but got {beta!r}.")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
        raise ValueError(f"decay of rule {rule!r} must be a float in (0, 1), but got {decay!r}.")
    return float(beta), float(decay)


def saflex_targets(
    pi: Tensor,
    targets: Tensor,
    *,
    beta: float | None = None,
    tau: float | None = 0.01,
    normalize: Normalize = "batch_max",
    rule: RuleName = "margin",
    generator: torch.Generator | None = None,
    logits: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample weights and soft labels of augmented samples from their inner products (``docs/method.md#rules``).

    Default: ``rule="margin"`` (drop, never relabel), the library default;
    ``rule="paper"`` is the paper's exact rule, for comparisons with the paper.

    Rules:

    - ``"paper"`` (the paper's exact rule): ``S_i = Π̂_i + β y_i^aug`` with ``Π̂`` normalised (see
      :func:`normalize_inner_products`), ``y_i = softmax((S_i + G_i) / τ)`` with ``G ~ Gumbel(0, 1)``
      (``tau=None``: ``onehot(argmax S_i)``), and ``w_i = 1[y_iᵀ Π_i ≥ 0]`` on the raw ``Π``.
    - ``"centered"``: as ``paper`` on ``Π - mean_batch(Π)`` per class for the labels (removes the batch-global
      class direction of the validation gradient); the weight still uses the raw ``Π``.
    - ``"margin"`` (drop, never relabel): ``Z`` = column-wise z-score of ``Π`` over the batch
      (:func:`standardize_inner_products`), margin ``m_i = y_iᵀZ_i - max_k Z_ik ≤ 0``; ``w_i = 1[m_i ≥ -β]`` and
      the upstream label is kept. ``tau`` and ``normalize`` are not used.
    - ``"margin_relabel"``: same ``Z``; the label is the paper's bonus rule on ``Z``:
      ``y_i = softmax((Z_i + β y_i^aug + G_i) / τ)`` (argmax for ``tau=None``), which changes the label exactly
      when another class beats the upstream one by more than ``β`` batch standard deviations; all weights are 1.
      ``normalize`` is not used.
    - ``"margin_fix"``: the samples ``"margin"`` drops (``m_i < -β``) are relabelled to their best class instead
      when it also leads the runner-up class by at least ``β / 2`` (a clear winner), and dropped otherwise. Fewer
      relabels than ``"margin_relabel"``, but more of them right. ``tau`` and ``normalize`` are not used.

    - ``"gain"`` (drop, never relabel; acts when the labels are right but a sample does not help): the score is the
      batch z-score of the own-label gain ``y_iᵀΠ_i - mean_k Π_ik`` (:func:`own_label_gain`, which does not fade
      once the model fits the sample); ``w_i = 1[score_i ≥ -β]``.
    - ``"gain_auto"``: the ``gain`` score with a threshold that adapts to the share of bad samples: Otsu's split
      of the batch's scores, applied only when it explains at least ``β`` of their variance
      (:func:`adaptive_keep`; ``β ∈ [0, 1]``).
    - ``"gain_loss"``: the ``gain`` z-score plus the batch z-score of the model's own log-likelihood
      ``log p_i[y_i]`` (needs ``logits``); ``w_i = 1[score_i ≥ -β]``.

    Decision-quality measurements of the rules against the alternatives: ``benchmarks/suite``.

    Args:
        pi: Inner products `(B, K)`.
        targets: Upstream labels, class indices `(B,)` or probabilities `(B, K)` (Mixup/CutMix).
        beta: Bonus on (``paper``/``centered``: in units of the normalised ``Π``) or margin for (margin rules: in
            batch standard deviations) the upstream label. ``None``: 0.5 for ``paper``/``centered``, 1.5 for
            ``margin`` and ``margin_fix``, 1.0 for ``margin_relabel``, 1.5 for ``gain``, 2.0 for ``gain_loss``;
            for ``gain_auto`` the separation needed to drop anything (default 0.7).
        tau: Gumbel-softmax temperature; ``None`` means a deterministic argmax.
        normalize: How ``Π`` is scaled before the bonus and the noise (``paper``/``centered``).
        rule: ``"margin"`` (default), ``"paper"``, ``"centered"``, ``"margin_relabel"``, ``"margin_fix"``, ``"gain"``,
            ``"gain_auto"`` or ``"gain_loss"``.
        generator: Random generator for the Gumbel noise (drawn on the generator's device).
        logits: The augmented rows' detached training logits `(B, K)`, for the rules that combine ``Π`` with the
            model's own prediction (``gain_loss``); the other rules ignore them.

    Returns:
        ``(weights (B,), soft_labels (B, K))``, float32 (float64 for float64 ``pi``).

    Example:
        >>> pi = torch.tensor([[0.2, -0.1, -0.1], [-0.3, 0.4, -0.1]])
        >>> w, y = saflex_targets(pi, torch.tensor([0, 0]), beta=0.5, tau=None, rule="paper")
        >>> w.tolist(), y.argmax(1).tolist()
        ([1.0, 1.0], [0, 1])
        >>> pi = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.1, -0.1], [-2.0, 2.0]])
        >>> w, y = saflex_targets(pi, torch.tensor([0, 0, 0, 0]), rule="margin")  # the last label loses clearly
        >>> w.tolist(), y.argmax(1).tolist()
        ([1.0, 1.0, 1.0, 0.0], [0, 0, 0, 0])
    """
    check_logits(pi, "pi")
    check_targets(targets, pi.shape[0], pi.shape[1], "targets")
    beta = _check_rule_settings(rule, beta, tau, normalize)
    _check_rule_logits(rule, logits, pi)
    dtype = torch.promote_types(pi.dtype, torch.float32)
    raw = pi.to(dtype)
    upstream = _as_probabilities(targets, pi.shape[1], dtype)
    if rule in _GAIN_RULES:
        score = weight_scores(raw, targets, rule=rule, logits=logits)
        keep = adaptive_keep(score, beta) if rule == "gain_auto" else score >= -beta
        return keep.to(dtype), upstream
    if rule in ("margin", "margin_fix"):
        z = standardize_inner_products(raw)
        margin = (upstream * z).sum(-1) - z.amax(-1)
        keep = margin >= -beta
        if rule == "margin":
            return keep.to(dtype), upstream
        top2 = z.topk(min(2, z.shape[1]), -1).values
        lead = top2[:, 0] - top2[:, -1] if z.shape[1] > 1 else torch.full_like(margin, math.inf)
        relabel = ~keep & (lead >= beta / 2)
        labels = torch.where(relabel[:, None], F.one_hot(z.argmax(-1), pi.shape[1]).to(dtype), upstream)
        return (keep | relabel).to(dtype), labels
    if rule == "margin_relabel":
        score = standardize_inner_products(raw) + beta * upstream
    else:
        score = raw - raw.mean(0, keepdim=True) if rule == "centered" and raw.shape[0] > 1 else raw
        score = normalize_inner_products(score, normalize) + beta * upstream
    if tau is None:
        soft_labels = F.one_hot(score.argmax(-1), pi.shape[1]).to(dtype)
    else:
        device = generator.device if generator is not None else pi.device
        uniform = torch.rand(score.shape, generator=generator, device=device, dtype=dtype).to(pi.device)
        tiny = torch.finfo(dtype).tiny
        gumbel = -torch.log(-torch.log(uniform.clamp(tiny, 1.0 - 1e-7)))
        soft_labels = torch.softmax((score + gumbel) / tau, -1)
    if rule == "margin_relabel":
        return torch.ones(pi.shape[0], dtype=dtype, device=pi.device), soft_labels
    weights = ((soft_labels * raw).sum(-1) >= 0).to(dtype)
    return weights, soft_labels


@dataclasses.dataclass(frozen=True)
class Rule:
    """A decision rule and its settings, checked when it is made: ``Rule("margin", beta=1.0)``.

    ``SaflexLoss(rule=...)`` takes a ``Rule`` or just its name (``rule="paper"`` is ``Rule("paper")``).
    See :func:`saflex_targets` for what each rule does and what its settings mean.

    The gated rules (:mod:`saflex_data.rules`: ``"gated"``, ``"gated_prior"``, ``"gated_hold"``, ``"gated_latch"``,
    ``"gated_soft"``, ``"gated_margin"``, ``"gated_product"``) keep
    state across steps: they run inside ``SaflexLoss``, which holds their state (``docs/method.md#gated-rules``);
    calling such a ``Rule`` directly raises ``TypeError``.

    Args:
        name: ``"margin"`` (default), ``"paper"``, ``"centered"``, ``"margin_relabel"``, ``"margin_fix"``,
            ``"gain"``, ``"gain_auto"``, ``"gain_loss"`` or a gated rule.
        beta: The rule's margin or bonus (the gated rules: the gate's threshold in standard errors, default 2);
            ``None`` takes the rule's default (:func:`default_beta`). Stored resolved.
        tau: Gumbel-softmax temperature of the relabelling rules; ``None`` for a deterministic argmax.
        normalize: Scaling of ``Π`` before the bonus and the noise (``"paper"``/``"centered"``).
        decay: The gated rules only: decay of the gate's exponential weights (default 0.95); ``None`` elsewhere.

    Example:
        >>> Rule("margin")
        Rule(name='margin', beta=1.5, tau=0.01, normalize='batch_max')
        >>> Rule("margin", beta=1.0).beta
        1.0
        >>> Rule("median")
        Traceback (most recent call last):
        ...
        ValueError: rule must be one of ('paper', 'centered', 'margin', 'margin_relabel', 'margin_fix', 'gain', 'gain_auto', 'gain_loss'), but got 'median'.
    """

    name: str = "margin"
    beta: float | None = None
    tau: float | None = 0.01
    normalize: str = "batch_max"
    decay: float | None = None

    def __post_init__(self) -> None:
        if self.name in _rules.GATED_RULES:  # stateful: beta = the gate's threshold in SEs, decay = its EMA's
            object.__setattr__(self, "beta", _check_gate_settings(self.name, self.beta, self.decay)[0])
            object.__setattr__(self, "decay", _check_gate_settings(self.name, self.beta, self.decay)[1])
            return
        if self.decay is not None:
            raise ValueError(f"decay is a setting of the gated rules {_rules.GATED_RULES}; rule {self.name!r} takes "
                             f"decay=None, but got {self.decay!r}.")
        object.__setattr__(self, "beta", _check_rule_settings(self.name, self.beta, self.tau, self.normalize))

    def __repr__(self) -> str:
        extra = "" if self.decay is None else f", decay={self.decay!r}"
        return (f"Rule(name={self.name!r}, beta={self.beta!r}, tau={self.tau!r}, normalize={self.normalize!r}"
                f"{extra})")

    @property
    def stateful(self) -> bool:
        """Whether the rule keeps state across steps (the gated rules: :mod:`saflex_data.rules`)."""
        return self.name in _rules.GATED_RULES

    @classmethod
    def of(cls, rule: Rule | str) -> Rule:
        """``rule`` itself, or the rule of that name with its default settings."""
        if isinstance(rule, cls):
            return rule
        if isinstance(rule, str):
            return cls(rule)
        raise TypeError(f"rule must be a Rule or a rule name (str), but got {type(rule).__name__}.")

    def __call__(
        self, pi: Tensor, targets: Tensor, *, generator: torch.Generator | None = None, logits: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``saflex_targets(pi, targets, ...)`` with this rule's settings."""
        if self.stateful:
            raise TypeError(
                f"rule {self.name!r} keeps state across steps: use it through SaflexLoss, or call "
                "saflex_data.rules.gated_targets with its state."
            )
        return saflex_targets(pi, targets, beta=self.beta, tau=self.tau, normalize=self.normalize, rule=self.name,
                              generator=generator, logits=logits)
