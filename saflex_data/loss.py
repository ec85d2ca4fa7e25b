"""``SaflexLoss``: a drop-in criterion that learns weights and soft labels for the augmented samples of a batch.

``loss = criterion(logits, target)``, exactly like timm's and torchvision's loops call a loss. The criterion holds
a reference to the model (not a submodule) and a validation loader it cycles forever. Each training step it

1. refreshes the validation gradient ``g`` (every ``val_every`` steps; optionally smoothed),
2. computes ``Π[i, k] = <∇θ ℓ_k(x_i), g>`` for the augmented samples (``method``: the cheap ``"last_layer"``
   closed form, exact ``"jvp"``, or the exact ``"single_pass"`` forward with dual parameters),
3. turns ``Π`` into weights and soft labels with its :class:`saflex_data.functional.Rule`, and
4. returns ``(Σ_clean CE(y_j) + Σ_aug w_i CE(ỹ_i)) / B`` (a fixed normaliser: docs/method.md).

The same steps run in one process and under ``torch.distributed``; :class:`saflex_data.distributed.Sync` holds
every collective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as SF
from . import rules as _rules
from ._common import (
    StepReport,
    as_probabilities,
    internal_pass,
    model_device,
    register_weak_hooks,
    rng_preserved,
    rng_state,
    same_rng_state,
    set_rng_state,
    unwrap_model,
    validation_pass,
)
from ._common import rejects_removed_arguments  # beta=, tau=, ... of 0.1: a TypeError naming the replacement
from ._stream import ValidationStream
from .batch import SaflexTarget
from .distributed import BatchLayout, GlobalTargets, Sync, forward_with_tangent

__all__ = ["SaflexLoss"]

LossMethod = Literal["jvp", "last_layer", "single_pass", "jvp_frozen_stats"]
_METHODS = ("jvp", "last_layer", "single_pass", "jvp_frozen_stats")
_REFERENCES = ("heldout", "batch")
DEFAULT_RULE = "gated_prior"  # the default decision rule (docs/when_to_use.md#gated); "margin" before 0.2
VAL_TEMPERATURE = 4.0  # the tempered validation loss (see docs/method.md and the measured results)
_MAX_CAPTURES = 4  # forwards remembered between two loss calls (a teacher pass, a second view, ...)


class SaflexLoss(StepReport, nn.Module):
    """Cross-entropy with SAFLEX weights and soft labels for the augmented samples of each batch.

    Args:
        model: The model being trained (a ``DistributedDataParallel`` or ``torch.compile`` wrapper is unwrapped;
            the extra passes always use the raw module). Held as a plain reference, not a submodule; its forward
            hooks hold the loss only weakly (deleting the loss removes them; copies and pickles of the model carry
            none of it).
        val_loader: Any iterable of validation batches: ``(inputs, targets)``, ``(inputs, targets, *extra)`` or
            dicts (see ``val_keys``); targets are class indices or probabilities. It is cycled forever; batches
            are moved to the model's device. ``None`` with ``reference="batch"``.
        method: How ``Π`` is computed: ``"last_layer"`` (default: closed form from the classifier's input features;
            nearly free), ``"jvp"`` (exact, one forward-mode pass over the augmented samples, or over the whole batch
            when BatchNorm uses batch statistics or the forward draws random numbers, e.g. dropout, whose masks are
            then replayed) or ``"single_pass"`` (exact; the training forward itself carries the tangent: call
            ``logits = criterion.forward_train(x)`` instead of ``model(x)``) or ``"jvp_frozen_stats"`` (the JVP of
            the augmented rows only, with the batch statistics train-mode BatchNorm used in the training forward held
            fixed: cheaper than ``"jvp"``, and a different ``Π`` that leaves out the statistics' own tangent; the
            same as ``"jvp"`` for a model without batch-statistics BatchNorm).
        rule: The decision rule: a :class:`saflex_data.functional.Rule` or its name. Default ``"gated_prior"``
            (a rule with state, :mod:`saflex_data.rules`): weight each augmented row by the model's ``p[y]`` while
            the validation signal says, over many steps, that the augmented rows help less than the batch's clean
            rows (and during the first steps, before it has a verdict); weight 1 otherwise; never relabel
            (``docs/method.md#gated-rules``). ``"margin"`` (the default before 0.2): drop an augmented sample whose
            upstream label trails the best class by more than ``beta`` batch standard deviations of ``Π``;
            ``"paper"`` is the paper's exact rule.
        reference: Where the validation signal comes from: ``"heldout"`` (default: batches of ``val_loader``) or
            ``"batch"``: the clean (non-augmented) rows of the current training batch, with no held-out split (with
            ``last_layer`` no extra pass at all). A batch without a clean row then keeps every sample.
        val_every: Refresh the validation signal every ``val_every`` steps (reuse it in between).
        val_ema: If set, keep an exponential moving average of the validation signal with this decay.
        val_temperature: ``T`` of the tempered validation loss ``T · CE(z / T, y)`` whose gradient is the
            validation signal (``SF.validation_residual``; not in the paper; ``math.inf`` allowed). With ``T = 1``
            (the paper) the signal fades as the model fits the validation samples; a larger ``T`` keeps every
            validation sample voting for its class.
        prepare: Optional callable applied to validation inputs after the device move (normalisation,
            ``channels_last``, dtype), so that they look like the training inputs.
        val_keys: ``(input_key, target_key)`` of dict validation batches; ``None`` tries the common names
            (``image``/``inputs``/``pixel_values``/..., ``label``/``labels``/``target``/...).
        classifier: For ``"last_layer"``: the ``nn.Linear`` producing the logits, or its name; found automatically
            (timm's ``get_classifier()``, ``fc``, ``head``, ``classifier``, ... or the last ``nn.Linear``) if None.
        num_splits: Positional tagging for plain tensor targets (timm's ``--aug-splits``): the batch is
            ``[clean; aug_1; ...]`` in ``num_splits`` equal parts, the first clean.
        label_smoothing: Passed to ``F.cross_entropy`` for every sample.
        all_reduce: Under ``torch.distributed`` (DDP, ``torchrun``): average the validation signal across ranks and
            decide on the global batch, so that every rank decides exactly like one process on the concatenated
            batch and ``stats`` are global; ``False`` keeps all of it per rank. See :mod:`saflex_data.distributed`.
        seed: Seed of the Gumbel noise generator of the relabelling rules (part of ``state_dict``).
        enabled: ``False`` makes the loss exactly plain (soft-label) cross-entropy; a switch for the train loop
            (also an attribute).

    SAFLEX acts only on training calls: grad enabled, ``logits.requires_grad`` and the model in train mode. Any
    other call (``model.eval()``, ``torch.no_grad()``) is plain cross-entropy: no validation draw, ``step``
    unchanged. The decisions always belong to the ``logits`` passed in: the loss remembers the model's last few
    forwards and uses the one that produced them (a teacher pass or a second view in between is fine).

    The validation loader's batch size matters: the decisions are made from one validation minibatch per refresh,
    and 128 samples measured clearly better than 32 (``benchmarks/README.md``).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> val = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> criterion = SaflexLoss(model, val, method="jvp")
        >>> x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        >>> target = SaflexTarget(y, torch.tensor([False, False, False, True, True, True]))
        >>> loss = criterion(model(x), target)
        >>> loss.backward()
    """

    _state_signal = ("signal", "_signal")  # state_dict key and attribute of the cached validation signal

    @rejects_removed_arguments()
    def __init__(
        self,
        model: nn.Module,
        val_loader: Iterable[Any] | None = None,
        *,
        method: LossMethod = "last_layer",
        rule: SF.Rule | str = DEFAULT_RULE,
        reference: Literal["heldout", "batch"] = "heldout",
        val_every: int = 1,
        val_ema: float | None = None,
        val_temperature: float = VAL_TEMPERATURE,
        val_keys: tuple[str, str] | None = None,
        prepare: Callable[[Tensor], Tensor] | None = None,
        classifier: nn.Module | str | None = None,
        num_splits: int | None = None,
        label_smoothing: float = 0.0,
        all_reduce: bool = True,
        seed: int = 0,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, but got {type(model).__name__}.")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, but got {method!r}.")
        if reference not in _REFERENCES:
            raise ValueError(f"reference must be one of {_REFERENCES}, but got {reference!r}.")
        if reference == "heldout" and (val_loader is None or not isinstance(val_loader, Iterable)):
            raise TypeError(
                "val_loader must be an iterable of (inputs, targets) batches (or None with reference='batch'), but "
                f"got {type(val_loader).__name__}."
            )
        if reference == "batch" and method == "single_pass":
            raise ValueError("reference='batch' needs the batch before its forward: use method='last_layer' or 'jvp'.")
        if not isinstance(val_every, int) or isinstance(val_every, bool) or val_every < 1:
            raise ValueError(f"val_every must be an int >= 1, but got {val_every!r}.")
        if val_ema is not None and not 0.0 <= val_ema < 1.0:
            raise ValueError(f"val_ema must be None or a decay in [0, 1), but got {val_ema!r}.")
        SF.check_temperature(val_temperature, "val_temperature")
        if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 2):
            raise ValueError(f"num_splits must be None or an int >= 2 ([clean; augmented...]), but got {num_splits!r}.")
        if prepare is not None and not callable(prepare):
            raise TypeError(f"prepare must be a callable or None, but got {type(prepare).__name__}.")

        # A plain attribute (not a submodule): the model's parameters must not appear in this loss's state_dict.
        self.__dict__["model"] = unwrap_model(model)
        # method="single_pass": the training forward itself must go through a DDP wrapper (DDP arms its gradient
        # all-reduce in forward); the extra passes of the other methods use the raw module.
        ddp = _outer_ddp(model)
        self.__dict__["_train_model"] = self.model if ddp is None else ddp
        self.method, self.rule, self.reference = method, SF.Rule.of(rule), reference
        self.val_every, self.val_ema, self.val_temperature = val_every, val_ema, float(val_temperature)
        self.prepare, self.num_splits, self.label_smoothing = prepare, num_splits, label_smoothing
        self.seed, self.enabled = seed, enabled
        self._sync = Sync(all_reduce, type(self).__name__)
        self._val = None if reference == "batch" else ValidationStream(val_loader, type(self).__name__, keys=val_keys)
        self.step = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._signal: Any = None  # cached validation signal: dict (jvp) or (G_W, G_b) (last_layer)
        self._captures: list[dict[str, Any]] = []  # the model's forwards since the last loss call, newest last
        self._warned_nonfinite = False
        self._fallback_keeps = "the upstream labels"
        self.last_step: dict[str, Tensor] = {}
        self.reset_stats()

        self.classifier_name: str | None = None
        hooks = []
        if method == "last_layer":
            self.classifier_name, linear = SF.find_classifier(self.model, classifier)
            self.__dict__["_classifier"] = linear  # a plain reference, not a submodule (no state_dict entries)
            hooks = [(linear, "post", "_on_classifier")]
        elif method in ("jvp", "jvp_frozen_stats"):
            hooks = [(self.model, "pre", "_on_model_start"), (self.model, "post", "_on_model")]
        if method == "jvp_frozen_stats":
            batchnorms = nn.modules.batchnorm._BatchNorm
            self._bn_names = {m: n for n, m in self.model.named_modules() if isinstance(m, batchnorms)}
            hooks += [(m, "post", "_on_batchnorm") for m in self._bn_names]
        self._bn_stats: dict[str, tuple[Tensor, Tensor]] = {}
        self._hooks = register_weak_hooks(self, hooks)
        self._rng_at_start: tuple | None = None
        # [gated rules] the gate's state: kept across steps, saved in state_dict, reset only by reset_rule_state()
        self._rule_state: dict[str, Tensor] | None = _rules.init_state() if self.rule.stateful else None

    @property
    def all_reduce(self) -> bool:
        return self._sync.all_reduce

    # [gated rules] ---------------------------------------------------------------------------------------------
    @property
    def rule_state(self) -> dict[str, Tensor] | None:
        """A stateful rule's state (the gate of :mod:`saflex_data.rules`: its EMA sums and last ``strength``);
        ``None`` for the other rules. Part of ``state_dict``; identical on every rank under torch.distributed."""
        return self._rule_state

    def reset_rule_state(self) -> None:
        """Forget the gate's evidence (nothing else resets it: not ``reset_stats``, not ``enabled``)."""
        self._rule_state = _rules.init_state() if self.rule.stateful else None

    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()
        if self._rule_state is not None:
            state["rule_state"] = {k: v.detach().clone() for k, v in self._rule_state.items()}
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        if self.rule.stateful:
            saved = state.get("rule_state")
            self._rule_state = _rules.init_state() if saved is None else {
                k: v.clone() for k, v in _rules.check_state(saved, "state_dict's rule_state").items()}

    def settings(self) -> dict[str, Any]:
        """The settings every rank must share (compared on the first training call under torch.distributed)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return {
            "method": self.method, "rule": self.rule.name, "beta": self.rule.beta, "tau": self.rule.tau,
            "normalize": self.rule.normalize, "decay": self.rule.decay, "reference": self.reference, "val_every": self.val_every,
            "val_ema": self.val_ema, "val_temperature": self.val_temperature, "enabled": bool(self.enabled),
            "num_splits": self.num_splits, "label_smoothing": float(self.label_smoothing),
            "all_reduce": self.all_reduce,
            # Decisions on the global batch need the same Gumbel noise everywhere; per-rank decisions may differ.
            "seed": self.seed if self.all_reduce else None, "step": self.step, "classifier": self.classifier_name,
            "trainable_parameters": (len(params), sum(p.numel() for p in params)),
        }

    # ------------------------------------------------------------------------------------------------------------
    # hooks: what each forward of the model produced, keyed by its output
    # ------------------------------------------------------------------------------------------------------------
    def _on_model_start(self, module: nn.Module, args: tuple) -> None:
        # Inside torch.compile the random state cannot be read without a graph break: a compiled model's tangent
        # pass draws its own dropout masks (documented limit).
        if not torch.compiler.is_compiling():
            self._rng_at_start = rng_state(_input_device(args, self.model))

    def _on_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        start, self._rng_at_start = self._rng_at_start, None
        if not args or not isinstance(args[0], Tensor):
            return
        stochastic = start is not None and not same_rng_state(start, rng_state(_input_device(args, self.model)))
        bn_stats, self._bn_stats = self._bn_stats, {}
        self._remember(output, inputs=args[0], rng=start, stochastic=stochastic, bn_stats=bn_stats)

    def _on_batchnorm(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        """``method="jvp_frozen_stats"``: the batch statistics a train-mode BatchNorm normalised with."""
        stats = SF._batch_statistics(module, args)
        if stats is not None:
            self._bn_stats[self._bn_names[module]] = stats

    def _on_classifier(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        # Detached: a forward without a loss call (a skipped step, an eval pass with grad) must not pin its graph.
        self._remember(output, features=args[0].detach())

    def _remember(self, output: Any, **capture: Any) -> None:
        output = _first_tensor(output)
        if output is None:
            return
        # Detached, so that a forward without a loss call does not pin its graph; inside torch.compile a detach
        # here breaks the graph, so the output is kept as is there (at most _MAX_CAPTURES of them).
        output = output if torch.compiler.is_compiling() else output.detach()
        self._captures = [*self._captures[-(_MAX_CAPTURES - 1):], {"output": output, **capture}]

    def _capture_of(self, logits: Tensor) -> dict[str, Any]:
        """The remembered forward that produced ``logits`` (every older one is forgotten)."""
        found = None
        for i in range(len(self._captures) - 1, -1, -1):
            out = self._captures[i]["output"]
            if out.shape == logits.shape and (_same_storage(out, logits) or _same_values(out, logits.detach())):
                found = i
                break
        if found is None:
            error = self._no_capture(logits)
            self._captures = []
            raise error
        self._captures = self._captures[found:]  # kept: a second loss call on the same logits decides alike
        return self._captures[0]

    def _no_capture(self, logits: Tensor) -> Exception:
        where = {"last_layer": f"the classifier {self.classifier_name!r}", "jvp": "the model",
                 "jvp_frozen_stats": "the model", "single_pass": "forward_train"}[self.method]
        if not self._captures:
            return RuntimeError(
                f"SaflexLoss(method={self.method!r}) saw no forward of {where} since the previous loss call; call the "
                "model (or forward_train) on the batch, then the loss with its output. (A model compiled with "
                "torch.compile and run before SaflexLoss was built keeps a graph without the loss's hooks: build "
                "SaflexLoss before the first compiled forward, or call torch._dynamo.reset().)"
            )
        return RuntimeError(
            f"SaflexLoss(method={self.method!r}): the logits passed to the loss (shape {tuple(logits.shape)}) are not "
            f"the output of any of the last {len(self._captures)} forwards of {where} since the previous loss call. "
            "Extra forwards between the training forward and the loss (a teacher or EMA pass, a second view) are "
            "fine, but logits changed after the forward (scaled, sliced, post-processed) or made by another layer "
            "are not: " + ("pass classifier=<the nn.Linear whose output is the logits> or use method='jvp'."
                           if self.method == "last_layer" else "pass the model's output itself.")
        )

    def remove_hooks(self) -> None:
        """Detach the loss from the model (its forward hooks); deleting the loss does the same."""
        self._hooks()

    # ------------------------------------------------------------------------------------------------------------
    # the loss
    # ------------------------------------------------------------------------------------------------------------
    def forward(self, logits: Tensor, target: SaflexTarget | Tensor) -> Tensor:
        """Weighted soft-label cross-entropy of the batch, a scalar.

        Args:
            logits: Output of the model's training forward, `(B, K)`.
            target: A :class:`SaflexTarget` (from ``SaflexCollate``, ``SaflexBatchSampler`` or an adapter), or a
                plain label tensor when ``num_splits`` is set.
        """
        SF.check_logits(logits)
        labels, is_augmented, op = self._unpack(logits, target)
        training = torch.is_grad_enabled() and logits.requires_grad and self.model.training
        if training:  # [distributed] compared on training calls only, also with enabled=False
            self._sync.check_once(self.settings())
        if not (self.enabled and training):
            return F.cross_entropy(logits, labels if labels.dim() == 2 else labels.long(),
                                   label_smoothing=self.label_smoothing)
        batch, num_classes = logits.shape
        dtype = torch.promote_types(logits.dtype, torch.float32)  # the solve and the loss in >= float32
        aug_index = is_augmented.nonzero().squeeze(1)
        layout = self._sync.layout(len(aug_index), batch, num_classes, logits.device)
        weights = torch.ones(batch, dtype=dtype, device=logits.device)
        targets = as_probabilities(labels, num_classes, dtype, copy=True)
        if layout.total_augmented:
            decision = self._decide(logits, labels, targets[aug_index], is_augmented, op, aug_index, layout)
            if not decision.finite:
                self._nonfinite_fallback()
            weights[aug_index], targets[aug_index] = decision.weights, decision.soft_labels
            self._record(*decision.record)
        else:
            self._record(targets[:0], weights[:0], targets[:0], None, sum(layout.batch_sizes))
        self.last_step = {"is_augmented": is_augmented, "weights": weights, "targets": targets,
                          "upstream": labels if labels.dim() == 1 else labels.argmax(-1)}
        self.step += 1
        per_sample = F.cross_entropy(logits.to(dtype), targets, reduction="none", label_smoothing=self.label_smoothing)
        return (weights * per_sample).sum() / batch

    def forward_train(self, inputs: Tensor, model: nn.Module | None = None) -> Tensor:
        """The training forward for ``method="single_pass"``: returns ``model(inputs)``'s logits and keeps their
        tangent along the validation-descent direction for the next ``criterion(logits, target)`` call.

        Args:
            inputs: The training batch.
            model: The model as the loop calls it, when it was wrapped (e.g. in DDP) after the loss was built,
                like timm's ``task.trainable_module``; defaults to the model given at construction.
        """
        if self.method != "single_pass":
            raise RuntimeError(f"forward_train is for method='single_pass'; this loss uses method={self.method!r}.")
        self._sync.check_once(self.settings())  # [distributed]
        signal = self._validation_signal(None, None, None, None)
        train_model = self._train_model
        if model is not None:
            ddp = _outer_ddp(model)
            train_model = unwrap_model(model) if ddp is None else ddp
        logits, tangent = forward_with_tangent(train_model, inputs, signal)
        self._remember(logits, tangent=tangent)
        return logits

    # ------------------------------------------------------------------------------------------------------------
    # pieces
    # ------------------------------------------------------------------------------------------------------------
    def _unpack(self, logits: Tensor, target: SaflexTarget | Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        batch, num_classes = logits.shape
        if num_classes < 2:
            raise ValueError(f"logits must have at least 2 classes for SAFLEX, but got shape {tuple(logits.shape)}.")
        if isinstance(target, SaflexTarget):
            if len(target) != batch:
                raise ValueError(
                    f"target has {len(target)} samples but logits have {batch}; pass the target of the same batch."
                )
            if target.device != logits.device:
                target = target.to(logits.device)  # documented: moved, never reinterpreted
            labels, is_augmented, op = target.labels, target.is_augmented, target.op
            self._op_names = target.op_names
        elif isinstance(target, Tensor):
            if self.num_splits is None:
                raise TypeError(
                    "target must be a SaflexTarget that says which samples are augmented (build the loader with "
                    "saflex_data.SaflexCollate or SaflexBatchSampler, or an adapter such as timm's "
                    "saflex_data.adapters.timm.create_train_loader), or pass num_splits=2 for "
                    f"timm's --aug-splits layout [clean; augmented]; got a plain tensor of shape {tuple(target.shape)}."
                )
            if batch % self.num_splits:
                raise ValueError(
                    f"with num_splits={self.num_splits} the batch size must be a multiple of {self.num_splits}, "
                    f"but logits have {batch} rows."
                )
            labels = target.to(logits.device)
            is_augmented = torch.arange(batch, device=logits.device) >= batch // self.num_splits
            op = None
        else:
            raise TypeError(f"target must be a SaflexTarget or a tensor, but got {type(target).__name__}.")
        SF.check_targets(labels, batch, num_classes, "target labels")
        return labels, is_augmented, op

    def _decide(self, logits: Tensor, labels: Tensor, upstream: Tensor, is_augmented: Tensor, op: Tensor | None,
                aug_index: Tensor, layout: BatchLayout) -> GlobalTargets:
        """Weights and soft labels of the augmented rows (of the global batch, under torch.distributed)."""
        capture = self._capture_of(logits)
        op = None if op is None else op[aug_index]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            signal = None
            if self.method != "single_pass":
                signal = self._validation_signal(capture, logits, labels, is_augmented)
                if signal is None:  # reference="batch", no clean row yet: nothing to compare with, keep all
                    ones = upstream.new_ones(len(upstream))
                    return GlobalTargets(ones, upstream, True, (upstream, ones, upstream, op, len(logits)))
            pi = self._inner_products(capture, logits, aug_index, signal)
            gate = {}
            if self.rule.stateful:  # [gated rules] the same batch's clean rows' own-label gain, from the same Π
                gate = {"state": self._rule_state, "reference": self._clean_gain(capture, logits, labels,
                                                                                 is_augmented, signal)}
            decision = self._sync.decide(pi, upstream, layout, rule=self.rule, generator=self._generator, op=op,
                                         logits=logits[aug_index].detach(), **gate)
            if decision.state is not None:
                self._rule_state = decision.state
            return decision

    def _clean_gain(self, capture: dict[str, Any], logits: Tensor, labels: Tensor, is_augmented: Tensor,
                    signal: Any) -> Tensor:
        """``[Σ_clean yᵀΠ, number of clean rows]`` of this rank's batch (masked sums: nothing read back)."""
        if self.method == "last_layer":  # the closed form over all rows: a (B, K) product, nearly free
            features = capture["features"]
            pi = SF.last_layer_inner_products(features.flatten(1), logits.detach(), signal[0], signal[1])
        else:  # Π of every row (one more pass over the batch for jvp; the tangent already has them for single_pass)
            pi = self._inner_products(capture, logits, torch.arange(len(logits), device=logits.device), signal)
        dtype = torch.promote_types(pi.dtype, torch.float32)
        clean = (~is_augmented).to(dtype)
        gain = (as_probabilities(labels, logits.shape[1], dtype) * pi.to(dtype)).sum(-1)
        return torch.stack([(gain * clean).sum(), clean.sum()])

    def _inner_products(self, capture: dict[str, Any], logits: Tensor, aug_index: Tensor, signal: Any) -> Tensor:
        """``Π`` `(n, K)` of the augmented rows (none on a rank without augmented rows; it still refreshed)."""
        if self.method == "single_pass":
            return SF.inner_products_from_tangent(logits[aug_index], capture["tangent"][aug_index])
        if self.method == "last_layer":
            features = capture["features"]
            return SF.last_layer_inner_products(
                features[aug_index].flatten(1), logits[aug_index], signal[0], signal[1]
            )
        if not aug_index.numel():
            return logits.new_zeros((0, logits.shape[1]))
        inputs = capture["inputs"]
        with internal_pass(), rng_preserved(inputs.device):
            if self.method == "jvp_frozen_stats" and not capture["stochastic"]:
                return SF.grad_inner_products(self.model, inputs[aug_index], signal, method="jvp",
                                              batch_stats=capture["bn_stats"] if _batch_dependent(self.model) else None)
            if capture["stochastic"] or _batch_dependent(self.model):
                # Train-mode BatchNorm normalises with the whole batch's statistics, and dropout's masks are drawn for
                # the whole batch: forward the whole batch with the training forward's random state, as the step did.
                if capture["rng"] is not None:
                    set_rng_state(capture["rng"], inputs.device)
                return SF.grad_inner_products(self.model, inputs, signal, method="jvp")[aug_index]
            return SF.grad_inner_products(self.model, inputs[aug_index], signal, method="jvp")

    # ------------------------------------------------------------------------------------------------------------
    # the validation signal
    # ------------------------------------------------------------------------------------------------------------
    def _validation_signal(self, capture: Any, logits: Tensor | None, labels: Any, is_augmented: Any) -> Any:
        if self._signal is not None and self.step % self.val_every != 0:
            return self._signal
        if self.reference == "batch":
            signal = self._batch_signal(capture, logits, labels, is_augmented)
            if signal is None:
                return self._signal
        else:
            signal = self._heldout_signal()
        signal = self._sync.reduce(signal)
        if not _tree_finite(signal):
            # Used once (this step falls back, counted) but never cached nor averaged in: one bad validation batch
            # must not switch SAFLEX off for val_every steps, or for good through val_ema.
            return signal
        if self.val_ema is not None and self._signal is not None:
            signal = _tree_lerp(signal, self._signal, self.val_ema)
        self._signal = signal
        return signal

    def _heldout_signal(self) -> Any:
        model = self.model
        inputs, targets = self._val.next(model_device(model), self.prepare)
        with validation_pass(model, inputs.device), self._val.model_call(inputs):
            if self.method != "last_layer":
                return SF.validation_gradient(model, inputs, targets, temperature=self.val_temperature)
            capture = SF._FeatureCapture(self._classifier)
            try:
                with torch.no_grad(), SF._running_stats_frozen(model):
                    logits = model(inputs)
            finally:
                capture.remove()
        SF.check_logits(logits, "model(validation inputs)")
        return self._last_layer_signal(capture.features.flatten(1), logits, targets)

    def _batch_signal(self, capture: Any, logits: Tensor, labels: Tensor, is_augmented: Tensor) -> Any:
        """The signal of the batch's clean rows (``reference="batch"``); ``None`` when it has none."""
        clean = (~is_augmented).nonzero().squeeze(1)
        if not clean.numel():
            if not self._sync.active:
                return None
            # [distributed] every rank joins the all-reduce; a rank without clean rows contributes zero
            zeros = {n: logits.new_zeros(shape, dtype=torch.promote_types(logits.dtype, torch.float32))
                     for n, shape in self._signal_shapes().items()}
            return (zeros["weight"], zeros.get("bias")) if self.method == "last_layer" else zeros
        if self.method == "last_layer":
            return self._last_layer_signal(capture["features"][clean].flatten(1), logits[clean].detach(), labels[clean])
        with validation_pass(self.model, logits.device):
            return SF.validation_gradient(self.model, capture["inputs"][clean], labels[clean],
                                          temperature=self.val_temperature)

    def _last_layer_signal(self, features: Tensor, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | None]:
        grad_weight, grad_bias = SF.last_layer_validation_gradient(
            features, logits, targets, temperature=self.val_temperature
        )
        linear = self._classifier
        if not linear.weight.requires_grad:
            raise ValueError(
                f"method='last_layer' needs a trainable classifier, but {self.classifier_name!r}.weight "
                "has requires_grad=False (a frozen head never moves, so its gradient says nothing about "
                "the step); use method='jvp', which counts the trainable parameters."
            )
        if linear.bias is None or not linear.bias.requires_grad:
            grad_bias = None  # only trainable parameters count
        return grad_weight, grad_bias

    def _signal_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.method == "last_layer":
            linear = self._classifier
            bias = {} if linear.bias is None else {"bias": tuple(linear.bias.shape)}
            return {"weight": tuple(linear.weight.shape), **bias}
        return {n: tuple(p.shape) for n, p in self.model.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------------------------------------------------
    # statistics
    # ------------------------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Clear the cumulative (per-op) statistics."""
        self._op_names: tuple[str, ...] | None = None
        self._totals: dict[str, Tensor] = {}
        self._last: dict[str, Tensor] = {}
        self.nonfinite_steps = 0

    @torch.no_grad()
    def _record(self, upstream: Tensor, weights: Tensor, targets: Tensor, op: Tensor | None, batch: int) -> None:
        """Statistics of the augmented rows ``upstream``/``weights``/``targets`` of a batch of ``batch`` rows."""
        relabeled = targets.argmax(-1) != upstream.argmax(-1)
        kept = weights > 0
        n_aug = torch.tensor(float(len(weights)))
        denom = n_aug.clamp_min(1)
        self._last = {
            "augmented_fraction": n_aug / batch,
            "kept_fraction": kept.sum().float() / denom,
            "relabeled_fraction": relabeled.sum().float() / denom,
            "weight_mean": weights.sum().float() / denom,
        }
        if op is None or not op.numel() or int(op.max()) < 0:
            return
        size = int(op.max()) + 1
        valid = op >= 0
        rows = op.clamp_min(0)
        for name, mask in (("count", valid), ("kept", kept & valid), ("relabeled", relabeled & valid)):
            counts = torch.bincount(rows[mask], minlength=size).cpu()
            old = self._totals.get(name, torch.zeros(0, dtype=torch.long))
            if len(old) < size:
                old = torch.cat([old, old.new_zeros(size - len(old))])
            old[:size] += counts
            self._totals[name] = old

    def op_stats(self) -> dict[str, dict[str, float]]:
        """Cumulative keep/relabel rates per upstream op since the last ``reset_stats()``."""
        if "count" not in self._totals:
            return {}
        names = self._op_names
        out = {}
        for i, count in enumerate(self._totals["count"].tolist()):
            if count == 0:
                continue
            name = names[i] if names is not None and i < len(names) else str(i)
            out[name] = {
                "count": float(count),
                "kept": self._totals["kept"][i].item() / count,
                "relabeled": self._totals["relabeled"][i].item() / count,
            }
        return out

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, rule={self.rule}, reference={self.reference!r}, val_every={self.val_every}, "
            f"val_temperature={self.val_temperature}, enabled={self.enabled}"
        )


def _outer_ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` wrapper of ``model`` (under ``torch.compile`` wrappers), if any."""
    while not isinstance(model, nn.parallel.DistributedDataParallel):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return model


def _first_tensor(output: Any) -> Tensor | None:
    """The logits of a forward's output: the tensor itself, the first tensor of a tuple, or a dict's ``logits``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "logits"):
        value = output.get("logits") if isinstance(output, dict) else output.logits
        return value if isinstance(value, Tensor) else None
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def _input_device(args: tuple, model: nn.Module) -> torch.device:
    return args[0].device if args and isinstance(args[0], Tensor) else model_device(model)


def _batch_dependent(model: nn.Module) -> bool:
    """Whether a sample's output depends on the rest of the batch (BatchNorm using batch statistics)."""
    return any(SF._uses_batch_stats(m) for m in model.modules())


def _tree_lerp(new: Any, old: Any, decay: float) -> Any:
    if isinstance(new, dict):
        # A parameter unfrozen since the last refresh has no average yet: it starts from its fresh gradient.
        return {k: decay * old[k] + (1 - decay) * new[k] if k in old else new[k] for k in new}
    return tuple(n if n is None or o is None else decay * o + (1 - decay) * n for n, o in zip(new, old))


def _tree_finite(signal: Any) -> bool:
    tensors = list(signal.values()) if isinstance(signal, dict) else [t for t in signal if t is not None]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.dtype == b.dtype


def _same_values(a: Tensor, b: Tensor) -> bool:
    """``torch.equal`` that also matches NaN with NaN (a non-finite step must fall back, not fail the check)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())
