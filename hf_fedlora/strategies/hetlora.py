"""HetLoRA's norm-weighted aggregation (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning
of On-Device Foundation Models", EMNLP 2024, https://arxiv.org/abs/2401.06432).

Zero-padding, with each client weighted by the size of its update so that clients that learned
more (larger ``||B_k A_k||_F``) count more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import update_norm
from ._linalg import PaddedSums
from .base import Strategy
from .registry import register_strategy


@dataclass
class _NormWeightedSums:
    sums: PaddedSums
    weighted: bool = False  # whether a client with a non-zero update has been folded in
    total: float = 0.0


@register_strategy
class HetLoraStrategy(Strategy):
    """Zero-padding with weights ``w_k`` proportional to ``p_k * ||B'_k A'_k||_F`` (per module).

    With uniform ``p_k`` this is HetLoRA's rule; with example counts it also honours data size.
    When every update is zero the weights fall back to ``p_k``. Incremental: each client's norm is
    known when it is folded in, so one running sum suffices (memory: the output); it holds the
    ``p_k``-weighted sum until the first client with a non-zero update, then restarts with
    ``p_k ||B'_k A'_k||_F`` weights.
    """

    name = "hetlora"
    paper = (
        "Cho et al., Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models (EMNLP 2024)"
    )
    propagates_non_finite = True

    def start(self, name: str, target_rank: int | None) -> _NormWeightedSums:
        return _NormWeightedSums(PaddedSums(target_rank))

    def fold_in(self, state: _NormWeightedSums, a: torch.Tensor, b: torch.Tensor, weight: float) -> None:
        scaled = weight * float(update_norm(a, b))
        if scaled > 0 and not state.weighted:  # the first non-zero update: norm weights from now on
            state.sums.clear()
            state.weighted, state.total = True, 0.0
        if state.weighted:
            weight = scaled
        if weight > 0:
            state.sums.add(a, b, weight)
        else:
            state.sums.reserve(a, b)  # counts for the output rank, adds nothing
        state.total += weight

    def finish(
        self,
        state: _NormWeightedSums,
        total_weight: float,
        previous: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return state.sums.scaled(state.total)
