"""SAFLEX's autodiff on live modules: validation gradients, JVPs and BatchNorm statistics of the user's model.

Everything here runs the model: forward-mode AD with dual parameters (``Π`` exactly, for a batch or for the training
forward itself), the validation gradient by backward, and the context managers that keep those passes from touching
the model (BatchNorm running statistics frozen, batch statistics held fixed, math attention for forward AD). The
maths they feed is in :mod:`saflex_data._math`; both are re-exported by :mod:`saflex_data.functional`.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD
from torch.func import functional_call

from ._math import (
    check_logits,
    check_targets,
    check_temperature,
    inner_products_from_tangent,
    last_layer_inner_products,
    validation_residual,
)

__all__ = [
    "Method",
    "trainable_parameters",
    "running_stats_frozen",
    "find_classifier",
    "FeatureCapture",
    "forward_features",
    "validation_gradient",
    "jvp_logits",
    "uses_batch_stats",
    "batch_dependent",
    "batch_statistics",
    "BatchStatsCapture",
    "fixed_batch_stats",
    "quiet_forward_ad",
    "math_attention",
    "autograd_inner_products",
    "grad_inner_products",
    "forward_with_tangent",
]

Method = Literal["jvp", "last_layer", "autograd"]
_CLASSIFIER_ATTRS = ("fc", "classifier", "head", "last_linear", "linear", "out", "output")


# ---------------------------------------------------------------------------------------------------------------
# Model helpers
# ---------------------------------------------------------------------------------------------------------------
def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[None]:
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


class FeatureCapture:
    """Forward hook that records the input of a module (the penultimate features for a classifier)."""

    def __init__(self, module: nn.Module) -> None:
        self.features: Tensor | None = None
        self.output: Tensor | None = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.features, self.output = args[0], output

    def remove(self) -> None:
        self.handle.remove()


def forward_features(model: nn.Module, classifier: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    capture = FeatureCapture(classifier)
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



def validation_gradient(
    model: nn.Module, inputs: Tensor, targets: Tensor, *, temperature: float = 1.0, check: bool = True
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
        check: ``False`` skips the checks of the targets' values (see :func:`check_targets`).

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
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model has no parameter with requires_grad=True; there is nothing to compute a gradient of.")
    with torch.enable_grad(), running_stats_frozen(model):
        logits = model(inputs)
        check_logits(logits, "model(inputs)")
        check_targets(targets, logits.shape[0], logits.shape[1], "targets", values=check)
        dtype = torch.promote_types(logits.dtype, torch.float32)  # never below float32, keep float64
        if temperature == 1.0:
            loss = F.cross_entropy(logits.to(dtype), targets.to(dtype) if targets.dim() == 2 else targets.long())
        else:
            # d/dz of T·CE(z/T, y) is the (constant) residual: backpropagate it through the logits.
            residual = validation_residual(logits, targets, temperature, check=False)
            loss = (residual * logits.to(dtype)).sum() / logits.shape[0]
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {
        name: (torch.zeros_like(p) if g is None else g.to(p.dtype))
        for (name, p), g in zip(params.items(), grads, strict=True)
    }



def jvp_logits(
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
        stack.enter_context(running_stats_frozen(model))
        if batch_stats is not None:
            stack.enter_context(fixed_batch_stats(model, batch_stats))
        stack.enter_context(math_attention())
        stack.enter_context(quiet_forward_ad())
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


def uses_batch_stats(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm that normalises with its input batch's statistics."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None)


def batch_dependent(model: nn.Module) -> bool:
    """Whether a sample's output depends on the rest of the batch (BatchNorm using batch statistics)."""
    return any(uses_batch_stats(m) for m in model.modules())


def batch_statistics(module: nn.Module, args: tuple) -> tuple[Tensor, Tensor] | None:
    """``(mean, biased variance)`` a BatchNorm normalised its input ``args[0]`` with, detached; ``None`` when it used
    its running statistics or ran inside :func:`fixed_batch_stats`."""
    fixed = getattr(module.__dict__.get("forward"), "fixed_batch_stats", False)
    if fixed or not args or not uses_batch_stats(module):
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
        stats = None if self._skip is not None and self._skip() else batch_statistics(module, args)
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
def fixed_batch_stats(model: nn.Module, batch_stats: Mapping[str, Any]) -> Iterator[None]:
    """Every BatchNorm that would normalise with batch statistics normalises with ``batch_stats[name]`` instead.

    ``batch_stats[name]`` is a ``(mean, var)`` pair, or a list of them for a module called several times per forward
    (used in call order). The statistics are constants here, so a JVP gives them no tangent.
    """
    patched = []
    try:
        for name, m in model.named_modules():
            if not uses_batch_stats(m):
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
            entry = batch_stats[name]
            calls = list(entry) if isinstance(entry, list) else [entry]
            count = [0]

            def forward(input: Tensor, m: nn.Module = m, calls: list = calls, count: list = count) -> Tensor:
                mean, var = calls[count[0] % len(calls)]  # call order, again from the first for the next forward
                count[0] += 1
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
def quiet_forward_ad() -> Iterator[None]:
    """torch loads its forward-AD decompositions with ``torch.jit.script`` on first use, which warns that jit is
    deprecated; that warning is about torch's internals, not the user's code."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        yield


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
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


def autograd_inner_products(model: nn.Module, inputs: Tensor, val_grad: Mapping[str, Tensor]) -> Tensor:
    params = dict(model.named_parameters())
    names = list(val_grad)
    with torch.enable_grad(), running_stats_frozen(model):
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
                    (g.to(dtype) * val_grad[n].to(dtype)).sum()
                    for n, g in zip(names, grads, strict=True)
                    if g is not None
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
        logits, tangent = jvp_logits(model, inputs, val_grad, batch_stats)
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
        with torch.no_grad(), running_stats_frozen(model):
            features, logits = forward_features(model, linear, inputs)
        return last_layer_inner_products(features, logits, val_grad[weight_name], val_grad.get(bias_name))
    if method == "autograd":
        return autograd_inner_products(model, inputs, val_grad)
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
    with fwAD.dual_level(), math_attention(), quiet_forward_ad():
        duals = {n: fwAD.make_dual(params[n], -val_grad[n].to(params[n])) for n in names}
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(m.running_mean, m.running_var) for m in bns]
        out = functional_call(model, duals, (inputs,), strict=False)
        primal, tangent = fwAD.unpack_dual(out)
    # An in-place running-stat update inside the dual level may have left dual buffers behind: keep their primal.
    for m, (mean, var) in zip(bns, saved, strict=False):
        m.running_mean, m.running_var = mean, var
    check_logits(primal, "model(inputs)")
    if tangent is None:
        tangent = torch.zeros_like(primal)
    return primal, tangent.detach()
