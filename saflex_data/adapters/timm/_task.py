"""``SaflexTask``: timm's ``ClassificationTask`` with a ``SaflexLoss`` criterion (timm >= 1.0.23)."""

from __future__ import annotations

import warnings
from typing import Any

import timm
import torch
from torch import Tensor, nn

from ...batch import SaflexTarget
from ...loss import SaflexLoss, unwrap_model
from ._prepare import ValPrepare


def has_task_api() -> bool:
    """Whether the installed timm has ``timm.task.ClassificationTask`` (timm >= 1.0.23)."""
    try:
        from timm.task import ClassificationTask  # noqa: F401
    except ImportError:
        return False
    return True


_TAGS_HINT = (
    "build the training loader with saflex_data.adapters.timm.create_train_loader (its targets are SaflexTarget), "
    "or use timm's --aug-splits 2 layout with SaflexLoss(num_splits=2)"
)

if has_task_api():
    from timm.task import ClassificationTask as _TaskBase
else:  # pragma: no cover - exercised only with timm < 1.0.23
    _TaskBase = nn.Module


class SaflexTask(_TaskBase):  # type: ignore[misc, valid-type]
    """timm ``ClassificationTask`` whose criterion is a :class:`saflex_data.SaflexLoss` (timm >= 1.0.23).

    ``result = task(input, target)`` returns ``{'loss', 'output'}`` plus detached SAFLEX statistics of the step
    (``saflex_weight_mean``, ``saflex_kept_fraction``, ``saflex_relabeled_fraction``: tensors, no host sync).
    ``task.compile()`` compiles the model; the loss keeps the raw module (its hooks are traced into the compiled
    graph without graph breaks) and runs its validation pass eagerly. ``prepare_distributed`` wraps the model in
    DDP as usual; the loss's extra passes use the raw module.

    Args:
        model: The timm model.
        val_loader: The validation stream (:func:`create_val_loader`). Ignored when ``criterion`` is given.
        criterion: A ready ``SaflexLoss`` (built on the same model), instead of ``val_loader``/``saflex_kwargs``.
        saflex_kwargs: Keyword arguments of ``SaflexLoss`` (``method``, ``beta``, ``tau``, ``num_splits``,
            ``label_smoothing``, ...). ``prepare`` defaults to ``ValPrepare.from_model(model)``.
        device: Device for task tensors (as in timm).
        dtype: Dtype for task tensors (as in timm).
        verbose: Log the criterion (as in timm).
    """

    def __init__(
        self,
        model: nn.Module,
        val_loader: Any = None,
        *,
        criterion: SaflexLoss | None = None,
        saflex_kwargs: dict[str, Any] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
    ) -> None:
        if not has_task_api():
            raise ImportError(
                f"SaflexTask needs timm >= 1.0.23 (timm.task); timm {timm.__version__} is installed. With older timm "
                "swap the criterion instead: train_loss_fn = SaflexLoss(model, val_loader, ...)."
            )
        if criterion is None:
            if val_loader is None:
                raise ValueError("SaflexTask needs val_loader (a create_val_loader stream) or criterion=SaflexLoss.")
            kwargs = dict(saflex_kwargs or {})
            kwargs.setdefault("prepare", ValPrepare.from_model(model))
            criterion = SaflexLoss(model, val_loader, **kwargs)
        elif not isinstance(criterion, SaflexLoss):
            raise TypeError(f"criterion must be a SaflexLoss, but got {type(criterion).__name__}.")
        elif saflex_kwargs:
            raise ValueError("pass either criterion or saflex_kwargs, not both.")
        if criterion.model is not unwrap_model(model):
            raise ValueError("criterion was built on a different model than the one given to SaflexTask.")
        super().__init__(model, criterion=criterion, device=device, dtype=dtype, verbose=verbose)

    def forward(self, input: Tensor, target: SaflexTarget | Tensor) -> dict[str, Tensor]:  # noqa: A002
        criterion: SaflexLoss = self.criterion
        if not isinstance(target, SaflexTarget) and criterion.num_splits is None:
            shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise TypeError(f"target has no augmentation tags (got {shape}): {_TAGS_HINT}.")
        prepare = criterion.prepare
        if isinstance(prepare, ValPrepare) and prepare._train_stats is None:
            prepare.observe_train(input)
        if criterion.method == "single_pass":
            output = criterion.forward_train(input, model=self.trainable_module)
        else:
            output = self.trainable_module(input)
        loss = criterion(output, target)
        result = {"loss": loss, "output": output}
        result.update(step_stats(criterion))
        return result

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        """``{'saflex_loss': criterion.state_dict()}``: timm's ``CheckpointSaver(task=task)`` saves it as
        ``task_state`` (step counter, cached validation signal, noise generator, validation-stream position)."""
        if ema:
            return {}
        return {"saflex_loss": self.criterion.state_dict()}

    def load_task_state(
        self,
        state: dict[str, Any] | None,
        strict: bool = True,
        module: nn.Module | None = None,
        ema: bool = False,
    ) -> None:
        """Restores the loss from a checkpoint's ``task_state`` (what timm's ``resume_task_checkpoint`` calls).

        A checkpoint without it (saved by a run without SAFLEX, or by timm < 1.0.23) warns and leaves the loss
        fresh: its step counter and validation signal start over.
        """
        if ema:
            return
        saved = (state or {}).get("saflex_loss")
        if saved is None:
            warnings.warn(
                "the checkpoint has no SAFLEX state (task_state['saflex_loss']): it was saved without SaflexTask; "
                "the loss starts over (step 0, a fresh validation signal).",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self.criterion.load_state_dict(saved, strict=strict)


@torch.no_grad()
def step_stats(criterion: SaflexLoss) -> dict[str, Tensor]:
    """The last step's SAFLEX statistics as detached tensors (no host sync; ``{}`` before the first step)."""
    last = criterion.last_step
    if not last:
        return {}
    aug = last["is_augmented"]
    weights = last["weights"]
    n = aug.sum().clamp_min(1).float()
    relabeled = (last["targets"].argmax(-1) != last["upstream"]) & aug
    return {
        "saflex_weight_mean": (weights * aug).sum() / n,
        "saflex_kept_fraction": ((weights > 0) & aug).sum().float() / n,
        "saflex_relabeled_fraction": relabeled.sum().float() / n,
    }
