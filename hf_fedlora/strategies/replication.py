"""Replication-based padding (Byun & Lee, NAACL 2025, https://arxiv.org/abs/2406.17477).

Instead of zeros, a low-rank client's missing rank slots are filled with the high-rank clients'
values for those slots. Solving "fill with the aggregate, then average everyone" for the aggregate
gives a closed form: each slot is the weighted mean over the clients that own it, so what
high-rank clients learned is not diluted by clients that never trained that slot.
"""

from __future__ import annotations

import torch

from ..linalg import pad_cols, pad_rows
from ._linalg import PaddedSums
from .padding import PaddedSumsStrategy
from .registry import register_strategy


@register_strategy
class ReplicationStrategy(PaddedSumsStrategy):
    """Slot i of the result is ``sum_{k: r_k > i} p_k a_{k,i} / sum_{k: r_k > i} p_k``.

    The output rank is ``target_rank`` if given, else the largest of the clients' ranks and the
    previous global rank. A slot that no client of this round owns keeps the previous global
    adapter's value (``previous=``), else zero. Incremental: running weighted sums and each slot's
    owner weight (memory: the output), divided slot by slot at the end.
    """

    name = "replication"
    paper = "Byun & Lee, Towards Federated Low-Rank Adaptation of Language Models with Rank Heterogeneity (NAACL 2025)"

    def finish(
        self,
        state: PaddedSums,
        total_weight: float,
        previous: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if state.target_rank is None and previous is not None and previous[0].shape[0] > state.rank:
            state.reserve(*previous)  # grow to the previous rank
        rank, total = state.rank, state.owner_weight.float()
        orphan = total == 0
        divisor = torch.where(orphan, torch.ones_like(total), total)
        a, b = state.a.div_(divisor[:, None]), state.b.div_(divisor[None, :])
        if previous is not None and orphan.any():
            prev_a, prev_b = pad_rows(previous[0], rank), pad_cols(previous[1], rank)
            a = torch.where(orphan[:, None], prev_a, a)
            b = torch.where(orphan[None, :], prev_b, b)
        return a, b
