"""Zero-padding: the conventional way to average LoRA adapters of different ranks.

Each client's factors are padded with zeros up to the largest rank ``R``, then averaged with the
client weights. A slot held by few clients is shrunk by their weight share (the dilution that
Byun & Lee, arXiv 2406.17477, show hurts high-rank clients).
"""

from __future__ import annotations

import torch

from ._linalg import weighted_padded_sum
from .base import ModuleInputs, Strategy
from .registry import register_strategy


@register_strategy
class ZeroPaddingStrategy(Strategy):
    """``A = sum_k p_k pad(A'_k)``, ``B = sum_k p_k pad(B'_k)`` at rank ``target_rank`` or ``max r_k``."""

    name = "zero_padding"
    paper = "Cho et al., Heterogeneous LoRA for Federated Fine-tuning (2024), as the zero-padding baseline"
    propagates_non_finite = True

    def aggregate_module(self, inputs: ModuleInputs) -> tuple[torch.Tensor, torch.Tensor]:
        rank = inputs.target_rank or inputs.max_rank
        return weighted_padded_sum(inputs.a, inputs.b, inputs.weights, rank)
