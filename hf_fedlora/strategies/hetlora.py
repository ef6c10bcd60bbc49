"""HetLoRA's norm-weighted aggregation (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning
of On-Device Foundation Models", EMNLP 2024, https://arxiv.org/abs/2401.06432).

Zero-padding, with each client weighted by the size of its update so that clients that learned
more (larger ``||B_k A_k||_F``) count more.
"""

from __future__ import annotations

import torch

from ..linalg import update_norm
from ._linalg import weighted_padded_sum
from .base import ModuleInputs, Strategy
from .registry import register_strategy


@register_strategy
class HetLoraStrategy(Strategy):
    """Zero-padding with weights ``w_k`` proportional to ``p_k * ||B'_k A'_k||_F`` (per module).

    With uniform ``p_k`` this is HetLoRA's rule; with example counts it also honours data size.
    When every update is zero the weights fall back to ``p_k``.
    """

    name = "hetlora"
    paper = (
        "Cho et al., Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models (EMNLP 2024)"
    )
    propagates_non_finite = True

    def aggregate_module(self, inputs: ModuleInputs) -> tuple[torch.Tensor, torch.Tensor]:
        norms = torch.stack([update_norm(a, b) for a, b in zip(inputs.a, inputs.b)])
        weights = inputs.weights * norms
        weights = weights / weights.sum() if weights.sum() > 0 else inputs.weights
        return weighted_padded_sum(inputs.a, inputs.b, weights, inputs.target_rank or inputs.max_rank)
