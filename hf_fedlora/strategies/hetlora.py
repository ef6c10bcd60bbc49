"""HetLoRA's norm-weighted aggregation (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning
of On-Device Foundation Models", EMNLP 2024, https://arxiv.org/abs/2401.06432).

Zero-padding, with each client weighted by the size of its update so that clients that learned
more (larger ``||B_k A_k||_F``) count more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import NonFiniteTensorError
from ..linalg import FLOAT32_MAX, update_norm
from ._linalg import PaddedSums
from .base import Strategy
from .registry import register_strategy


@dataclass
class _NormWeightedSums:
    name: str
    sums: PaddedSums
    weighted: bool = False  # whether a client with a non-zero update has been folded in


def client_norm(a: torch.Tensor, b: torch.Tensor, name: str, scale: float = 1.0) -> float:
    """``scale * ||B A||_F`` as a Python float (``scale``: PEFT's, when ``A`` and ``B`` are stored
    factors not yet folded; ``||(sqrt(s) B)(sqrt(s) A)||_F = s ||B A||_F``): from float32 Gram
    matrices, recomputed in float64 when their products overflow float32 (factors past ~1e6 can
    overflow the squared norm while the norm itself is representable).

    Raises:
        NonFiniteTensorError: the norm itself is NaN, or past float32's range: such an update cannot
            be represented, and weighting by it would turn the merged module into NaN.
    """
    norm = float(update_norm(a, b))
    if not math.isfinite(norm):
        norm = float(update_norm(a.double(), b.double()))
    norm *= scale
    if not math.isfinite(norm) or norm > FLOAT32_MAX:
        raise NonFiniteTensorError(
            f"module `{name}`: the update's norm ||B'A'||_F is {norm:.3g}, past float32's range; "
            "its factors hold values far too large for a LoRA update. Drop this client from the round."
        )
    return norm


@register_strategy
class HetLoraStrategy(Strategy):
    """Zero-padding with weights ``w_k`` proportional to ``p_k * ||B'_k A'_k||_F`` (per module).

    With uniform ``p_k`` this is HetLoRA's rule; with example counts it also honours data size.
    When every update is zero the weights fall back to ``p_k``. Incremental: each client's norm is
    known when it is folded in, so one running sum suffices (memory: the output); it holds the
    ``p_k``-weighted sum until the first client with a non-zero update, then restarts with
    ``p_k ||B'_k A'_k||_F`` weights. A client whose norm is NaN or past float32's range is refused
    (``NonFiniteTensorError``) before it changes the sums.
    """

    name = "hetlora"
    paper = (
        "Cho et al., Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models (EMNLP 2024)"
    )
    propagates_non_finite = True
    retains_inputs = False

    def check_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        # ||B'A'||_F <= ||B'||_F ||A'||_F: two cheap float64 norms settle the common case
        bound = float(torch.linalg.vector_norm(a, dtype=torch.float64)) * float(
            torch.linalg.vector_norm(b, dtype=torch.float64)
        )
        if not bound <= FLOAT32_MAX:
            client_norm(a, b, name)

    def start(self, name: str, target_rank: int | None) -> _NormWeightedSums:
        return _NormWeightedSums(name, PaddedSums(target_rank))

    def fold_in(self, state: _NormWeightedSums, a: torch.Tensor, b: torch.Tensor, weight: float) -> None:
        self.fold_in_scaled(state, a, b, weight, 1.0)

    def fold_in_scaled(
        self, state: _NormWeightedSums, a: torch.Tensor, b: torch.Tensor, weight: float, root: float
    ) -> None:
        # the scale goes into the norm (root**2) and into the add, not into the factors: one pass fewer
        scaled = weight * client_norm(a, b, state.name, root * root)
        if scaled > 0 and not state.weighted:  # the first non-zero update: norm weights from now on
            state.sums.clear()
            state.weighted = True
        state.sums.add(a, b, scaled if state.weighted else weight, root)  # a zero weight reserves the rank

    def finish(
        self,
        state: _NormWeightedSums,
        total_weight: float,
        previous: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return state.sums.normalised()
