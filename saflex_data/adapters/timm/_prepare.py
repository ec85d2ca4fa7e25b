"""``ValPrepare``: makes validation inputs look like the training inputs (device-side normalisation, dtype,
``channels_last``) and checks the first batch."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...loss import unwrap_model


class ValPrepare:
    """``prepare=`` for ``SaflexLoss``: makes validation inputs look like the training inputs, and checks them.

    Applied after the device move: optional on-device normalisation (for pipelines that normalise after a GPU
    augmentation, e.g. kornia), dtype, then ``channels_last``. The first batch is checked: uint8 inputs (un-normalised
    ``fast_collate`` output without a prefetcher) raise, and inputs whose statistics are far from the training
    batch's (see :meth:`observe_train`; e.g. ``[0, 1]`` or ``0..255`` images against normalised ones) warn.

    Args:
        channels_last: Convert 4-D inputs to ``torch.channels_last`` (do it when the model is channels_last).
        dtype: Cast the inputs to this dtype (``None`` keeps them; ``SaflexLoss`` runs the validation pass in fp32).
        mean: With ``std``: normalise on the device as ``(x - mean) / std`` (per channel, in the input's units).
        std: See ``mean``.
        check: Run the checks on the first validation batch.
    """

    def __init__(
        self,
        *,
        channels_last: bool = False,
        dtype: torch.dtype | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        check: bool = True,
    ) -> None:
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together (or neither).")
        self.channels_last = channels_last
        self.dtype = dtype
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.check = check
        self._checked = False
        self._train_stats: tuple[float, float] | None = None

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: Any) -> ValPrepare:
        """A ``ValPrepare`` whose ``channels_last`` follows the model's memory format (``torch.compile`` and DDP
        wrappers are looked through)."""
        if "channels_last" not in kwargs:
            kwargs["channels_last"] = is_channels_last(model)
        return cls(**kwargs)

    def observe_train(self, inputs: Tensor) -> None:
        """Record the statistics of a training batch for the mismatch check (``SaflexTask`` calls this once)."""
        if self._train_stats is None and inputs.is_floating_point() and inputs.numel():
            with torch.no_grad():
                x = inputs.detach().float()
                self._train_stats = (float(x.mean()), float(x.std()))

    def __call__(self, inputs: Tensor) -> Tensor:
        if inputs.dtype == torch.uint8:
            raise TypeError(
                "validation inputs are uint8 (0..255, not normalised): the validation loader uses fast_collate "
                "without timm's prefetcher. Build it with create_val_loader(..., train_loader=loader_train) so it "
                "normalises like the training loader, or pass use_prefetcher=True."
            )
        if self.mean is not None:
            std = self.std.to(inputs.device)  # type: ignore[union-attr]
            inputs = (inputs.float() - self.mean.to(inputs.device)) / std
        if self.dtype is not None:
            inputs = inputs.to(self.dtype)
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if self.check and not self._checked:
            self._checked = True
            self._check(inputs)
        return inputs

    def _check(self, inputs: Tensor) -> None:
        x = inputs.detach().float()
        mean, std = float(x.mean()), float(x.std())
        reference = self._train_stats
        if reference is not None:
            ratio = std / max(reference[1], 1e-6)
            if not 0.33 < ratio < 3.0 or abs(mean - reference[0]) > 1.5 * max(reference[1], 1e-6):
                warnings.warn(
                    f"validation inputs (mean {mean:.3g}, std {std:.3g}) do not look normalised like the training "
                    f"inputs (mean {reference[0]:.3g}, std {reference[1]:.3g}); build the validation stream with "
                    "create_val_loader(..., train_loader=loader_train) or give ValPrepare(mean=, std=).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        elif float(x.min()) >= 0.0 and (float(x.max()) <= 1.0 or float(x.max()) > 10.0):
            warnings.warn(
                f"validation inputs are all in [{float(x.min()):.3g}, {float(x.max()):.3g}]: they look un-normalised "
                "(timm models expect mean/std normalised inputs); check the validation loader's mean/std or give "
                "ValPrepare(mean=, std=).",
                RuntimeWarning,
                stacklevel=2,
            )


def is_channels_last(model: nn.Module) -> bool:
    """Whether the model's first 4-D parameter (a conv weight) is stored channels_last."""
    for p in unwrap_model(model).parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False
