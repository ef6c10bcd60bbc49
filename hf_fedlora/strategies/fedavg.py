"""FedAvg (McMahan et al., AISTATS 2017, https://arxiv.org/abs/1602.05629) on LoRA factors.

The plain weighted average of A and of B; defined for clients of equal rank only.
"""

from __future__ import annotations

from .registry import register_strategy
from .zero_padding import ZeroPaddingStrategy


@register_strategy
class FedAvgStrategy(ZeroPaddingStrategy):
    """``A = sum_k p_k A'_k``, ``B = sum_k p_k B'_k`` (cut or padded to ``target_rank`` when given);
    heterogeneous ranks are refused. Incremental: running weighted sums, like zero-padding."""

    name = "fedavg"
    paper = "McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data (2017)"
    propagates_non_finite = True
    supports_heterogeneous_ranks = False
