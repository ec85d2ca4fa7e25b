"""The ways :class:`saflex_data.SaflexLoss` computes ``Π``: one class per ``method``, one small interface.

A method says which forward hooks it needs (:meth:`PiMethod.hooks`) and what they remember of each forward of the
model, how it makes the validation signal (:meth:`PiMethod.heldout_signal` from a held-out batch,
:meth:`PiMethod.batch_signal` from the clean rows of the training batch) and how it turns the remembered forward and
the signal into ``Π`` of the augmented rows (:meth:`PiMethod.inner_products`). The signal is always a
:data:`Signal`: the validation gradient of the parameters the method uses, keyed by parameter name.

Adding a method means adding one subclass with a ``name``: ``SaflexLoss(method=name)`` finds it in :data:`METHODS`.
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._autodiff import (
    FeatureCapture,
    batch_dependent,
    batch_statistics,
    find_classifier,
    grad_inner_products,
    validation_gradient,
)
from ._hooks import internal_pass, register_weak_hooks
from ._math import (
    check_logits,
    inner_products_from_tangent,
    last_layer_inner_products,
    last_layer_logit_tangents,
    last_layer_validation_gradient,
    solve_dtype,
)
from ._passes import model_device, rng_preserved, rng_state, same_rng_state, set_rng_state

__all__ = ["Signal", "PiMethod", "LastLayer", "Jvp", "JvpFrozenStats", "SinglePass", "METHODS"]

Signal = dict[str, Tensor]
"""The validation signal: ``{parameter name: gradient of the validation loss}`` for the parameters a method uses."""

MAX_CAPTURES = 4  # forwards remembered between two loss calls (a teacher pass, a second view, ...)

METHODS: dict[str, type[PiMethod]] = {}
"""Every method by name, filled by :meth:`PiMethod.__init_subclass__`."""


class PiMethod:
    """One way of computing ``Π``; subclasses set ``name`` and implement the three steps.

    The method holds the model (a plain reference) and remembers the model's last few forwards through its hooks
    (:meth:`remember`); :meth:`capture_of` finds the forward that produced a loss call's logits.
    """

    name: ClassVar[str]
    where: ClassVar[str] = "the model"  # what the hooks watch, for error messages
    supports_batch_reference: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            METHODS[cls.name] = cls

    def __init__(self, model: nn.Module, *, classifier: nn.Module | str | None = None) -> None:
        self.model = model
        self.captures: list[dict[str, Any]] = []  # the model's forwards since the last loss call, newest last
        self._forgotten: list[weakref.ref] = []  # outputs of forwards the loss passed over (for the error message)
        self.remove_hooks = register_weak_hooks(self, self.hooks())

    # -- the interface ---------------------------------------------------------------------------------------------
    def hooks(self) -> list[tuple[nn.Module, str, str]]:
        """``(module, "pre" | "post", method name)`` forward hooks; they hold this object weakly."""
        return []

    def signal_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the signal for this model (checked when a saved state is loaded)."""
        return {n: tuple(p.shape) for n, p in self.model.named_parameters() if p.requires_grad}

    def heldout_signal(self, inputs: Tensor, targets: Tensor, temperature: float, check: bool = True) -> Signal:
        """The signal of a validation batch; runs inside the loss's ``validation_pass``. ``check=False``: the
        targets' values were checked before (once per shape and dtype)."""
        return validation_gradient(self.model, inputs, targets, temperature=temperature, check=check)

    def batch_signal(self, capture: dict[str, Any], logits: Tensor, labels: Tensor, clean: Tensor,
                     temperature: float) -> tuple[Signal, Tensor | None] | None:
        """The signal of the clean rows (bool mask ``clean``) of the training batch (``reference="batch"``).

        Returns ``(signal, has_rows)``, where ``has_rows`` is ``None`` or a device bool saying whether any row was
        clean (a signal computed with the batch's shapes, no host synchronisation), or ``None`` when the method
        knows on the host that no row was clean.
        """
        raise NotImplementedError

    def select(self, mask: Tensor) -> Tensor | None:
        """The augmented rows' indices when the method needs them on the host (a synchronisation), else ``None``.

        Called before the validation signal: a method that selects rows knows when there is none, and the loss
        then skips the step's validation pass."""
        return None

    def inner_products(self, capture: dict[str, Any], logits: Tensor, mask: Tensor, signal: Signal,
                       index: Tensor | None = None) -> Tensor:
        """``Π`` `(B, K)` of the forward ``capture`` that gave ``logits``, exact on the augmented rows ``mask``
        (bool `(B,)`, or their indices ``index`` from :meth:`select`); the other rows hold something the rule
        ignores."""
        raise NotImplementedError

    def own_label_gains(self, capture: dict[str, Any], logits: Tensor, mask: Tensor, signal: Signal,
                        upstream: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(yᵀΠ, yᵀp)`` `(B,)` each: every row's own-label gain and the model's probability of its label
        (``upstream`` ``y`` as probabilities, ``p = softmax(logits)``), exact on the rows ``mask``.

        All that the ``p[y]``-weighted gated rules read (:data:`saflex_data.rules.P_WEIGHTED_RULES`). This default
        forms ``Π`` (:meth:`inner_products`); a method with a cheaper route overrides it.
        """
        pi = self.inner_products(capture, logits, mask, signal, index)
        return (upstream * pi).sum(-1), _own_probability(logits, upstream)

    # -- the remembered forwards -----------------------------------------------------------------------------------
    def remember(self, output: Any, **capture: Any) -> None:
        output = first_tensor(output)
        if output is None:
            return
        if torch.compiler.is_compiling():
            # Inside torch.compile a detach (or a weak reference) here breaks the graph: the output is kept as is
            # (at most MAX_CAPTURES of them) and found by storage or value.
            capture["output"] = output
        elif output.is_inference():
            # A forward under torch.inference_mode (an evaluation pass): no version counter, and never a training
            # forward the loss decides for.
            capture["output"] = output
        else:
            # Detached, so that a forward without a loss call does not pin its graph. The weak reference finds the
            # very tensor the loss gets (two forwards with equal outputs are not confused); the version counter,
            # shared with the detached copy, tells whether it was changed in place afterwards. Both are metadata.
            capture.update(output=output.detach(), ref=weakref.ref(output), version=output._version)
        self.captures = [*self.captures[-(MAX_CAPTURES - 1):], capture]

    def capture_of(self, logits: Tensor) -> dict[str, Any]:
        """The remembered forward that produced ``logits`` (every older one is forgotten).

        Found by identity (the tensor the forward returned), else by storage (a view of it, e.g. through a wrapper
        that re-wraps the output), else by value (a compiled forward). Values equal to more than one remembered
        forward's, or logits changed in place after their forward, raise instead of mixing two forwards.
        """
        captures = self.captures
        found = next((i for i in range(len(captures) - 1, -1, -1)
                      if captures[i].get("ref") is not None and captures[i]["ref"]() is logits), None)
        if found is None:
            found = next((i for i in range(len(captures) - 1, -1, -1)
                          if captures[i]["output"].shape == logits.shape
                          and _same_storage(captures[i]["output"], logits)), None)
        if found is None:
            detached = logits.detach()
            equal = [i for i in range(len(captures) - 1, -1, -1)
                     if captures[i]["output"].shape == logits.shape and _same_values(captures[i]["output"], detached)]
            if len(equal) > 1:
                self.captures = []
                raise RuntimeError(
                    f"SaflexLoss(method={self.name!r}): the logits passed to the loss are not the tensor any forward "
                    f"of {self.where} returned, and their values equal the outputs of {len(equal)} of its last "
                    f"{len(captures)} forwards (e.g. a zero-initialised head gives every input the same logits), so "
                    "it cannot tell which forward's features they belong to. Pass the forward's output tensor itself "
                    "(not a copy)."
                )
            found = equal[0] if equal else None
        if found is None:
            error = self._no_capture(logits)
            self._forgotten = [*self._forgotten[-(MAX_CAPTURES - 1):], *(c["ref"] for c in captures if "ref" in c)]
            self.captures = []
            raise error
        capture = captures[found]
        version = capture.get("version")
        if version is not None and capture["output"]._version != version:
            self.captures = []
            raise RuntimeError(
                f"SaflexLoss(method={self.name!r}): the logits were changed in place after the forward of {self.where} "
                f"(their version counter went from {version} to {capture['output']._version}, e.g. out.clamp_() or "
                "out.div_()); the decisions would mix the changed logits with the forward's features. Change a copy "
                "(out = out.clamp(...)) or pass the model's output unchanged."
            )
        self._forgotten = [*self._forgotten[-(MAX_CAPTURES - 1):], *(c["ref"] for c in captures[:found] if "ref" in c)]
        self.captures = captures[found:]  # kept: a second loss call on the same logits decides alike
        return self.captures[0]

    def _no_capture(self, logits: Tensor) -> Exception:
        if any(ref() is logits for ref in self._forgotten):
            return RuntimeError(
                f"SaflexLoss(method={self.name!r}): the logits come from a forward of {self.where} that the loss "
                "already passed over: a later forward's logits went to the loss first (e.g. view 2 before view 1). "
                "Call the loss on each forward's logits in the order of the forwards, or right after each forward."
            )
        if not self.captures:
            return RuntimeError(
                f"SaflexLoss(method={self.name!r}) saw no forward of {self.where} since the previous loss call; "
                "call the model (or forward_train) on the batch, then the loss with its output. (A model compiled with "
                "torch.compile and run before SaflexLoss was built keeps a graph without the loss's hooks: build "
                "SaflexLoss before the first compiled forward, or call torch._dynamo.reset().)"
            )
        return RuntimeError(
            f"SaflexLoss(method={self.name!r}): the logits passed to the loss (shape {tuple(logits.shape)}) are not "
            f"the output of any of the last {len(self.captures)} forwards of {self.where} since the previous loss "
            "call. "
            "Extra forwards between the training forward and the loss (a teacher or EMA pass, a second view) are "
            "fine, but logits changed after the forward (scaled, sliced, post-processed) or made by another layer "
            "are not: " + self._fix_hint
        )

    _fix_hint: ClassVar[str] = "pass the model's output itself."


class LastLayer(PiMethod):
    """``"last_layer"``: the closed form from the classifier's input features (``docs/method.md#computing-pi``)."""

    name = "last_layer"
    _fix_hint = "pass classifier=<the nn.Linear whose output is the logits> or use method='jvp'."

    def __init__(self, model: nn.Module, *, classifier: nn.Module | str | None = None) -> None:
        self.classifier_name, self.classifier = find_classifier(model, classifier)
        prefix = f"{self.classifier_name}." if self.classifier_name else ""
        self.weight_name, self.bias_name = prefix + "weight", prefix + "bias"
        super().__init__(model)

    @property
    def where(self) -> str:  # type: ignore[override]
        return f"the classifier {self.classifier_name!r}"

    def hooks(self) -> list[tuple[nn.Module, str, str]]:
        return [(self.classifier, "post", "on_classifier")]

    def on_classifier(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        # Detached: a forward without a loss call (a skipped step, an eval pass with grad) must not pin its graph.
        self.remember(output, features=args[0].detach())

    def signal_shapes(self) -> dict[str, tuple[int, ...]]:
        linear = self.classifier
        # Only trainable parameters count (as in the signal itself, see _signal).
        trainable_bias = linear.bias is not None and linear.bias.requires_grad
        bias = {self.bias_name: tuple(linear.bias.shape)} if trainable_bias else {}
        return {self.weight_name: tuple(linear.weight.shape), **bias}

    def heldout_signal(self, inputs: Tensor, targets: Tensor, temperature: float, check: bool = True) -> Signal:
        capture = FeatureCapture(self.classifier)
        try:
            with torch.no_grad():  # inside the loss's validation_pass: eval mode, BatchNorm buffers untouched
                logits = self.model(inputs)
        finally:
            capture.remove()
        check_logits(logits, "model(validation inputs)")
        return self._signal(capture.features.flatten(1), logits, targets, temperature, check=check)

    def batch_signal(self, capture: dict[str, Any], logits: Tensor, labels: Tensor, clean: Tensor,
                     temperature: float) -> tuple[Signal, Tensor]:
        # The mean over the clean rows with the batch's shapes: no host synchronisation to count them.
        signal = self._signal(capture["features"].flatten(1), logits.detach(), labels, temperature, mask=clean,
                              check=False)
        return signal, clean.any()

    def _signal(self, features: Tensor, logits: Tensor, targets: Tensor, temperature: float,
                mask: Tensor | None = None, check: bool = True) -> Signal:
        grad_weight, grad_bias = last_layer_validation_gradient(features, logits, targets, temperature=temperature,
                                                                mask=mask, check=check)
        linear = self.classifier
        if not linear.weight.requires_grad:
            raise ValueError(
                f"method='last_layer' needs a trainable classifier, but {self.classifier_name!r}.weight "
                "has requires_grad=False (a frozen head never moves, so its gradient says nothing about "
                "the step); use method='jvp', which counts the trainable parameters."
            )
        if linear.bias is None or not linear.bias.requires_grad:
            return {self.weight_name: grad_weight}  # only trainable parameters count
        return {self.weight_name: grad_weight, self.bias_name: grad_bias}

    def inner_products(self, capture: dict[str, Any], logits: Tensor, mask: Tensor, signal: Signal,
                       index: Tensor | None = None) -> Tensor:
        # Every row: one (B, D) x (D, K) product, cheaper than selecting the augmented rows (a synchronisation).
        return last_layer_inner_products(capture["features"].flatten(1), logits, signal[self.weight_name],
                                         signal.get(self.bias_name))

    def own_label_gains(self, capture: dict[str, Any], logits: Tensor, mask: Tensor, signal: Signal,
                        upstream: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # Without Π: with s = G_W h + G_b and Π_ik = pᵀs - s_k, yᵀΠ = pᵀs - yᵀs (the same numbers as yᵀΠ for a
        # one-hot y), two row reductions instead of (B, K) products: a fraction of the cost when K is large.
        s, p = last_layer_logit_tangents(capture["features"].flatten(1), logits, signal[self.weight_name],
                                         signal.get(self.bias_name))
        return (p * s).sum(-1) - (upstream * s).sum(-1), (upstream * p).sum(-1)


class Jvp(PiMethod):
    """``"jvp"``: exact, one forward-mode pass over the augmented rows (the whole batch when BatchNorm uses batch
    statistics or the forward drew random numbers, whose masks are then replayed)."""

    name = "jvp"

    def __init__(self, model: nn.Module, *, classifier: nn.Module | str | None = None) -> None:
        self._rng_at_start: tuple | None = None
        super().__init__(model)

    def hooks(self) -> list[tuple[nn.Module, str, str]]:
        return [(self.model, "pre", "on_model_start"), (self.model, "post", "on_model")]

    def on_model_start(self, module: nn.Module, args: tuple) -> None:
        # Inside torch.compile the random state cannot be read without a graph break: a compiled model's tangent
        # pass draws its own dropout masks (documented limit).
        if not torch.compiler.is_compiling():
            self._rng_at_start = rng_state(input_device(args, self.model))

    def on_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        start, self._rng_at_start = self._rng_at_start, None
        if not args or not isinstance(args[0], Tensor):
            return
        stochastic = start is not None and not same_rng_state(start, rng_state(input_device(args, self.model)))
        self.remember(output, inputs=args[0], rng=start, stochastic=stochastic, **self._extra_capture())

    def _extra_capture(self) -> dict[str, Any]:
        return {}

    def batch_signal(self, capture: dict[str, Any], logits: Tensor, labels: Tensor, clean: Tensor,
                     temperature: float) -> tuple[Signal, None] | None:
        index = clean.nonzero().squeeze(1)  # a synchronisation: the JVP methods select rows
        if not index.numel():
            return None
        return validation_gradient(self.model, capture["inputs"][index], labels[index], temperature=temperature,
                                   check=False), None

    def select(self, mask: Tensor) -> Tensor:
        return mask.nonzero().squeeze(1)  # the one synchronisation of the JVP methods (the rows set the shape)

    def inner_products(self, capture: dict[str, Any], logits: Tensor, mask: Tensor, signal: Signal,
                       index: Tensor | None = None) -> Tensor:
        inputs = capture["inputs"]
        with internal_pass(), rng_preserved(inputs.device):
            if capture["stochastic"] or batch_dependent(self.model):
                # Train-mode BatchNorm normalises with the whole batch's statistics, and dropout's masks are drawn
                # for the whole batch: forward the whole batch with the training forward's random state, as the
                # step did (every row, so no selection and no synchronisation).
                if capture["rng"] is not None:
                    set_rng_state(capture["rng"], inputs.device)
                return grad_inner_products(self.model, inputs, signal, method="jvp")
            index = self.select(mask) if index is None else index
            dtype = solve_dtype(logits.dtype)
            if not index.numel():
                return logits.new_zeros(logits.shape, dtype=dtype)
            pi = grad_inner_products(self.model, inputs[index], signal, method="jvp")
            return pi.new_zeros(logits.shape).index_copy_(0, index, pi)


class JvpFrozenStats(Jvp):
    """``"jvp_frozen_stats"``: the JVP of the augmented rows only, with the batch statistics train-mode BatchNorm
    used in the training forward held fixed (no tangent through the statistics; each call's own statistics for a
    module called several times). With dropout, the whole batch with the masks replayed, statistics still fixed."""

    name = "jvp_frozen_stats"

    def __init__(self, model: nn.Module, *, classifier: nn.Module | str | None = None) -> None:
        batchnorms = nn.modules.batchnorm._BatchNorm
        self._bn_names = {m: n for n, m in model.named_modules() if isinstance(m, batchnorms)}
        self.bn_stats: dict[str, list[tuple[Tensor, Tensor]]] = {}
        super().__init__(model)

    def hooks(self) -> list[tuple[nn.Module, str, str]]:
        return [*super().hooks(), *((m, "post", "on_batchnorm") for m in self._bn_names)]

    def on_batchnorm(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        """The batch statistics a train-mode BatchNorm normalised with."""
        stats = batch_statistics(module, args)
        if stats is not None:  # every call of the forward, in order (a module may run twice in one forward)
            self.bn_stats.setdefault(self._bn_names[module], []).append(stats)

    def _extra_capture(self) -> dict[str, Any]:
        bn_stats, self.bn_stats = self.bn_stats, {}
        # One call: the (mean, var) pair; several calls of one module: the list, used in call order.
        return {"bn_stats": {n: s[0] if len(s) == 1 else s for n, s in bn_stats.items()}}

    def inner_products(self, capture: dict[str, Any], logits: Tensor, mask: Tensor, signal: Signal,
                       index: Tensor | None = None) -> Tensor:
        inputs = capture["inputs"]
        stats = capture["bn_stats"] if batch_dependent(self.model) else None
        with internal_pass(), rng_preserved(inputs.device):
            if capture["stochastic"]:
                # Dropout's masks were drawn for the whole batch: forward the whole batch with the training forward's
                # random state (as "jvp" does), but with the statistics held fixed: the frozen-statistics Π, at the
                # exact method's cost.
                if capture["rng"] is not None:
                    set_rng_state(capture["rng"], inputs.device)
                return grad_inner_products(self.model, inputs, signal, method="jvp", batch_stats=stats)
            index = self.select(mask) if index is None else index
            dtype = solve_dtype(logits.dtype)
            if not index.numel():
                return logits.new_zeros(logits.shape, dtype=dtype)
            pi = grad_inner_products(self.model, inputs[index], signal, method="jvp", batch_stats=stats)
            return pi.new_zeros(logits.shape).index_copy_(0, index, pi)


class SinglePass(PiMethod):
    """``"single_pass"``: the training forward itself carries the tangent (``SaflexLoss.forward_train``)."""

    name = "single_pass"
    where = "forward_train"
    supports_batch_reference = False

    def inner_products(self, capture: dict[str, Any], logits: Tensor, mask: Tensor, signal: Signal,
                       index: Tensor | None = None) -> Tensor:
        return inner_products_from_tangent(logits, capture["tangent"])


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def first_tensor(output: Any) -> Tensor | None:
    """The logits of a forward's output: the tensor itself, the first tensor of a tuple, or a dict's ``logits``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "logits"):
        value = output.get("logits") if isinstance(output, dict) else output.logits
        return value if isinstance(value, Tensor) else None
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def _own_probability(logits: Tensor, upstream: Tensor) -> Tensor:
    """``yᵀ softmax(logits)`` of each row, in ``upstream``'s dtype."""
    return (upstream * torch.softmax(logits.detach().to(upstream.dtype), -1)).sum(-1)


def input_device(args: tuple, model: nn.Module) -> torch.device:
    return args[0].device if args and isinstance(args[0], Tensor) else model_device(model)


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.dtype == b.dtype


def _same_values(a: Tensor, b: Tensor) -> bool:
    """``torch.equal`` that also matches NaN with NaN (a non-finite step must fall back, not fail the check)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())

