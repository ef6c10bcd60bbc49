"""Rank-partition aggregation, after raFLoRA (arXiv 2602.13486): flexlora's SVD of the summed
update, with each rank partition averaged over the clients that own it.

The clients' ranks cut the rank slots into partitions (ranks 5 and 20: slots ``[0, 5)`` and
``[5, 20)``). Partition ``P = [lo, hi)`` is owned by the clients with ``r_k >= hi``; its product
``B'_k[:, P] A'_k[P]`` is averaged over those owners with their weights renormalised among them,
the partitions' averages are summed, and the sum is truncated to the target rank by SVD (factored:
the stacked rank is ``sum_k r_k``, never the dense ``out x in`` matrix). It is to flexlora what
replication is to zero-padding: flexlora weighs partition ``P`` by ``sum_{owners} p_k`` < 1, so
what only the high-rank clients learned is diluted; here every partition keeps full weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..linalg import factored_svd
from .base import ModuleInputs, Strategy
from .registry import register_strategy


def partition_weights(ranks: Sequence[int], weights: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """``(lo, hi, q)`` per rank partition: ``q[k] = p_k / sum_{j: r_j >= hi} p_j`` for the owners
    (``r_k >= hi``), 0 for the others (float64)."""
    w = weights.double()
    owned = torch.tensor(list(ranks))
    out, lo = [], 0
    for hi in sorted(set(ranks)):
        mask = (owned >= hi).double()
        out.append((lo, hi, w * mask / (w * mask).sum()))
        lo = hi
    return out


@register_strategy
class RaFloraStrategy(Strategy):
    """Best rank-R approximation of ``sum_P sum_{k: r_k >= hi_P} q_{P,k} B'_k[:, P] A'_k[P]``, with
    ``q_{P,k} = p_k / sum_{j: r_j >= hi_P} p_j`` and R = ``target_rank`` or ``max r_k``.

    Equal ranks: exactly flexlora. Incremental: the default
    :class:`~hf_fedlora.strategies.ModuleStacks` (the partitions are known only once every client's
    rank is), like flexlora.
    """

    name = "raflora"
    paper = "raFLoRA: rank-partition aggregation for heterogeneous federated LoRA (arXiv 2602.13486)"
    send_back = "svd"

    def reads_every_value(self, ranks: Sequence[int], target_rank: int | None) -> bool:
        return True  # every client's slots enter the stacked sum before any truncation

    def aggregate_module(self, inputs: ModuleInputs) -> tuple[torch.Tensor, torch.Tensor]:
        bs, as_ = [], []
        for lo, hi, q in partition_weights(inputs.ranks, inputs.weights):
            for k in torch.nonzero(q).flatten().tolist():
                root = float(q[k].sqrt())
                bs.append(root * inputs.b[k][:, lo:hi])
                as_.append(root * inputs.a[k][lo:hi])
        return factored_svd(bs, as_, inputs.target_rank or inputs.max_rank)
