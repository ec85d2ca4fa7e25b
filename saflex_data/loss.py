"""``SaflexLoss``: a drop-in criterion that learns weights and soft labels for the augmented samples of a batch.

``loss = criterion(logits, target)``, exactly like timm's and torchvision's loops call a loss. The criterion holds
a reference to the model (not a submodule) and a validation loader it cycles forever. Each step it

1. refreshes the validation gradient ``g`` (every ``val_every`` steps; optionally averaged or smoothed),
2. computes ``Π[i, k] = <∇θ ℓ_k(x_i), g>`` for the augmented samples (``method``: exact ``"jvp"``, the cheap
   ``"last_layer"`` closed form, or the exact ``"single_pass"`` forward with dual parameters),
3. turns ``Π`` into weights and soft labels with :func:`saflex_data.functional.saflex_targets`, and
4. returns ``(Σ_clean CE(y_j) + Σ_aug w_i CE(ỹ_i)) / B`` (a fixed normaliser, SPEC §2).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as _dist
from . import functional as SF
from ._validation import ValidationStream
from .batch import SaflexTarget

__all__ = ["SaflexLoss"]

LossMethod = Literal["jvp", "last_layer", "single_pass", "jvp_frozen_stats"]
_METHODS = ("jvp", "last_layer", "single_pass", "jvp_frozen_stats")
# The tempered validation loss: weight AUROC 0.74 -> 0.90 for wrong upstream labels (benchmarks/decision_quality.py).
VAL_TEMPERATURE = 4.0


def unwrap_model(model: nn.Module) -> nn.Module:
    """The raw module behind ``DistributedDataParallel``/``DataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class _StepReport:
    """What both SAFLEX losses share: the per-step ``stats``, the warn-once non-finite fallback counter and the
    resumable state (``get_extra_state``/``set_extra_state``).

    The host sets ``_last`` (tensors of the last step), ``step``, ``nonfinite_steps``, ``_warned_nonfinite``,
    ``_fallback_keeps`` (what a fallback step keeps, for the warning), ``_generator``, ``_val`` (its
    ``ValidationStream``) and ``_state_signal``: the state key and the attribute of its cached validation signal.
    """

    _last: dict[str, Tensor]
    step: int
    nonfinite_steps: int
    _warned_nonfinite: bool
    _fallback_keeps: str
    _generator: torch.Generator
    _val: Any
    _state_signal: tuple[str, str]

    @property
    def stats(self) -> dict[str, float]:
        """Statistics of the last step (fractions of its augmented samples) plus the non-finite fallback count."""
        out = {k: float(v) for k, v in self._last.items()}
        out["nonfinite_steps"] = float(self.nonfinite_steps)
        out["step"] = float(self.step)
        return out

    def _nonfinite_fallback(self) -> None:
        self.nonfinite_steps += 1
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: non-finite inner products (NaN/inf in the validation gradient, the logits or "
                f"their tangent); this step keeps {self._fallback_keeps} with weight 1. Counted in "
                "stats['nonfinite_steps'].",
                RuntimeWarning,
                stacklevel=3,
            )

    def get_extra_state(self) -> dict[str, Any]:
        key, attr = self._state_signal
        return {
            "step": self.step,
            "generator": self._generator.get_state(),
            key: getattr(self, attr),
            "nonfinite_steps": self.nonfinite_steps,
            **self._val.state(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        key, attr = self._state_signal
        self.step = int(state["step"])
        self._generator.set_state(state["generator"])
        setattr(self, attr, state.get(key))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self._val.load_state(state)  # a fresh iterator, fast-forwarded to where the saved run was


class SaflexLoss(_StepReport, nn.Module):
    """Cross-entropy with SAFLEX weights and soft labels for the augmented samples of each batch.

    Args:
        model: The model being trained (a ``DistributedDataParallel`` or ``torch.compile`` wrapper is unwrapped;
            the extra passes always use the raw module). Held as a plain reference, not a submodule.
        val_loader: Any iterable of ``(inputs, targets)`` validation batches (targets: class indices or
            probabilities). It is cycled forever; batches are moved to the model's device.
        method: How ``Π`` is computed: ``"last_layer"`` (default: closed form from the classifier's input features;
            nearly free), ``"jvp"`` (exact, one forward-mode pass over the augmented samples, or over the whole batch
            when BatchNorm uses batch statistics), ``"single_pass"`` (exact; the training forward itself carries
            the tangent: call ``logits = criterion.forward_train(x)`` instead of ``model(x)``) or
            ``"jvp_frozen_stats"`` (the JVP of the augmented rows only, with train-mode BatchNorm's batch statistics
            recorded in the training forward held fixed: cheaper than ``"jvp"``, and a different ``Π``, without the
            statistics' tangent; the same as ``"jvp"`` for a model without batch-statistics BatchNorm).
        beta: The rule's margin or bonus (see ``saflex_targets``); ``None`` takes the rule's default (1.5 batch
            standard deviations for ``"margin"``, 0.5 for ``"paper"``).
        tau: Gumbel-softmax temperature for the relabelling rules; ``None`` for a deterministic argmax.
        normalize: Scaling of ``Π`` before the bonus and the noise (``"paper"``/``"centered"``).
        rule: Decision rule passed to ``saflex_targets``. Default ``"margin"``: drop an augmented sample whose
            upstream label trails the best class by more than ``beta`` batch standard deviations of ``Π``, never
            relabel (the rule that measured best in ``benchmarks/decision_quality.py``); ``"paper"`` is the paper's
            exact rule (β bonus, Gumbel-softmax relabelling, ``w = 1[yᵀΠ ≥ 0]``).
        val_every: Refresh the validation gradient every ``val_every`` steps (reuse it in between).
        val_batches: Average the validation gradient over this many validation minibatches per refresh.
        val_ema: If set, keep an exponential moving average of the validation gradient with this decay.
        val_mode: ``"eval"`` (default: BatchNorm running statistics, no dropout; the objective a test-time model
            is judged by) or ``"train"`` for the validation pass. Running statistics are never changed.
        val_temperature: ``T`` of the tempered validation loss ``T · CE(z / T, y)`` whose gradient is the
            validation signal (``SF.validation_residual``; not in the paper; ``math.inf`` allowed). With ``T = 1``
            (the paper) the signal fades as the model fits the validation samples; a larger ``T`` keeps every
            validation sample voting for its class.
        enabled: ``False`` makes the loss exactly plain (soft-label) cross-entropy; a switch for the train loop.
        prepare: Optional callable applied to validation inputs after the device move (normalisation,
            ``channels_last``, dtype), so that they look like the training inputs.
        classifier: For ``"last_layer"``: the ``nn.Linear`` producing the logits, or its name; found automatically
            (timm's ``get_classifier()``, ``fc``, ``head``, ``classifier``, ... or the last ``nn.Linear``) if None.
        num_splits: Positional tagging for plain tensor targets (timm's ``--aug-splits``): the batch is
            ``[clean; aug_1; ...]`` in ``num_splits`` equal parts, the first clean.
        precondition: Optional Adam/AdamW optimizer of the model: the tangent becomes ``-P g`` with
            ``P = 1 / (sqrt(v̂) + eps)``, consistent with an Adam step (SPEC §4; not in the paper).
        label_smoothing: Passed to ``F.cross_entropy`` for every sample.
        all_reduce: Under ``torch.distributed`` (DDP, ``torchrun``): average the validation gradient across ranks (one
            all-reduce of parameter-sized tensors per refresh, as large as DDP's gradient all-reduce) and decide on
            the global batch (an all-gather of the augmented rows' ``Π`` each step), so that every rank decides
            exactly like one process on the concatenated batch and ``stats`` are global; ``False`` keeps all of it
            per rank. See :mod:`saflex_data.distributed`. The ranks' settings are compared on the first training call.
        seed: Seed of the Gumbel noise generator (part of ``state_dict``).

    The validation loader's batch size matters: the decisions are made from one validation minibatch per refresh, and
    128 samples measured clearly better than 32 (``benchmarks/decision_quality.py``).

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

    def __init__(
        self,
        model: nn.Module,
        val_loader: Iterable[Any],
        *,
        method: LossMethod = "last_layer",
        beta: float | None = None,
        tau: float | None = 0.01,
        normalize: SF.Normalize = "batch_max",
        rule: SF.Rule = "margin",
        val_every: int = 1,
        val_batches: int = 1,
        val_ema: float | None = None,
        val_mode: Literal["eval", "train"] = "eval",
        val_temperature: float = VAL_TEMPERATURE,
        enabled: bool = True,
        prepare: Callable[[Tensor], Tensor] | None = None,
        classifier: nn.Module | str | None = None,
        num_splits: int | None = None,
        precondition: torch.optim.Optimizer | None = None,
        label_smoothing: float = 0.0,
        all_reduce: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, but got {type(model).__name__}.")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, but got {method!r}.")
        if val_loader is None or not isinstance(val_loader, Iterable):
            raise TypeError(
                f"val_loader must be an iterable of (inputs, targets) batches, but got {type(val_loader).__name__}."
            )
        for name, value in (("val_every", val_every), ("val_batches", val_batches)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, but got {value!r}.")
        if val_ema is not None and not 0.0 <= val_ema < 1.0:
            raise ValueError(f"val_ema must be None or a decay in [0, 1), but got {val_ema!r}.")
        if val_mode not in ("eval", "train"):
            raise ValueError(f"val_mode must be 'eval' or 'train', but got {val_mode!r}.")
        SF.check_temperature(val_temperature, "val_temperature")
        if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 2):
            raise ValueError(f"num_splits must be None or an int >= 2 ([clean; augmented...]), but got {num_splits!r}.")
        if prepare is not None and not callable(prepare):
            raise TypeError(f"prepare must be a callable or None, but got {type(prepare).__name__}.")
        # Validate the rule settings once, on a dummy problem, so a typo fails here and not mid-epoch.
        SF.saflex_targets(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), beta=beta, tau=tau,
                          normalize=normalize, rule=rule)

        # A plain attribute (not a submodule): the model's parameters must not appear in this loss's state_dict.
        self.__dict__["model"] = unwrap_model(model)
        # method="single_pass": the training forward itself must go through a DDP wrapper (DDP arms its gradient
        # all-reduce in forward); the extra passes of the other methods use the raw module.
        ddp = _outer_ddp(model)
        self.__dict__["_train_model"] = self.model if ddp is None else ddp
        self.val_loader = val_loader
        self.method = method
        self.beta = SF.default_beta(rule) if beta is None else beta  # a number from here on (state, DDP checks)
        self.tau, self.normalize, self.rule = tau, normalize, rule
        self.val_every, self.val_batches, self.val_ema, self.val_mode = val_every, val_batches, val_ema, val_mode
        self.val_temperature = float(val_temperature)
        self.enabled = enabled
        self.prepare = prepare
        self.num_splits = num_splits
        self.precondition = precondition
        self.label_smoothing = label_smoothing
        self.all_reduce = all_reduce
        self.seed = seed
        self._ranks_checked = False  # [distributed] settings compared across ranks on the first call

        self.step = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._val = ValidationStream(val_loader, type(self).__name__)
        self._signal: Any = None  # cached validation signal: dict (jvp) or (G_W, G_b) (last_layer)
        self._busy = False  # True during the loss's own passes: the capture hooks ignore them
        self._inputs: Tensor | None = None
        self._features: Tensor | None = None
        self._classifier_output: Tensor | None = None
        self._tangent: Tensor | None = None
        self._val_capture: tuple[Tensor, Tensor] | None = None
        self._classifier_checked = False
        self._warned_nonfinite = False
        self._fallback_keeps = "the upstream labels"
        self.last_step: dict[str, Tensor] = {}
        self.reset_stats()

        self.classifier_name: str | None = None
        if method == "last_layer":
            self.classifier_name, linear = SF.find_classifier(self.model, classifier)
            self.__dict__["_classifier"] = linear  # a plain reference, not a submodule (no state_dict entries)
            self._handles = [linear.register_forward_hook(self._capture_features)]
        elif method in ("jvp", "jvp_frozen_stats"):
            self._handles = [self.model.register_forward_pre_hook(self._capture_inputs)]
            if method == "jvp_frozen_stats":
                self._batch_stats = SF.BatchStatsCapture(self.model, skip=lambda: self._busy)
                self._handles += self._batch_stats.handles
        else:
            self._handles = []

    # ------------------------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------------------------
    def _capture_inputs(self, module: nn.Module, args: tuple) -> None:
        if not self._busy and args:
            self._inputs = args[0]

    def _capture_features(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self._busy:
            self._val_capture = (args[0], output)
        else:
            # Detached: a forward without a loss call (a skipped step, an eval pass with grad) must not pin its graph.
            self._features, self._classifier_output = args[0].detach(), output.detach()

    def remove_hooks(self) -> None:
        """Detach the loss from the model (its forward hooks)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

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
        training = torch.is_grad_enabled() and logits.requires_grad
        if training:  # [distributed] training calls only (no collective in an evaluation that may run on one rank),
            self._check_ranks()  # also with enabled=False
        if not (self.enabled and training):
            return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        batch, num_classes = logits.shape
        aug_index = is_augmented.nonzero().squeeze(1)
        dtype = torch.promote_types(logits.dtype, torch.float32)  # the solve and the loss in >= float32
        targets = _soft(labels, num_classes, dtype)
        weights = torch.ones(batch, dtype=dtype, device=logits.device)
        # [distributed] the ranks' counts first: all refresh and exchange iff the global batch has augmented rows
        layout = None
        if self._synced():
            layout = _dist.batch_layout(len(aug_index), batch, num_classes, device=logits.device)
        record = None
        if aug_index.numel() or (layout is not None and layout.total_augmented):
            with torch.autocast(device_type=logits.device.type, enabled=False):
                if aug_index.numel():
                    pi = self._inner_products(logits, aug_index)
                else:  # [distributed] augmented rows on other ranks only: refresh with them, join the exchange
                    if self.method != "single_pass":
                        self._validation_signal()
                    pi = logits.new_zeros((0, num_classes), dtype=dtype)
                upstream = labels[aug_index]
                finite = bool(torch.isfinite(pi).all())
                if layout is not None:  # [distributed] decide on the global batch, keep this rank's rows
                    aug_weights, aug_labels, finite, record = _dist.global_saflex_targets(
                        pi, upstream, layout, op=None if op is None else op[aug_index], beta=self.beta,
                        tau=self.tau, normalize=self.normalize, rule=self.rule, generator=self._generator,
                    )
                    if not finite:
                        self._nonfinite_fallback()
                elif finite:
                    aug_weights, aug_labels = SF.saflex_targets(
                        pi, upstream, beta=self.beta, tau=self.tau, normalize=self.normalize, rule=self.rule,
                        generator=self._generator,
                    )
                else:
                    self._nonfinite_fallback()
                    aug_weights, aug_labels = torch.ones(len(aug_index), dtype=dtype), _soft(upstream, num_classes)
            weights[aug_index] = aug_weights.to(device=logits.device, dtype=dtype)
            targets[aug_index] = aug_labels.to(device=logits.device, dtype=dtype)
        self._inputs = self._features = self._classifier_output = self._tangent = None
        if record is None:
            self._record(labels, is_augmented, op, weights, targets, num_classes)
        else:  # [distributed] stats of the global batch (identical on every rank); last_step keeps this rank's rows
            self._record(*record, num_classes)
            upstream_index = labels if labels.dim() == 1 else labels.argmax(-1)
            self.last_step = {"is_augmented": is_augmented, "weights": weights, "targets": targets,
                              "upstream": upstream_index}
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
        self._check_ranks()  # [distributed]
        signal = self._validation_signal()
        train_model = self._train_model
        if model is not None:
            ddp = _outer_ddp(model)
            train_model = unwrap_model(model) if ddp is None else ddp
        logits, self._tangent = _dist.forward_with_tangent(train_model, inputs, signal)
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

    def _inner_products(self, logits: Tensor, aug_index: Tensor) -> Tensor:
        batch = logits.shape[0]
        if self.method == "last_layer":
            features = self._require(self._features, batch, "features of the classifier (its forward hook)")
            if not self._classifier_checked:
                out = self._classifier_output
                if out is None or out.shape != logits.shape or not _same_values(out, logits.detach()):
                    raise ValueError(
                        f"the classifier {self.classifier_name!r} did not produce the logits passed to the loss; "
                        "pass classifier=<the nn.Linear whose output is the logits> or use method='jvp'."
                    )
                self._classifier_checked = True
            grad_weight, grad_bias = self._validation_signal()
            return SF.last_layer_inner_products(
                features[aug_index].flatten(1), logits[aug_index], grad_weight, grad_bias
            )
        if self.method == "single_pass":
            tangent = self._require(self._tangent, batch, "logit tangent (call logits = criterion.forward_train(x))")
            return SF.inner_products_from_tangent(logits[aug_index], tangent[aug_index])
        inputs = self._require(self._inputs, batch, "inputs of the model's forward (its forward pre-hook)")
        signal = self._validation_signal()
        with self._own_pass():
            if self.method == "jvp_frozen_stats":
                rows, stats = self._batch_stats.batch_size, self._batch_stats.pop()  # from this batch's forward
                if stats and rows != batch:
                    raise ValueError(f"the BatchNorm statistics were recorded on {rows} rows but the logits have "
                                     f"{batch}; call the loss right after the model's forward on the same batch.")
                return SF.grad_inner_products(self.model, inputs[aug_index], signal, method="jvp", batch_stats=stats)
            if _batch_dependent(self.model):
                # Train-mode BatchNorm normalises with the whole batch's statistics: forward the whole batch, as the
                # training step did (the augmented rows alone see other statistics, and a single one fails).
                return SF.grad_inner_products(self.model, inputs, signal, method="jvp")[aug_index]
            return SF.grad_inner_products(self.model, inputs[aug_index], signal, method="jvp")

    def _require(self, value: Tensor | None, batch: int, what: str) -> Tensor:
        if value is None:
            raise RuntimeError(
                f"SaflexLoss(method={self.method!r}) saw no {what} since the last call; call the model (or "
                "forward_train) on the batch, then the loss, once per step. (A model compiled with torch.compile and "
                "already run before SaflexLoss was built keeps a graph without the loss's hooks: build SaflexLoss "
                "before the first compiled forward, or call torch._dynamo.reset().)"
            )
        if value.shape[0] != batch:
            raise ValueError(
                f"the {what} has batch size {value.shape[0]} but the logits have {batch}: the loss must be called "
                "right after the model's forward on the same batch."
            )
        return value

    @contextlib.contextmanager
    def _own_pass(self) -> Iterator[None]:
        self._busy = True
        try:
            yield
        finally:
            self._busy = False

    # ------------------------------------------------------------------------------------------------------------
    # the validation signal
    # ------------------------------------------------------------------------------------------------------------
    def _validation_signal(self) -> Any:
        if self._signal is not None and self.step % self.val_every != 0:
            return self._precondition(self._signal)
        fresh = [self._one_validation_signal() for _ in range(self.val_batches)]
        signal = _tree_mean(fresh)
        signal = self._all_reduce(signal)
        if not _tree_finite(signal):
            # Used once (this step falls back, counted) but never cached nor averaged in: one bad validation batch
            # must not switch SAFLEX off for val_every steps, or for good through val_ema.
            return self._precondition(signal)
        if self.val_ema is not None and self._signal is not None:
            signal = _tree_lerp(signal, self._signal, self.val_ema)
        self._signal = signal
        return self._precondition(signal)

    def _one_validation_signal(self) -> Any:
        inputs, targets = self._val.next(_model_device(self.model), self.prepare)
        model = self.model
        modes = [(m, m.training) for m in model.modules()]  # restored one by one: frozen submodules stay in eval
        model.train(self.val_mode == "train")
        try:
            with self._own_pass(), torch.autocast(device_type=inputs.device.type, enabled=False):
                if self.method == "last_layer":
                    self._val_capture = None
                    with torch.no_grad(), SF._running_stats_frozen(model):
                        logits = model(inputs)
                    SF.check_logits(logits, "model(validation inputs)")
                    features = self._val_capture[0].flatten(1)
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
                return SF.validation_gradient(model, inputs, targets, temperature=self.val_temperature)
        finally:
            for module, training in modes:
                module.training = training

    @property
    def _val_drawn(self) -> int:
        return self._val.drawn

    # [distributed] ------------------------------------------------------------------------------------------------
    def _synced(self) -> bool:
        """Whether the ranks share the validation gradient and decide on the global batch (saflex_data.distributed)."""
        return self.all_reduce and _dist.is_distributed()

    def _check_ranks(self) -> None:
        """Once, on the first call under torch.distributed: the same ValueError on every rank if settings differ."""
        if not self._ranks_checked and _dist.is_distributed():
            _dist.check_consistent(_dist.loss_settings(self), name=type(self).__name__)
            self._ranks_checked = True

    def _all_reduce(self, signal: Any) -> Any:
        """Average the validation gradient across ranks: one all-reduce of parameter-sized tensors per refresh."""
        if not self._synced():
            return signal
        if isinstance(signal, dict):
            return dict(zip(signal, _dist.all_reduce_mean(list(signal.values()))))
        reduced = iter(_dist.all_reduce_mean([t for t in signal if t is not None]))
        return tuple(None if t is None else next(reduced) for t in signal)
    # [/distributed] -----------------------------------------------------------------------------------------------

    def _precondition(self, signal: Any) -> Any:
        """Scale the validation gradient by Adam's inverse second-moment estimate (identity before its first step)."""
        optimizer = self.precondition
        if optimizer is None:
            return signal
        params = dict(self.model.named_parameters())
        if self.method == "last_layer":
            name = self.classifier_name
            keys = [f"{name}.weight" if name else "weight", f"{name}.bias" if name else "bias"]
            pairs = list(zip(keys, signal))
        else:
            pairs = list(signal.items())
        out = []
        for key, grad in pairs:
            p = params.get(key)
            out.append(grad if grad is None or p is None else grad * _adam_preconditioner(optimizer, p))
        return dict(zip(signal, out)) if isinstance(signal, dict) else tuple(out)

    # ------------------------------------------------------------------------------------------------------------
    # statistics, fallback, state
    # ------------------------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Clear the cumulative (per-op) statistics."""
        self._op_names: tuple[str, ...] | None = None
        self._totals: dict[str, Tensor] = {}
        self._last: dict[str, Tensor] = {}
        self.nonfinite_steps = 0

    @torch.no_grad()
    def _record(
        self, labels: Tensor, is_augmented: Tensor, op: Tensor | None, weights: Tensor, targets: Tensor, k: int
    ) -> None:
        aug = is_augmented
        upstream = labels if labels.dim() == 1 else labels.argmax(-1)
        relabeled = (targets.argmax(-1) != upstream) & aug
        kept = (weights > 0) & aug
        n_aug = aug.sum()
        denom = n_aug.clamp_min(1).float()
        self._last = {
            "augmented_fraction": n_aug.float() / len(aug),
            "kept_fraction": kept.sum().float() / denom,
            "relabeled_fraction": relabeled.sum().float() / denom,
            "weight_mean": (weights * aug).sum() / denom,
        }
        self.last_step = {"is_augmented": aug, "weights": weights, "targets": targets, "upstream": upstream}
        if op is not None:
            size = int(op.max()) + 1 if op.numel() else 0
            if size > 0:
                valid = aug & (op >= 0)
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
            f"method={self.method!r}, beta={self.beta}, tau={self.tau}, normalize={self.normalize!r}, "
            f"rule={self.rule!r}, val_every={self.val_every}, val_mode={self.val_mode!r}, "
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


def _soft(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    if labels.dim() == 2:
        return labels.to(dtype).clone()
    return F.one_hot(labels.long(), num_classes).to(dtype)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _batch_dependent(model: nn.Module) -> bool:
    """Whether a sample's output depends on the rest of the batch (BatchNorm using batch statistics)."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
        for m in model.modules()
    )


def _tree_mean(items: list[Any]) -> Any:
    if len(items) == 1:
        return items[0]
    first = items[0]
    if isinstance(first, dict):
        return {k: sum(it[k] for it in items) / len(items) for k in first}
    return tuple(None if first[i] is None else sum(it[i] for it in items) / len(items) for i in range(len(first)))


def _tree_lerp(new: Any, old: Any, decay: float) -> Any:
    if isinstance(new, dict):
        # A parameter unfrozen since the last refresh has no average yet: it starts from its fresh gradient.
        return {k: decay * old[k] + (1 - decay) * new[k] if k in old else new[k] for k in new}
    return tuple(n if n is None or o is None else decay * o + (1 - decay) * n for n, o in zip(new, old))


def _tree_finite(signal: Any) -> bool:
    tensors = list(signal.values()) if isinstance(signal, dict) else [t for t in signal if t is not None]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def _same_values(a: Tensor, b: Tensor) -> bool:
    """``torch.equal`` that also matches NaN with NaN (a non-finite step must fall back, not fail the check)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _adam_preconditioner(optimizer: torch.optim.Optimizer, p: Tensor) -> Tensor | float:
    state = optimizer.state.get(p, {})
    if "exp_avg_sq" not in state:
        return 1.0
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    beta2 = group.get("betas", (0.9, 0.999))[1]
    step = float(state.get("step", 1))
    v_hat = state["exp_avg_sq"] / (1 - beta2**step)
    return 1.0 / (v_hat.sqrt() + group.get("eps", 1e-8))
