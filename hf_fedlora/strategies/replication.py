"""Replication-based padding (Byun & Lee, NAACL 2025, https://arxiv.org/abs/2406.17477).

Instead of zeros, a low-rank client's missing rank slots are filled with the high-rank clients'
values for those slots. Solving "fill with the aggregate, then average everyone" for the aggregate
gives a closed form: each slot is the weighted mean over the clients that own it, so what
high-rank clients learned is not diluted by clients that never trained that slot.
"""

from __future__ import annotations

import torch

from ..linalg import pad_cols, pad_rows
from ._linalg import slot_owner_weights, slotwise_padded_sum
from .base import ModuleInputs, Strategy
from .registry import register_strategy


@register_strategy
class ReplicationStrategy(Strategy):
    """Slot i of the result is ``sum_{k: r_k > i} p_k a_{k,i} / sum_{k: r_k > i} p_k``.

    The output rank is ``target_rank`` if given, else the largest of the clients' ranks and the
    previous global rank. A slot that no client of this round owns keeps the previous global
    adapter's value (``previous=``), else zero.
    """

    name = "replication"
    paper = "Byun & Lee, Towards Federated Low-Rank Adaptation of Language Models with Rank Heterogeneity (NAACL 2025)"
    propagates_non_finite = True

    def aggregate_module(self, inputs: ModuleInputs) -> tuple[torch.Tensor, torch.Tensor]:
        previous_rank = inputs.previous[0].shape[0] if inputs.previous is not None else 0
        rank = inputs.target_rank or max(inputs.max_rank, previous_rank)
        owners = slot_owner_weights(inputs.ranks, inputs.weights, rank)  # [K, rank]
        total = owners.sum(dim=0)
        orphan = total == 0
        share = owners / torch.where(orphan, torch.ones_like(total), total)
        a, b = slotwise_padded_sum(inputs.a, inputs.b, share, rank)
        if inputs.previous is not None and orphan.any():
            prev_a, prev_b = pad_rows(inputs.previous[0], rank), pad_cols(inputs.previous[1], rank)
            a = torch.where(orphan[:, None], prev_a, a)
            b = torch.where(orphan[None, :], prev_b, b)
        return a, b
