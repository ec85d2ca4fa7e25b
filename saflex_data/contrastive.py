"""SAFLEX for contrastive image–text fine-tuning (CLIP-style losses, FLYP).

Ding et al., "SAFLEX: Self-Adaptive Augmentation via Feature Label Extrapolation", ICLR 2024
(https://arxiv.org/abs/2410.02512), applied to FLYP (Goyal et al., "Finetune like you pretrain: Improved finetuning
of zero-shot vision models", CVPR 2023, https://arxiv.org/abs/2212.00638); see ``docs/method.md#contrastive``.

A batch of ``B`` image–text pairs is a ``B``-way classification per image, ``L_ij = exp(s) <â_i, b̂_j>``. With
``u = J_L · (-g)`` (one forward-mode JVP of the whole logit matrix, through both towers and the logit scale, along
the negative gradient ``g`` of a zero-shot validation loss), the gain of training image ``i`` towards text ``j`` is::

    Π_ij = u_ij - Σ_k p_ik u_ik,        p_i = softmax(L_i)

SAFLEX gives each augmented image a soft label ``y_i`` over the ``B`` in-batch texts (bonus ``β`` on its own
caption) and a weight ``w_i = 1[y_iᵀ Π_i ≥ 0]``; the text→image term keeps its diagonal targets::

    loss = ½ [ (1/B) Σ_i w_i CE(L_i, y_i) + (1/B) Σ_j CE(L_:j, j) ]

(clean rows: ``w_i = 1``, ``y_i = e_i``). The validation loss is zero-shot classification: validation images against
the embeddings of all ``K`` class prompts, ``CE(exp(s) â_v B̂ᵀ, c_v)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._autodiff import forward_with_tangent, grad_inner_products, math_attention, validation_gradient
from ._describe import describe
from ._math import Rule, check_logits, check_temperature, inner_products_from_tangent
from ._passes import rng_preserved, unwrap_model, validation_pass
from ._removed import rejects_removed_arguments  # beta=, tau=, ... of 0.1: a TypeError naming the replacement
from ._report import StepReport
from ._stream import ValidationStream

__all__ = ["SaflexContrastiveLoss", "clip_logits", "clip_loss", "ContrastiveMethod"]

ContrastiveMethod = Literal["jvp", "single_pass"]
_METHODS = ("jvp", "single_pass")


# ---------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------
def clip_logits(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
    """CLIP's logit matrix ``exp(logit_scale) · â b̂ᵀ`` (cosine similarities times a learnable scale).

    Args:
        image_features: Image embeddings `(B, D)` (normalised here).
        text_features: Text embeddings `(T, D)` (normalised here).
        logit_scale: The log of the multiplier, as open_clip stores it (``log(1/0.07)`` at initialisation).

    Returns:
        Logits `(B, T)`.

    Example:
        >>> clip_logits(torch.eye(2), torch.eye(2), 0.0)
        tensor([[1., 0.],
                [0., 1.]])
    """
    scale = logit_scale.exp() if isinstance(logit_scale, Tensor) else math.exp(logit_scale)
    # b = images, t = texts, d = embedding dim
    return scale * torch.einsum("bd,td->bt", F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1))


def clip_loss(logits: Tensor, image_targets: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    """Symmetric CLIP loss ``½ (image→text + text→image)``, optionally with SAFLEX's rows for the image→text term.

    The image→text term is ``(1/B) Σ_i w_i CE(L_i, y_i)`` with the fixed normaliser ``B`` (docs/method.md); the
    text→image term is the plain diagonal CE. With ``image_targets=None`` and ``weights=None`` this is exactly
    open_clip's ``ClipLoss`` on one device.

    Args:
        logits: Square logit matrix `(B, B)`, image ``i`` against text ``j``.
        image_targets: Targets of the image→text term, probabilities `(B, B)`; ``None`` means the diagonal.
        weights: Row weights `(B,)` of the image→text term; ``None`` means all ones.

    Returns:
        The scalar loss.

    Example:
        >>> round(float(clip_loss(torch.zeros(4, 4))), 4)  # log 4
        1.3863
    """
    check_logits(logits)
    if logits.shape[0] != logits.shape[1]:
        raise ValueError(
            f"logits must be a square matrix (B, B) of images against texts, but got {tuple(logits.shape)}."
        )
    diagonal = torch.arange(logits.shape[0], device=logits.device)
    text_to_image = F.cross_entropy(logits.T, diagonal)
    if image_targets is None and weights is None:
        return (F.cross_entropy(logits, diagonal) + text_to_image) / 2
    rows = F.cross_entropy(logits, diagonal if image_targets is None else image_targets, reduction="none")
    if weights is not None:
        rows = rows * weights
    return (rows.sum() / logits.shape[0] + text_to_image) / 2


# ---------------------------------------------------------------------------------------------------------------
# The two towers as one module (so that functional_call / forward AD see every parameter at once)
# ---------------------------------------------------------------------------------------------------------------
class _Towers(nn.Module):
    """Both towers and the logit scale behind one ``forward``.

    ``forward(images)`` gives the zero-shot logits `(V, K)` against the class prompts, and ``forward((images,
    texts))`` the in-batch logit matrix `(B, B)`. A single-input forward lets the core's ``validation_gradient``,
    ``grad_inner_products`` and ``forward_with_tangent`` run on it unchanged.
    """

    def __init__(self, model: Any, class_prompts: Tensor, init_logit_scale: float) -> None:
        super().__init__()
        if isinstance(model, (tuple, list)):
            if len(model) != 2 or not all(isinstance(m, nn.Module) for m in model):
                got = [type(m).__name__ for m in model]
                raise TypeError(
                    "model given as a pair must be (image_encoder, text_encoder), two nn.Modules (their parameters "
                    f"are needed for the validation gradient and the JVP), but got {got}."
                )
            self.image_encoder, self.text_encoder = model
            self.model = None
        elif isinstance(model, nn.Module) and callable(getattr(model, "encode_image", None)) and callable(
            getattr(model, "encode_text", None)
        ):
            self.model = model
        else:
            raise TypeError(
                "model must be an nn.Module with encode_image/encode_text (open_clip's interface) or a pair "
                f"(image_encoder, text_encoder) of nn.Modules, but got {type(model).__name__}."
            )
        scale = getattr(self.model, "logit_scale", None)
        if isinstance(scale, Tensor):
            self.owns_logit_scale = False
        else:
            # Same dtype and device as the towers (a float32 scale would cap a float64 model's precision).
            like = next((p for p in self.parameters() if p.is_floating_point()), None)
            kwargs = {"dtype": like.dtype, "device": like.device} if like is not None else {}
            self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale), **kwargs))
            self.owns_logit_scale = True
        self.register_buffer("class_prompts", class_prompts, persistent=False)

    def log_scale(self) -> Tensor:
        return self.logit_scale if self.owns_logit_scale else self.model.logit_scale

    def encode_image(self, images: Tensor) -> Tensor:
        return self.image_encoder(images) if self.model is None else self.model.encode_image(images)

    def encode_text(self, texts: Tensor) -> Tensor:
        return self.text_encoder(texts) if self.model is None else self.model.encode_text(texts)

    def forward(self, inputs: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        images, texts = inputs if isinstance(inputs, tuple) else (inputs, self.class_prompts)
        image_features = self.encode_image(images)
        text_features = self.encode_text(texts)
        if image_features.dim() != 2 or text_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
            raise ValueError(
                "the image and text encoders must return embeddings (N, D) of the same dimension D, but got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}."
            )
        return clip_logits(image_features, text_features, self.log_scale())


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------
class SaflexContrastiveLoss(StepReport, nn.Module):
    """Symmetric CLIP loss (FLYP) with SAFLEX weights and soft labels for the augmented images.

    The loss runs the towers itself, because it needs the JVP of the whole logit matrix: call it as
    ``loss = criterion(images, texts, is_augmented)`` and ``loss.backward()``. Every ``val_every`` steps it draws a
    validation batch ``(images, labels)`` and computes the gradient ``g`` of the zero-shot loss (validation images
    against all class prompts); each step it computes ``Π`` for the augmented images from one JVP along ``-g`` and
    solves for their weights and soft labels over the ``B`` in-batch texts (docs/method.md). Clean images keep their own
    caption with weight 1; the text→image term keeps the diagonal.

    The training passes run in the model's current mode; ``.grad`` and BatchNorm buffers are only touched by the
    training forward itself. Texts that repeat in a batch (FLYP with class-name prompts and two images of one class)
    give identical columns: that is FLYP's loss, and SAFLEX then simply sees two equally good captions.

    Args:
        model: An ``nn.Module`` with ``encode_image``/``encode_text`` (open_clip's ``CLIP``; its ``logit_scale``, the
            log of the multiplier, is used and trained), or a pair ``(image_encoder, text_encoder)`` of modules that
            return embeddings `(N, D)`; then the loss owns a learnable ``logit_scale`` (add ``criterion.parameters()``
            to the optimizer; it takes the towers' dtype and device). A ``DistributedDataParallel``/``torch.compile``
            wrapper is unwrapped. Held as a plain reference, not a submodule. A ``logit_bias`` (SigLIP) is not used:
            this is the softmax CLIP loss.
        val_loader: Any iterable of ``(images, labels)`` validation batches, cycled forever; labels are class indices
            into ``class_prompts``. Batches are moved to the model's device.
        class_prompts: Text-encoder inputs of the ``K`` class prompts, e.g. ``tokenizer([f"a photo of a {c}." for c
            in classes])`` of shape `(K, context_length)`.
        method: ``"jvp"``: a separate forward-mode pass (dual parameters, ``torch.autograd.forward_ad``) over the
            augmented images and all texts, then the normal forward; ``"single_pass"``: the training forward itself
            runs with dual parameters and gives the logits and their tangent together (dropout masks and BatchNorm
            statistics are then those of the step, so ``Π`` is exact for a train-mode BatchNorm tower too; ``"jvp"``
            normalises the augmented images with their own batch statistics there).
        rule: The decision rule over the in-batch texts: a :class:`saflex_data.functional.Rule` or its name.
            Default ``"margin"``: drop an augmented image whose own caption trails the best in-batch caption by more
            than ``beta`` batch standard deviations of ``Π``, never relabel. Not ``SaflexLoss``'s default
            (``"gated_prior"``): the gated rules were built and measured for classification only, and are refused
            here. In ``examples/contrastive_flyp.py`` (3 seeds, ``docs/contrastive.md``) margin was above plain
            augmentation on 2 of 3 seeds, the paper's rule (``Rule("paper", beta=0.5)``, the default before 0.2.0)
            on 1 of 3.
        val_every: Recompute ``g`` every ``val_every`` steps (reuse it in between).
        val_temperature: ``T`` of the tempered zero-shot validation loss ``T · CE(L / T, y)`` (see
            ``SaflexLoss``; not in the paper). The default 1 is the paper's loss: unlike for ``SaflexLoss``, a larger
            ``T`` was not measured for the contrastive loss.
        enabled: ``False`` gives the plain symmetric CLIP loss exactly (a switch for the train loop).
        val_keys: ``(input_key, target_key)`` of dict validation batches; ``None`` tries common names.
        prepare: Optional callable applied to validation images after the device move (normalisation, dtype).
        init_logit_scale: Initial ``logit_scale`` when the loss owns it (CLIP's ``log(1/0.07)``).
        seed: Seed of the Gumbel noise generator (part of ``state_dict``).

    Example:
        >>> image_encoder, text_encoder = nn.Linear(4, 3), nn.Embedding(5, 3)
        >>> val = [(torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 0]))]
        >>> criterion = SaflexContrastiveLoss((image_encoder, text_encoder), val, torch.arange(5))
        >>> loss = criterion(torch.randn(4, 4), torch.tensor([0, 1, 2, 3]), torch.tensor([False, True, True, False]))
        >>> loss.backward()
        >>> criterion.stats["augmented_fraction"]
        0.5
    """

    towers: _Towers
    _state_signal = ("val_grad", "val_grad")  # state_dict key and attribute of the cached validation gradient

    @rejects_removed_arguments()
    def __init__(
        self,
        model: nn.Module | tuple[nn.Module, nn.Module],
        val_loader: Iterable[Any],
        class_prompts: Tensor,
        *,
        method: ContrastiveMethod = "jvp",
        rule: Rule | str = "margin",
        val_every: int = 1,
        val_temperature: float = 1.0,
        val_keys: tuple[str, str] | None = None,
        prepare: Callable[[Tensor], Tensor] | None = None,
        init_logit_scale: float = math.log(1 / 0.07),
        seed: int = 0,
        enabled: bool = True,
    ) -> None:
        if Rule.of(rule).stateful:  # [gated rules] classification only
            raise ValueError(f"rule must be a stateless rule for SaflexContrastiveLoss (the gated rules were measured "
                             f"for classification only), but got {Rule.of(rule).name!r}.")
        super().__init__()
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, but got {method!r}.")
        if val_loader is None or not isinstance(val_loader, Iterable):
            raise TypeError(
                f"val_loader must be an iterable of (images, labels) batches, but got {type(val_loader).__name__}."
            )
        if not isinstance(val_every, int) or isinstance(val_every, bool) or val_every < 1:
            raise ValueError(f"val_every must be an int >= 1, but got {val_every!r}.")
        check_temperature(val_temperature, "val_temperature")
        if prepare is not None and not callable(prepare):
            raise TypeError(f"prepare must be a callable or None, but got {type(prepare).__name__}.")
        if not isinstance(class_prompts, Tensor) or class_prompts.dim() < 1 or class_prompts.shape[0] < 2:
            got = tuple(class_prompts.shape) if isinstance(class_prompts, Tensor) else type(class_prompts).__name__
            raise ValueError(
                "class_prompts must be a tensor of text-encoder inputs with one row per class (at least 2), e.g. "
                f"tokenizer(prompts) of shape (K, context_length), but got {got}."
            )
        if isinstance(model, nn.Module):
            model = unwrap_model(model)
        # A plain attribute (not a submodule): the model's parameters must not appear in this loss's state_dict.
        self.__dict__["towers"] = _Towers(model, class_prompts, init_logit_scale)
        if self.towers.owns_logit_scale:
            self.logit_scale = self.towers.logit_scale  # the same Parameter: criterion.parameters() yields it
        self.val_loader = val_loader
        self.method = method
        self.rule = Rule.of(rule)
        self.val_every = val_every
        self.val_temperature = float(val_temperature)
        self.enabled = enabled
        self.prepare = prepare
        self.seed = seed

        self.step = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._val = ValidationStream(val_loader, type(self).__name__, keys=val_keys)
        self.val_grad: dict[str, Tensor] | None = None
        self.nonfinite_steps = 0
        self._warned_nonfinite = False
        self._fallback_keeps = "the own captions"
        self._last: dict[str, Tensor] = {}
        self.last_step: dict[str, Tensor] = {}

    # -- validation ----------------------------------------------------------------------------------------------
    def _next_val_batch(self) -> tuple[Tensor, Tensor]:
        images, labels = self._val.next(self.towers.log_scale().device, self.prepare)
        num_classes = self.towers.class_prompts.shape[0]
        if labels.dim() != 1 or labels.is_floating_point() or (labels.numel() and int(labels.max()) >= num_classes):
            raise ValueError(
                f"validation labels must be class indices (V,) into the {num_classes} class_prompts, but got "
                f"{describe(labels)}{f' with maximum {int(labels.max())}' if labels.dim() == 1 else ''}."
            )
        return images, labels

    def refresh_validation_gradient(self) -> dict[str, Tensor]:
        """Draw the next validation batch and recompute ``g``, the gradient of the zero-shot validation loss.

        Returns:
            ``{parameter name: gradient}`` over the trainable parameters of both towers and the logit scale (names
            as in ``criterion.towers.named_parameters()``). Never touches ``.grad``, buffers or the mode.
        """
        images, labels = self._next_val_batch()
        towers = self.towers
        towers.class_prompts = towers.class_prompts.to(images.device)
        with validation_pass(towers, images.device), self._val.model_call(images):
            self.val_grad = validation_gradient(towers, images, labels, temperature=self.val_temperature)
        return self.val_grad

    def _validation_signal(self) -> dict[str, Tensor]:
        if self.val_grad is None or self.step % self.val_every == 0:
            self.refresh_validation_gradient()
        assert self.val_grad is not None
        return self.val_grad

    def _signal_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.towers.named_parameters() if p.requires_grad}

    def inner_products(self, images: Tensor, texts: Tensor) -> Tensor:
        """``Π`` `(B, B)` of every image against every in-batch text, for the current validation gradient.

        ``Π_ij = <∇θ ℓ_ij, g>`` with ``ℓ_ij = -log softmax(L_i)_j`` (one JVP of the logit matrix); ``g`` is
        computed first if there is none yet. Diagnostics and tests; the training step calls the same code.
        """
        if self.val_grad is None:
            self.refresh_validation_gradient()
        assert self.val_grad is not None
        with math_attention():
            return grad_inner_products(self.towers, (images, texts), self.val_grad, method="jvp")

    # -- the step ------------------------------------------------------------------------------------------------
    def forward(self, images: Tensor, texts: Tensor, is_augmented: Tensor | None = None) -> Tensor:
        """The loss of a batch of ``B`` image–text pairs.

        Args:
            images: Image-encoder inputs `(B, ...)`, the augmented ones as the upstream augmentation made them.
            texts: Text-encoder inputs `(B, ...)` (e.g. the class prompt of each image).
            is_augmented: Bool `(B,)`; ``True`` rows get SAFLEX's weight and soft label. ``None``: all clean.

        Returns:
            The scalar loss ``½ (image→text + text→image)``.
        """
        if not isinstance(images, Tensor) or not isinstance(texts, Tensor) or images.shape[0] != texts.shape[0]:
            raise ValueError(
                "images and texts must be tensors with the same batch size B (pair i is images[i], texts[i]), but got "
                f"{describe(images)} and {describe(texts)}."
            )
        batch_size = images.shape[0]
        if is_augmented is not None and (
            not isinstance(is_augmented, Tensor)
            or is_augmented.dtype != torch.bool
            or tuple(is_augmented.shape) != (batch_size,)
        ):
            raise ValueError(
                f"is_augmented must be a bool tensor of shape ({batch_size},), but got {describe(is_augmented)}."
            )
        if (
            not self.enabled
            or not torch.is_grad_enabled()
            or not any(m.training for m in self.towers.children())  # model.eval(): plain CLIP loss
            or is_augmented is None
            or not bool(is_augmented.any())
        ):
            return clip_loss(self.towers((images, texts)))

        augmented = is_augmented.to(images.device).nonzero().squeeze(1)
        signal = self._validation_signal()
        if self.method == "single_pass":
            with math_attention():
                logits, tangent = forward_with_tangent(self.towers, (images, texts), signal)
            with torch.autocast(device_type=logits.device.type, enabled=False):
                pi = inner_products_from_tangent(logits[augmented], tangent[augmented])
        else:
            # Row i of L depends on image i and every text, so the tangent pass needs only the augmented images.
            # Its own random state (dropout draws its own masks here), so the training forward's is left as it was.
            with torch.autocast(device_type=images.device.type, enabled=False), math_attention(), \
                    rng_preserved(images.device):
                pi = grad_inner_products(self.towers, (images[augmented], texts), signal, method="jvp")
            logits = self.towers((images, texts))

        dtype = torch.promote_types(logits.dtype, torch.float32)
        targets = torch.eye(batch_size, dtype=dtype, device=logits.device)
        weights = torch.ones(batch_size, dtype=dtype, device=logits.device)
        if bool(torch.isfinite(pi).all()):
            aug_weights, aug_labels = self.rule(pi, augmented, generator=self._generator)
            weights[augmented] = aug_weights.to(device=logits.device, dtype=dtype)
            targets[augmented] = aug_labels.to(device=logits.device, dtype=dtype)
        else:
            self._nonfinite_fallback()
        self._record(is_augmented.to(logits.device), weights, targets, texts)
        self.step += 1
        return clip_loss(logits.to(dtype), targets, weights)

    # -- statistics and state ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _record(self, is_augmented: Tensor, weights: Tensor, targets: Tensor, texts: Tensor) -> None:
        # Relabeled = the chosen text differs from the own one (a repeated prompt in another column is no relabel).
        flat = texts.reshape(len(texts), -1).to(targets.device)
        relabeled = (flat[targets.argmax(-1)] != flat).any(-1) & is_augmented
        kept = (weights > 0) & is_augmented
        denom = is_augmented.sum().clamp_min(1).float()
        self._last = {
            "augmented_fraction": is_augmented.sum().float() / len(is_augmented),
            "kept_fraction": kept.sum().float() / denom,
            "relabeled_fraction": relabeled.sum().float() / denom,
            "weight_mean": (weights * is_augmented).sum() / denom,
        }
        self.last_step = {"is_augmented": is_augmented, "weights": weights, "targets": targets}

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, rule={self.rule}, val_every={self.val_every}, "
            f"val_temperature={self.val_temperature}, enabled={self.enabled}, "
            f"num_classes={self.towers.class_prompts.shape[0]}"
        )

