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

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import rules as _rules
from ._math import (
    RULES_USING_LOGITS,
    Rule,
    as_probabilities,
    check_logits,
    check_targets,
    check_temperature,
    solve_dtype,
)
from ._methods import METHODS, PiMethod, Signal
from ._passes import model_device, unwrap_model, validation_pass
from ._removed import rejects_removed_arguments  # beta=, tau=, ... of 0.1: a TypeError naming the replacement
from ._report import DeviceFlags, StepRecord, StepReport
from ._stream import ValidationStream
from .batch import SaflexTarget
from .distributed import GatheredRows, Sync, forward_with_tangent

__all__ = ["SaflexLoss"]

LossMethod = Literal["jvp", "last_layer", "single_pass", "jvp_frozen_stats"]
_REFERENCES = ("heldout", "batch")
VAL_TEMPERATURE = 4.0  # the tempered validation loss (see docs/method.md and the measured results)

DEFAULT_RULE = "gated_prior"  # the default decision rule (docs/when_to_use.md#gated); "margin" before 0.2

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
            same as ``"jvp"`` for a model without batch-statistics BatchNorm; a BatchNorm module called several
            times per forward keeps each call's statistics. With dropout it forwards the whole batch to replay the
            masks, the statistics still held fixed: the same kind of ``Π``, at ``"jvp"``'s cost).
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
    # Attributes set every step: plain Python state, never parameters, submodules or buffers. nn.Module's own
    # __setattr__ checks each assignment against all three (a few microseconds each, a dozen times a step).
    _PLAIN_STATE = frozenset({"step", "last_step", "_rule_state", "_signal", "_signal_valid", "_last_record",
                              "_op_names", "_op_counts"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._PLAIN_STATE:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    @rejects_removed_arguments()
    def __init__(
        self,
        model: nn.Module,
        val_loader: Iterable[Any] | None = None,
        *,
        method: LossMethod = "last_layer",
        rule: Rule | str = DEFAULT_RULE,
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
        if method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, but got {method!r}.")
        if reference not in _REFERENCES:
            raise ValueError(f"reference must be one of {_REFERENCES}, but got {reference!r}.")
        if reference == "heldout" and (val_loader is None or not isinstance(val_loader, Iterable)):
            raise TypeError(
                "val_loader must be an iterable of (inputs, targets) batches (or None with reference='batch'), but "
                f"got {type(val_loader).__name__}."
            )
        if reference == "batch" and not METHODS[method].supports_batch_reference:
            raise ValueError("reference='batch' needs the batch before its forward: use method='last_layer' or 'jvp'.")
        if not isinstance(val_every, int) or isinstance(val_every, bool) or val_every < 1:
            raise ValueError(f"val_every must be an int >= 1, but got {val_every!r}.")
        if val_ema is not None and not 0.0 <= val_ema < 1.0:
            raise ValueError(f"val_ema must be None or a decay in [0, 1), but got {val_ema!r}.")
        check_temperature(val_temperature, "val_temperature")
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
        self.method, self.rule, self.reference = method, Rule.of(rule), reference
        self.val_every, self.val_ema, self.val_temperature = val_every, val_ema, float(val_temperature)
        self.prepare, self.num_splits, self.label_smoothing = prepare, num_splits, label_smoothing
        self.seed, self.enabled = seed, enabled
        self._sync = Sync(all_reduce, type(self).__name__)
        self._val = None if reference == "batch" else ValidationStream(val_loader, type(self).__name__, keys=val_keys)
        self.step = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._signal: Signal | None = None  # the cached validation signal
        self._signal_valid: Tensor | None = None  # reference="batch", last_layer: whether it saw a clean row (device)
        self._checked: dict[str, tuple] = {}  # what the value checks last saw (once per shape and dtype)
        self._warned_nonfinite = False
        self._fallback_keeps = "the upstream labels"
        self.last_step: dict[str, Tensor] = {}
        self.reset_stats()
        # How Π is computed: the method's hooks hold it weakly; it lives (and they stay) as long as the loss does.
        self._method: PiMethod = METHODS[method](self.model, classifier=classifier)
        self.classifier_name: str | None = getattr(self._method, "classifier_name", None)
        # [gated rules] the gate's state: kept across steps, saved in state_dict, reset only by reset_rule_state()
        self._rule_state: Tensor | None = None  # packed (saflex_data.rules.pack_state), on the device once used
        self.reset_rule_state()

    @property
    def all_reduce(self) -> bool:
        return self._sync.all_reduce

    # [gated rules] ---------------------------------------------------------------------------------------------
    @property
    def rule_state(self) -> dict[str, Tensor] | None:
        """A stateful rule's state (the gate of :mod:`saflex_data.rules`: its EMA sums and last ``strength``), as
        of the last step (0-d tensors; a later step does not change them); ``None`` for the other rules. Part of
        ``state_dict``; identical on every rank under torch.distributed."""
        return None if self._rule_state is None else _rules.unpack_state(self._rule_state)

    def reset_rule_state(self) -> None:
        """Forget the gate's evidence (nothing else resets it: not ``reset_stats``, not ``enabled``)."""
        self._rule_state = _rules.pack_state(_rules.init_state()) if self.rule.stateful else None

    def _gated_rule(self, rows: GatheredRows, finite: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """A gated rule that reads ``Π`` on the rows of the (global) batch: the clean rows' ``Π`` is in ``rows``
        already (every method computes it when the rule is stateful); the state moves only on a finite, valid step.
        (The ``p[y]``-weighted gated rules, the default among them, go through :meth:`_own_label_rule`.)"""
        state = self._rule_state.to(rows.pi.device)
        rule = self.rule
        weights, targets, new = _rules.gated_targets(
            rows.pi, rows.upstream, _rules.unpack_state(state), rule=rule.name, threshold=rule.beta,
            decay=rule.decay, logits=rows.logits, mask=rows.mask)  # fmt: skip
        keep = finite if valid is None else finite & valid
        self._rule_state = torch.where(keep, _rules.pack_state(new), state)
        return weights, targets

    def _own_label_rule(self, gain: Tensor, p_own: Tensor, mask: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """A ``p[y]``-weighted gated rule (:data:`saflex_data.rules.P_WEIGHTED_RULES`) on the rows' own-label gains
        ``yᵀΠ`` and ``p[y]`` of the (global) batch: ``(weights, finite)``. Weight 1 for the clean rows, and for every
        row of a step with a non-finite ``Π`` on an augmented row (or, ``reference="batch"``, without a clean row),
        whose state does not move."""
        rule = self.rule
        state = self._rule_state = self._rule_state.to(gain.device)
        weights, self._rule_state, finite = _rules.gated_weights(
            gain, p_own, state, rule=rule.name, threshold=rule.beta, decay=rule.decay, mask=mask, valid=valid)
        return weights, finite

    def settings(self) -> dict[str, Any]:
        """The settings every rank must share (compared on the first training call under torch.distributed)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return {
            "method": self.method, "rule": self.rule.name, "beta": self.rule.beta, "tau": self.rule.tau,
            "normalize": self.rule.normalize, "decay": self.rule.decay, "reference": self.reference,
            "val_every": self.val_every,
            "val_ema": self.val_ema, "val_temperature": self.val_temperature, "enabled": bool(self.enabled),
            "num_splits": self.num_splits, "label_smoothing": float(self.label_smoothing),
            "all_reduce": self.all_reduce,
            # Decisions on the global batch need the same Gumbel noise everywhere; per-rank decisions may differ.
            "seed": self.seed if self.all_reduce else None, "step": self.step, "classifier": self.classifier_name,
            "trainable_parameters": (len(params), sum(p.numel() for p in params)),
        }

    def remove_hooks(self) -> None:
        """Detach the loss from the model (its forward hooks); deleting the loss does the same."""
        self._method.remove_hooks()

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
        check_logits(logits)
        labels, is_augmented, op = self._unpack(logits, target)
        training = torch.is_grad_enabled() and logits.requires_grad and self.model.training
        if training:  # [distributed] compared on training calls only, also with enabled=False
            self._sync.check_once(self.settings)
        if not (self.enabled and training):
            return F.cross_entropy(logits, labels if labels.dim() == 2 else labels.long(),
                                   label_smoothing=self.label_smoothing)
        batch, num_classes = logits.shape
        dtype = solve_dtype(logits.dtype)  # the solve and the loss in >= float32
        upstream = as_probabilities(labels, num_classes, dtype, copy=True)
        # Fixed shapes from here on: every row is decided (the augmented ones by the rule), nothing is read back.
        weights, targets = self._decide(logits, labels, upstream, is_augmented, op)
        self.last_step = {"is_augmented": is_augmented, "weights": weights, "targets": targets,
                          "upstream": labels if labels.dim() == 1 else labels.argmax(-1)}
        self.step += 1
        if targets is upstream and labels.dim() == 1 and not self.label_smoothing:
            # The upstream hard labels: the same numbers as the one-hot targets' cross-entropy, in two ops
            per_sample = F.cross_entropy(logits.to(dtype), labels.long(), reduction="none")
        else:
            per_sample = F.cross_entropy(logits.to(dtype), targets, reduction="none",
                                         label_smoothing=self.label_smoothing)
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
        self._sync.check_once(self.settings)  # [distributed]
        signal, _ = self._validation_signal(None, None, None, None)
        train_model = self._train_model
        if model is not None:
            ddp = _outer_ddp(model)
            train_model = unwrap_model(model) if ddp is None else ddp
        logits, tangent = forward_with_tangent(train_model, inputs, signal)
        self._method.remember(logits, tangent=tangent)
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
            for name, value in (("is_augmented", is_augmented), ("op", op)):  # the attributes are settable
                if value is not None and value.device != logits.device:
                    raise ValueError(
                        f"target.{name} is on {value.device} but target.labels and the logits are on "
                        f"{logits.device}; move the whole target with target.to(device)."
                    )
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
        # The value checks read the labels on the host: once per shape and dtype, not every step.
        check_targets(labels, batch, num_classes, "target labels", values=self._first("target", labels, num_classes))
        self._checked["target"] = _signature(labels, num_classes)
        return labels, is_augmented, op

    def _first(self, name: str, tensor: Tensor, *extra: Any) -> bool:
        """Whether ``tensor`` differs in shape, dtype or device from the last one checked as ``name``."""
        return self._checked.get(name) != _signature(tensor, *extra)

    def _decide(self, logits: Tensor, labels: Tensor, upstream: Tensor, is_augmented: Tensor,
                op: Tensor | None) -> tuple[Tensor, Tensor]:
        """Weights `(B,)` and targets `(B, K)` of this rank's rows: the rule's for the augmented rows, ``1`` and the
        upstream label for the others (and for every row of a step whose ``Π`` is not finite)."""
        capture = self._method.capture_of(logits)
        index = self._method.select(is_augmented)  # host indices: only methods that select rows (JVP) read them
        layout = self._sync.layout(*logits.shape, -1 if index is None else index.numel(), logits.device)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            signal, valid = None, None
            if self._method.supports_batch_reference:  # the signal exists before the forward
                if layout.total_augmented != 0:  # (no augmented row, known on the host: no validation pass)
                    signal, valid = self._validation_signal(capture, logits, labels, is_augmented)
                if signal is None:  # or reference="batch", no clean row yet: nothing to compare with, keep all
                    ones = upstream.new_ones(len(upstream))
                    self._record(StepRecord(upstream, ones, upstream, op, is_augmented, len(logits)))
                    return ones, upstream
            with torch.no_grad():
                if self.rule.stateful and index is not None:  # [gated rules] Π of the clean rows too
                    index = torch.arange(len(logits), device=logits.device)
                if self.rule.name in _rules.P_WEIGHTED_RULES:  # all they read: each row's yᵀΠ and p[y]
                    gain, p_own = self._method.own_label_gains(capture, logits, is_augmented, signal, upstream, index)
                    mask = is_augmented
                    if self._sync.active:  # [distributed] the global batch's rows: 4 numbers each
                        rows = self._sync.gather(torch.stack([gain, p_own], 1), None, mask, layout, op=op)
                        (gain, p_own), mask = rows.pi.unbind(1), rows.mask
                    weights, finite = self._own_label_rule(gain, p_own, mask, valid)
                    self._fallbacks.push(~finite)
                    self._record(StepRecord(None, weights, None, op if not self._sync.active else rows.op, mask,
                                            sum(layout.batch_sizes)))
                    self._poll_fallbacks()
                    return (weights, upstream) if not self._sync.active else (weights[rows.mine], upstream)
                pi = self._method.inner_products(capture, logits, is_augmented, signal, index)
                exchange_logits = not self._sync.active or self.rule.name in RULES_USING_LOGITS
                rows = self._sync.gather(pi.to(upstream.dtype), upstream, is_augmented, layout, op=op,
                                         logits=logits if exchange_logits else None)
                weights, targets, finite = self._apply_rule(rows, valid)
        self._fallbacks.push(~finite)
        relabels = self.rule.relabels
        self._record(StepRecord(rows.upstream if relabels else None, weights, targets if relabels else None, rows.op,
                                rows.mask, sum(layout.batch_sizes)))
        self._poll_fallbacks()
        if rows.mine == slice(0, len(weights)):  # one process
            return weights, targets
        return weights[rows.mine], targets[rows.mine]

    def _apply_rule(self, rows: GatheredRows, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The rule on the augmented rows of the (global) batch: weights, targets, and whether ``Π`` was finite.

        A non-finite ``Π`` of an augmented row (on any rank) makes the whole step keep the upstream labels with
        weight 1: decided on the device, as everything here (no host synchronisation).
        """
        mask = rows.mask
        pi = torch.where(mask[:, None], rows.pi, 0)  # the other rows may hold anything, NaN included
        finite = pi.abs().amax() < math.inf  # False for a NaN as for an inf
        if self.rule.stateful:
            weights, targets = self._gated_rule(rows, finite, valid)
        else:
            weights, targets = self.rule.decide(pi, rows.upstream, mask, generator=self._generator,
                                                logits=rows.logits)
        decided = mask & finite if valid is None else mask & finite & valid
        weights = torch.where(decided, weights, 1)
        if self.rule.relabels:
            targets = torch.where(decided[:, None], targets, rows.upstream)
        return weights, targets, finite

    # ------------------------------------------------------------------------------------------------------------
    # the validation signal
    # ------------------------------------------------------------------------------------------------------------
    def _validation_signal(self, capture: Any, logits: Tensor | None, labels: Any,
                           is_augmented: Any) -> tuple[Signal | None, Tensor | None]:
        """This step's signal and, for ``reference="batch"`` with ``last_layer``, a device bool saying whether this
        batch has at least one clean row (``None``: it does). ``(None, None)``: no signal, keep every sample."""
        # Reused between refreshes, unless the trainable parameters changed since (a layer frozen or unfrozen): the
        # cached signal would still count the frozen layer (or miss the unfrozen one) until the next refresh.
        if (self._signal is not None and self.step % self.val_every != 0
                and self._signal.keys() == self._signal_shapes().keys()):
            return self._signal, self._signal_valid
        valid = None
        if self.reference == "batch":
            fresh = self._batch_signal(capture, logits, labels, is_augmented)
            if fresh is None:  # no clean row in this batch (known on the host): it keeps every sample
                return None, None
            signal, valid = fresh
        else:
            signal = self._heldout_signal()
        signal = self._sync.reduce(signal)
        old = self._signal
        if old is not None and valid is None and self.val_every == 1 and self.val_ema is None:
            # Refreshed every step and never averaged: the cache serves only a saved state, so it is replaced
            # without the finiteness test (a non-finite Π falls back on its own).
            self._signal = signal
            return signal, None
        finite = _finite(signal)
        if old is None:
            # The first signal is checked on the host (once): a non-finite one is used for this step (which falls
            # back) but not cached, so that the next step draws a new one.
            if bool(finite):
                self._signal, self._signal_valid = signal, valid
            return signal, valid
        if self.val_ema is not None:
            signal = _lerp(signal, old, self.val_ema)
        # Cached only when finite (and from a clean row): one bad validation batch must not switch SAFLEX off for
        # val_every steps, or for good through val_ema. Decided on the device, no host synchronisation.
        use = finite if valid is None else finite & valid
        self._signal = {k: _select(use, v, old[k]) if k in old else v for k, v in signal.items()}
        if valid is not None:
            step_signal = {k: _select(valid, v, old[k]) if k in old else v for k, v in signal.items()}
            old_valid = self._signal_valid
            self._signal_valid = valid if old_valid is None else valid | old_valid
            return step_signal, valid  # this batch without a clean row keeps every sample (not the cached signal)
        return signal, self._signal_valid

    def _heldout_signal(self) -> Signal:
        model = self.model
        inputs, targets = self._val.next(model_device(model), self.prepare)
        first = self._first("val", targets)
        with validation_pass(model, inputs.device), self._val.model_call(inputs):
            signal = self._method.heldout_signal(inputs, targets, self.val_temperature, check=first)
        self._checked["val"] = _signature(targets)
        return signal

    def _batch_signal(self, capture: Any, logits: Tensor, labels: Tensor,
                      is_augmented: Tensor) -> tuple[Signal, Tensor | None] | None:
        """The signal of the batch's clean rows (``reference="batch"``); ``None`` when it (known on the host) has
        none."""
        with validation_pass(self.model, logits.device):
            fresh = self._method.batch_signal(capture, logits, labels, ~is_augmented, self.val_temperature)
        if fresh is None and self._sync.active:
            # [distributed] every rank joins the all-reduce; a rank without clean rows contributes zero
            dtype = solve_dtype(logits.dtype)
            return {n: logits.new_zeros(shape, dtype=dtype) for n, shape in self._signal_shapes().items()}, None
        return fresh

    def _signal_shapes(self) -> dict[str, tuple[int, ...]]:
        return self._method.signal_shapes()

    def _upgrade_state(self, state: dict[str, Any], version: int) -> dict[str, Any]:
        # Earlier versions: a last_layer loss saved its signal as the tuple (grad_weight, grad_bias | None) and its
        # shapes as {"weight", "bias"}: the same tensors, now keyed by the classifier's parameter names.
        saved = state.get("signal")
        if isinstance(saved, (tuple, list)) and self.method == "last_layer":
            names = (self._method.weight_name, self._method.bias_name)
            state = {**state, "signal": {n: t for n, t in zip(names, saved, strict=False) if t is not None}}
            if state.get("signal_shapes") is not None:
                state["signal_shapes"] = {names[0] if k == "weight" else names[1] if k == "bias" else k: v
                                          for k, v in state["signal_shapes"].items()}
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        if self.rule.stateful:  # [gated rules] the gate's state (a state saved by a stateless rule: a fresh gate)
            saved = state.get("rule_state")
            saved = _rules.init_state() if saved is None else _rules.check_state(saved, "state_dict's rule_state")
            self._rule_state = _rules.pack_state(saved)

    # ------------------------------------------------------------------------------------------------------------
    # statistics
    # ------------------------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Clear the cumulative (per-op) statistics."""
        self._op_names: tuple[str, ...] | None = None
        self._totals: dict[str, Tensor] = {}
        self._op_counts: Tensor | None = None  # (3, len(op_names)) on the device: count, kept, relabeled
        self._last_record: StepRecord | None = None
        self._fallbacks = DeviceFlags()
        self.nonfinite_steps = 0

    @property
    def stats(self) -> dict[str, float | int]:
        """Statistics of the last step (fractions of its augmented samples, floats) plus two counts (ints): the
        non-finite fallbacks (``"nonfinite_steps"``) and the training steps so far (``"step"``).

        Computed when read (from the last step's decisions, still on the device): reading them is the host
        synchronisation a training step does not do.
        """
        self._poll_fallbacks(wait=True)
        return StepReport.stats.fget(self)

    @property
    def _last(self) -> dict[str, Tensor]:
        record = self._last_record
        if record is None:
            return {}
        with torch.no_grad():
            mask = record.mask
            n_aug = mask.sum().float()
            denom = n_aug.clamp_min(1)
            relabeled = _relabeled(record) & mask
            return {
                "augmented_fraction": n_aug / record.batch_size,
                "kept_fraction": ((record.weights > 0) & mask).sum().float() / denom,
                "relabeled_fraction": relabeled.sum().float() / denom,
                "weight_mean": torch.where(mask, record.weights, 0).sum().float() / denom,
            }

    def _poll_fallbacks(self, wait: bool = False) -> None:
        for _ in range(self._fallbacks.poll(wait)):
            self._nonfinite_fallback()

    def get_extra_state(self) -> dict[str, Any]:
        self._poll_fallbacks(wait=True)
        state = super().get_extra_state()
        if self._rule_state is not None:
            state["rule_state"] = {k: v.detach().clone() for k, v in _rules.unpack_state(self._rule_state).items()}
        return state

    @torch.no_grad()
    def _record(self, record: StepRecord) -> None:
        """Keep the step's decisions for ``stats`` (computed when read) and add them to the per-op totals."""
        self._last_record = record
        if record.op is None:
            return
        kept = (record.weights > 0) & record.mask
        relabeled = _relabeled(record) & record.mask
        valid = record.mask & (record.op >= 0)
        columns = torch.stack([valid, kept & valid, relabeled & valid])
        size = None if self._op_names is None else len(self._op_names)
        if size is not None and (self._op_counts is None or self._op_counts.shape[1] == size):
            # Known op names (SaflexCollate gives them): fixed-size totals on the device, no host synchronisation.
            if self._op_counts is None:
                self._op_counts = torch.zeros(3, size, dtype=torch.long, device=record.op.device)
            valid = valid & (record.op < size)
            self._op_counts.index_add_(1, torch.where(valid, record.op, 0), (columns & valid).long())
            return
        # Op ids without names: their range is read on the host (one synchronisation per step with op ids).
        self._fold_op_stats()
        self._add_op_totals(torch.where(valid, record.op, -1), columns.long())

    def _add_op_totals(self, op: Tensor, columns: Tensor) -> None:
        if not op.numel() or int(op.max()) < 0:
            return
        size = int(op.max()) + 1
        valid = op >= 0
        rows = op.clamp_min(0)
        for name, column in zip(("count", "kept", "relabeled"), columns, strict=False):
            counts = torch.zeros(size, dtype=torch.long).index_add_(0, rows[valid].cpu(), column[valid].cpu())
            self._add_total(name, counts)

    def _add_total(self, name: str, counts: Tensor) -> None:
        old = self._totals.get(name, torch.zeros(0, dtype=torch.long))
        if len(old) < len(counts):
            old = torch.cat([old, old.new_zeros(len(counts) - len(old))])
        old[: len(counts)] += counts
        self._totals[name] = old

    def _fold_op_stats(self) -> None:
        """Move the device totals into the host totals (a host read: when the statistics are read)."""
        counts, self._op_counts = self._op_counts, None
        if counts is not None:
            for name, column in zip(("count", "kept", "relabeled"), counts.cpu(), strict=False):
                self._add_total(name, column)

    def op_stats(self) -> dict[str, dict[str, float]]:
        """Cumulative keep/relabel rates per upstream op since the last ``reset_stats()``."""
        self._fold_op_stats()
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


def _relabeled(record: StepRecord) -> Tensor:
    """Bool `(N,)`: the rows whose label the step changed (none for a rule that never relabels)."""
    if record.soft_labels is None:
        return torch.zeros_like(record.mask)
    return record.soft_labels.argmax(-1) != record.upstream.argmax(-1)


def _lerp(new: Signal, old: Signal, decay: float) -> Signal:
    """``decay · old + (1 − decay) · new`` per parameter, as multi-tensor ops (three for the whole signal; the
    ``torch._foreach_*`` kernels ``torch.optim`` steps with, elementwise the same numbers). A parameter unfrozen since
    the last refresh has no average yet: it starts from its fresh gradient."""
    shared = [k for k in new if k in old]
    if not shared:
        return dict(new)
    mixed = torch._foreach_add(torch._foreach_mul([old[k] for k in shared], decay),
                               torch._foreach_mul([new[k] for k in shared], 1 - decay))
    return {**new, **dict(zip(shared, mixed, strict=True))}


def _finite(signal: Signal) -> Tensor:
    """Whether every entry of the signal is finite, as a device bool: from each tensor's smallest and largest entry
    (``aminmax``, one pass; a NaN propagates through it), several times faster than ``isfinite(t).all()`` or an
    infinity norm on the CPU."""
    extremes = [m for t in signal.values() if t.numel() for m in torch.aminmax(t)]
    if not extremes:
        return torch.tensor(True)
    return torch.stack(extremes).abs().amax() < math.inf


def _select(use: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``torch.where(use, new, old)`` for a 0-d ``use``. A large CPU block is picked as an index into
    ``[old, new]`` instead (bit for bit the same; a quarter of ``torch.where``'s time on a (1000, 256) block, whose
    0-d condition it broadcasts element by element); on a GPU, and for small blocks, ``torch.where`` is cheaper."""
    if new.device.type == "cpu" and new.numel() > 4096:
        return torch.stack([old, new])[use.long()]
    return torch.where(use, new, old)


def _signature(tensor: Tensor, *extra: Any) -> tuple:
    return (tuple(tensor.shape), tensor.dtype, tensor.device, *extra)
