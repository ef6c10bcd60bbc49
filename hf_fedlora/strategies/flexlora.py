"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources", NeurIPS 2024, https://arxiv.org/abs/2402.11505).

Averages the clients' full updates ``sum_k p_k B_k A_k`` and redistributes them by SVD. We compute
the SVD in factored form (QR of the stacked factors, SVD of a ``sum r_k`` square core), which is
exact and never builds the dense ``out x in`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..linalg import factored_svd
from .base import ModuleInputs, Strategy
from .registry import register_strategy


@register_strategy
class FlexLoraStrategy(Strategy):
    """Best rank-R approximation of ``sum_k p_k B'_k A'_k``, R = ``target_rank`` or ``max r_k``.

    Incremental: the default :class:`~hf_fedlora.strategies.ModuleStacks`; every client's folded
    factors are kept until the end (memory grows with the number of clients: ``sum_k r_k (out + in)``
    floats per module), since the SVD needs the whole sum.
    """

    name = "flexlora"
    paper = "Bai et al., Federated Fine-tuning of LLMs under Heterogeneous Tasks and Client Resources (NeurIPS 2024)"
    send_back = "svd"

    def reads_every_value(self, ranks: Sequence[int], target_rank: int | None) -> bool:
        return True  # the whole sum is formed before any truncation

    def aggregate_module(self, inputs: ModuleInputs) -> tuple[torch.Tensor, torch.Tensor]:
        roots = inputs.weights.sqrt()
        return factored_svd(
            [r * b for r, b in zip(roots, inputs.b)],
            [r * a for r, a in zip(roots, inputs.a)],
            inputs.target_rank or inputs.max_rank,
        )
