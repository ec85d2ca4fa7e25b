"""What timm's ``train.py`` needs from SAFLEX (examples/timm_train_py.patch): tagged mixing, start-up checks of the
arguments and of the held-out split, and the log line."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...batch import SaflexTarget
from ...loss import SaflexLoss


class TaggedMixup:
    """Tagged stand-in for timm's ``Mixup``, built from the same ``mixup_args`` (``--mixup``, ``--cutmix``, ...).

    ``input, target = mixup_fn(input, target)`` on the device, with the prefetcher on or off: the mixed rows come
    back tagged augmented with their mixed label distribution (:class:`saflex_data.mixing.MixUp` /
    :class:`saflex_data.mixing.CutMix`), so SAFLEX weighs and relabels them. ``mixup_enabled = False`` (what
    ``train.py`` sets at ``--mixup-off-epoch``) returns the batch unchanged.

    Differences from timm's ``Mixup``: partners are a random permutation (timm: the flipped batch); CutMix boxes are
    drawn per row and their ``lam`` is always the pasted area's (timm's ``correct_lam``); ``mode="elem"`` mixes each
    row with probability ``prob`` (timm: each row with its own ``lam``, the unmixed ones with ``lam = 1``, which is
    the same). ``label_smoothing`` is not applied here: give it to ``SaflexLoss(label_smoothing=...)``, which smooths
    every row's target, mixed or not, as timm's mixup targets are.

    Args:
        mixup_alpha: MixUp's ``Beta(alpha, alpha)``; ``0`` turns MixUp off.
        cutmix_alpha: CutMix's ``Beta(alpha, alpha)``; ``0`` turns CutMix off.
        cutmix_minmax: Not supported (raises unless ``None``).
        prob: Probability of mixing the batch (``mode="batch"``) or each row (``mode="elem"``).
        switch_prob: Probability of CutMix instead of MixUp when both are on (one choice per batch).
        mode: ``"batch"`` (one ``lam`` per batch for MixUp) or ``"elem"`` (per row); ``"pair"`` is not supported.
        correct_lam: Accepted for timm's arguments (CutMix's ``lam`` is always the corrected one).
        label_smoothing: Accepted for timm's arguments; see above.
        num_classes: Number of classes.
        generator: Optional ``torch.Generator`` for the draws (default: torch's global RNG, as timm's ``Mixup`` uses
            NumPy's).

    Raises:
        ValueError: For ``cutmix_minmax``, ``mode="pair"`` or another unknown mode, both alphas ``0``, or a bad
            probability.
    """

    def __init__(
        self,
        mixup_alpha: float = 1.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: Sequence[float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        correct_lam: bool = True,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
        generator: torch.Generator | None = None,
    ) -> None:
        from ...mixing import CutMix, MixUp

        if cutmix_minmax is not None:
            raise ValueError(
                f"cutmix_minmax={tuple(cutmix_minmax)} (--cutmix-minmax) is not supported by SAFLEX's tagged CutMix; "
                "use cutmix_alpha (--cutmix ALPHA) instead."
            )
        if mode not in ("batch", "elem"):
            raise ValueError(
                f"mode={mode!r} (--mixup-mode) is not supported by SAFLEX's tagged mixing; use 'batch' or 'elem'."
            )
        if not mixup_alpha > 0 and not cutmix_alpha > 0:
            raise ValueError(f"mixup_alpha or cutmix_alpha must be > 0, but got {mixup_alpha} and {cutmix_alpha}.")
        for name, value in (("prob", prob), ("switch_prob", switch_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], but got {value!r}.")
        self.prob, self.switch_prob, self.mode = float(prob), float(switch_prob), mode
        self.label_smoothing = label_smoothing
        self.generator = generator
        self.mixup_enabled = True
        row_p = self.prob if mode == "elem" else 1.0
        common = dict(p=row_p, num_classes=num_classes, generator=generator)
        self.mixup = MixUp(alpha=mixup_alpha, same_on_batch=mode == "batch", **common) if mixup_alpha > 0 else None
        self.cutmix = CutMix(alpha=cutmix_alpha, **common) if cutmix_alpha > 0 else None

    def __call__(self, inputs: Tensor, target: SaflexTarget | Tensor) -> tuple[Tensor, SaflexTarget | Tensor]:
        if not self.mixup_enabled:
            return inputs, target
        if self.mode == "batch" and self.prob < 1.0 and not self._coin(self.prob):
            return inputs, target
        op = self.mixup
        if self.cutmix is not None and (op is None or self._coin(self.switch_prob)):
            op = self.cutmix
        assert op is not None
        return op(inputs, target)

    def _coin(self, p: float) -> bool:
        return bool(torch.rand((), generator=self.generator) < p)

    def __repr__(self) -> str:
        return f"TaggedMixup(mixup={self.mixup!r}, cutmix={self.cutmix!r}, prob={self.prob}, mode={self.mode!r})"


def mixup_args_from(args: Any) -> dict[str, Any]:
    """``train.py``'s ``mixup_args`` from its parsed arguments (for :class:`TaggedMixup`)."""
    return dict(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
        num_classes=args.num_classes,
    )


def check_train_args(args: Any) -> None:
    """Raise at start-up for ``train.py`` options SAFLEX would otherwise drop or break mid-run.

    ``--jsd-loss`` (JSD consistency on the clean split: another loss than the weighted cross-entropy SAFLEX
    decides for) and ``--bce-loss`` (SAFLEX's decisions are derived for softmax cross-entropy) raise; so do the
    NaFlex loader and scheduled image sizes (``create_train_loader`` builds neither), distillation
    (``--kd-model-name``), a ``--saflex-aug-prob`` outside ``(0, 1]`` and mixing options that :class:`TaggedMixup`
    does not support. Options that are absent from ``args`` are skipped.

    Raises:
        ValueError: Naming the option and what to do instead.
    """
    def flag(name: str) -> Any:
        return getattr(args, name, None)

    if flag("jsd_loss"):
        raise ValueError(
            "--jsd-loss cannot be combined with SAFLEX: JsdCrossEntropy trains the clean split with a consistency "
            "term, and SAFLEX replaces the loss with its weighted, relabelled cross-entropy. Drop --jsd-loss (keep "
            "--aug-splits 2 for [clean; augmented] batches)."
        )
    if flag("bce_loss"):
        raise ValueError(
            "--bce-loss is not supported with SAFLEX: its weights and soft labels are decided for softmax "
            "cross-entropy, and BinaryCrossEntropy would train on them with another loss. Drop --bce-loss."
        )
    if flag("naflex_loader"):
        raise ValueError("--naflex-loader is not supported with SAFLEX (create_train_loader builds timm's standard "
                         "loader); drop it.")
    if flag("train_img_sizes") is not None:
        raise ValueError("--train-img-sizes (scheduled resolutions) is not supported with SAFLEX; drop it.")
    if flag("no_aug"):
        raise ValueError("--no-aug leaves SAFLEX nothing to weigh; drop it.")
    if flag("kd_model_name") is not None:
        raise ValueError(
            f"--kd-model-name {flag('kd_model_name')!r} (distillation) is not supported with SAFLEX: timm's "
            "distillation tasks mix the criterion's loss with a teacher loss, and SAFLEX's weights and soft labels are "
            "decided for the cross-entropy alone. Drop --kd-model-name (and the other --kd-* options)."
        )
    aug_prob = flag("saflex_aug_prob")
    if aug_prob is not None and not 0.0 < aug_prob <= 1.0:
        raise ValueError(f"--saflex-aug-prob must be in (0, 1], but got {aug_prob!r}.")
    if (flag("mixup") or 0) > 0 or (flag("cutmix") or 0) > 0 or flag("cutmix_minmax") is not None:
        TaggedMixup(**mixup_args_from(args))  # raises for the options it does not support


_LOGGED: weakref.WeakKeyDictionary[nn.Module, tuple[float, float, float]] = weakref.WeakKeyDictionary()


def log_line(criterion: SaflexLoss, output: Tensor | None = None, target: SaflexTarget | Tensor | None = None) -> str:
    """One log line: SAFLEX's kept and relabeled fractions of the augmented samples since the previous call.

    Counted over every step in between (from ``criterion.op_stats()``; the first call counts from the start), plus
    the last step's own fractions and mean weight. Call it where the training loop logs (``train.py``'s
    ``--log-interval``); under DDP the numbers are global and equal on every rank.

    With the batch's ``output`` and ``target`` it also reports the batch's plain cross-entropy
    (:func:`plain_cross_entropy`: the upstream labels, every weight 1, the loss's ``label_smoothing``), the number a
    run without SAFLEX logs as its loss: ``train.py``'s ``Loss:`` is SAFLEX's weighted loss, which is smaller.
    """
    stats = criterion.op_stats()
    count = sum(s["count"] for s in stats.values())
    kept = sum(s["kept"] * s["count"] for s in stats.values())
    relabeled = sum(s["relabeled"] * s["count"] for s in stats.values())
    before = _LOGGED.get(criterion, (0.0, 0.0, 0.0))
    if count < before[0]:  # reset_stats() in between
        before = (0.0, 0.0, 0.0)
    _LOGGED[criterion] = (count, kept, relabeled)
    n = round(count - before[0])
    last = criterion.stats
    if "kept_fraction" not in last:
        return f"SAFLEX: no augmented samples yet (step {int(last['step'])})"
    interval = (
        f"kept {(kept - before[1]) / n:.3f}, relabeled {(relabeled - before[2]) / n:.3f} of {n} augmented samples "
        "since the last log"
        if n > 0
        else "no augmented samples since the last log"
    )
    plain = ""
    if output is not None and target is not None:
        plain = f"; plain CE of the batch {plain_cross_entropy(criterion, output, target):.4g}"
    return (
        f"SAFLEX: {interval} (last step: kept {last['kept_fraction']:.3f}, relabeled "
        f"{last['relabeled_fraction']:.3f}, weight {last['weight_mean']:.3f}, augmented "
        f"{last['augmented_fraction']:.3f}; step {int(last['step'])}){plain}"
    )


@torch.no_grad()
def plain_cross_entropy(criterion: SaflexLoss, output: Tensor, target: SaflexTarget | Tensor) -> float:
    """The batch's cross-entropy without SAFLEX: upstream labels (mixed ones as mixed), every weight 1.

    What ``train.py`` would log as its loss without the patch (``SoftTargetCrossEntropy`` under mixing,
    ``LabelSmoothingCrossEntropy`` with ``--smoothing``), for comparing runs with and without SAFLEX. One host sync:
    call it at log time only.

    Raises:
        TypeError: If ``output`` is not a `(B, K)` tensor or ``target`` is neither a ``SaflexTarget`` nor a tensor.
        ValueError: If their batch sizes differ.
    """
    if not isinstance(output, Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise TypeError(f"output must be the (B, K) logits of the batch, but got {shape}.")
    labels = target.labels if isinstance(target, SaflexTarget) else target
    if not isinstance(labels, Tensor):
        raise TypeError(f"target must be a SaflexTarget or a label tensor, but got {type(target).__name__}.")
    if len(labels) != len(output):
        raise ValueError(f"target has {len(labels)} samples but output has {len(output)}; pass the same batch's.")
    labels = labels.to(output.device)
    labels = labels.float() if labels.dim() == 2 else labels.long()
    return float(F.cross_entropy(output.detach().float(), labels, label_smoothing=float(criterion.label_smoothing)))
