"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources", NeurIPS 2024, https://arxiv.org/abs/2402.11505).

Averages the clients' full updates ``sum_k p_k B_k A_k`` and redistributes them by SVD. We compute
the SVD in factored form (the R of a QR of each stacked factor, the leading singular triplets of
a ``sum r_k`` square core), which is exact and never builds the dense ``out x in`` matrix; at many
clients, a randomised range finder on the same implicit sum, kept only where its certificate bounds
its error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from ..linalg import factored_svd, randomized_factored_svd
from .base import ModuleInputs, Strategy
from .registry import register_strategy

SvdMethod = Literal["auto", "exact", "randomized"]


@register_strategy
class FlexLoraStrategy(Strategy):
    """Best rank-R approximation of ``sum_k p_k B'_k A'_k``, R = ``target_rank`` or ``max r_k``.

    ``svd="exact"`` is the factored SVD (:func:`~hf_fedlora.linalg.factored_svd`: the R of a QR of
    each stack, the leading triplets of the ``sum r_k`` square core);
    ``"randomized"`` a seeded randomised range finder on the implicit sum
    (:func:`~hf_fedlora.linalg.randomized_factored_svd`); ``"auto"`` (the default) tries the
    randomised one when the summed rank is at least ``4 (R + oversample)`` (below that the exact one
    is as fast) and keeps it only when its certificate bounds the energy it misses beyond the exact
    truncation by ``tolerance * ||sum||_F^2`` (probability of a wrong certificate below 1e-10); else
    it computes the exact one. Both are deterministic.

    Incremental: the default :class:`~hf_fedlora.strategies.ModuleStacks`; every client's folded
    factors are kept until the end (memory grows with the number of clients: ``sum_k r_k (out + in)``
    floats per module), since the SVD needs the whole sum.
    """

    name = "flexlora"
    paper = "Bai et al., Federated Fine-tuning of LLMs under Heterogeneous Tasks and Client Resources (NeurIPS 2024)"
    send_back = "svd"

    def __init__(
        self,
        svd: SvdMethod = "auto",
        *,
        tolerance: float = 1e-3,
        oversample: int = 16,
        power_iterations: int = 2,
        seed: int = 0,
    ):
        if svd not in ("auto", "exact", "randomized"):
            raise ValueError(f"`svd` must be 'auto', 'exact' or 'randomized', got {svd!r}.")
        self.svd, self.tolerance, self.seed = svd, tolerance, seed
        self.oversample, self.power_iterations = oversample, power_iterations
        self.last_bound: float | None = None  # the certificate of the last randomised SVD, for reports

    def reads_every_value(self, ranks: Sequence[int], target_rank: int | None) -> bool:
        return True  # the whole sum is formed before any truncation

    def aggregate_module(self, inputs: ModuleInputs) -> tuple[torch.Tensor, torch.Tensor]:
        roots = inputs.weights.sqrt()
        bs = [r * b for r, b in zip(roots, inputs.b)]
        as_ = [r * a for r, a in zip(roots, inputs.a)]
        rank = inputs.target_rank or inputs.max_rank
        summed = sum(inputs.ranks)
        if self.svd == "randomized" or (self.svd == "auto" and summed >= 4 * (rank + self.oversample)):
            a, b, bound = randomized_factored_svd(
                bs,
                as_,
                rank,
                oversample=self.oversample,
                power_iterations=self.power_iterations,
                seed=self.seed,
            )
            self.last_bound = bound
            if self.svd == "randomized" or bound <= self.tolerance:
                return a, b
        return factored_svd(bs, as_, rank)

    def __repr__(self) -> str:
        return f"FlexLoraStrategy(svd={self.svd!r})"
