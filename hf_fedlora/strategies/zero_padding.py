"""Zero-padding: the conventional way to average LoRA adapters of different ranks.

Each client's factors are padded with zeros up to the largest rank ``R``, then averaged with the
client weights. A slot held by few clients is shrunk by their weight share (the dilution that
Byun & Lee, arXiv 2406.17477, show hurts high-rank clients).
"""

from __future__ import annotations

import torch

from ._linalg import PaddedSums
from .padding import PaddedSumsStrategy
from .registry import register_strategy


@register_strategy
class ZeroPaddingStrategy(PaddedSumsStrategy):
    """``A = sum_k p_k pad(A'_k)``, ``B = sum_k p_k pad(B'_k)`` at rank ``target_rank`` or ``max r_k``.

    Incremental: running weighted sums (memory: the output), normalised by the total weight at the end
    (kept relative to the largest weight, so huge weights cannot overflow them).
    """

    name = "zero_padding"
    paper = "Cho et al., Heterogeneous LoRA for Federated Fine-tuning (2024), as the zero-padding baseline"

    def finish(
        self, state: PaddedSums, total_weight: float, previous=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return state.normalised()
