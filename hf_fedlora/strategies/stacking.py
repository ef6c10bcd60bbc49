"""FLoRA stacking (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024, https://arxiv.org/abs/2409.05976).

Concatenates the clients' factors, ``A = [p_1 A_1; ...; p_K A_K]`` and ``B = [B_1, ..., B_K]``, so
``B @ A = sum_k p_k B_k A_k`` exactly, at rank ``sum r_k``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import AdapterError
from .base import ModuleInputs, Strategy
from .registry import register_strategy


@register_strategy
class StackingStrategy(Strategy):
    """Exact weighted sum of updates by concatenation; output rank ``sum_k r_k``.

    Incremental: the default :class:`~hf_fedlora.strategies.ModuleStacks`; the stacked factors are
    the output itself, so memory grows with the clients as the output does.
    """

    name = "stacking"
    paper = "Wang et al., FLoRA: Federated Fine-Tuning LLMs with Heterogeneous Low-Rank Adaptations (NeurIPS 2024)"
    send_back = "svd"
    rank_grows_with_clients = True

    def reads_every_value(self, ranks: Sequence[int], target_rank: int | None) -> bool:
        return True  # the whole sum is formed before any truncation

    def aggregate_module(self, inputs: ModuleInputs) -> tuple[torch.Tensor, torch.Tensor]:
        total = sum(inputs.ranks)
        if inputs.target_rank not in (None, total):
            raise AdapterError(
                f"strategy 'stacking' outputs rank sum(r_k) = {total} for module `{inputs.name}`; "
                f"`target_rank={inputs.target_rank}` is not supported. Use strategy 'flexlora' for a fixed rank."
            )
        a = torch.cat([p * a for p, a in zip(inputs.weights, inputs.a)], dim=0)
        b = torch.cat(list(inputs.b), dim=1)
        return a, b
