"""FedAvg (McMahan et al., AISTATS 2017, https://arxiv.org/abs/1602.05629) on LoRA factors.

The plain weighted average of A and of B; defined for clients of equal rank only.
"""

from __future__ import annotations

import torch

from ._linalg import weighted_padded_sum
from .base import ModuleInputs, Strategy
from .registry import register_strategy


@register_strategy
class FedAvgStrategy(Strategy):
    """``A = sum_k p_k A'_k``, ``B = sum_k p_k B'_k`` (cut or padded to ``target_rank`` when given);
    heterogeneous ranks are refused."""

    name = "fedavg"
    paper = "McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data (2017)"
    propagates_non_finite = True
    supports_heterogeneous_ranks = False

    def aggregate_module(self, inputs: ModuleInputs) -> tuple[torch.Tensor, torch.Tensor]:
        return weighted_padded_sum(inputs.a, inputs.b, inputs.weights, inputs.target_rank or inputs.max_rank)
