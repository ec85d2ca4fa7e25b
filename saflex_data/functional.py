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

This module is the public surface: the pure maths (:mod:`saflex_data._math`) and the autodiff on live modules
(:mod:`saflex_data._autodiff`: forward-mode AD on dual parameters, ``torch.autograd.forward_ad``) under one name,
``import saflex_data.functional as SF``.
"""

from __future__ import annotations

from ._autodiff import (
    BatchStatsCapture,
    Method,
    find_classifier,
    forward_with_tangent,
    grad_inner_products,
    validation_gradient,
)
from ._math import (
    Normalize,
    Rule,
    RuleName,
    adaptive_keep,
    check_logits,
    check_targets,
    check_temperature,
    default_beta,
    inner_products_from_tangent,
    last_layer_inner_products,
    last_layer_logit_tangents,
    last_layer_validation_gradient,
    normalize_inner_products,
    own_label_gain,
    saflex_targets,
    standardize_inner_products,
    validation_residual,
    weight_scores,
)

__all__ = [
    "check_targets",
    "check_logits",
    "check_temperature",
    "normalize_inner_products",
    "validation_gradient",
    "validation_residual",
    "last_layer_validation_gradient",
    "grad_inner_products",
    "inner_products_from_tangent",
    "last_layer_inner_products",
    "last_layer_logit_tangents",
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
