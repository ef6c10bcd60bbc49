"""The shared base of the padding rules: clients' factors padded into running sums
(:class:`~._linalg.PaddedSums`); each rule says only how the sums become the merged module."""

from __future__ import annotations

import torch

from ._linalg import PaddedSums
from .base import Strategy


class PaddedSumsStrategy(Strategy):
    """A rule that adds every client's padded factors into running weighted sums and merges from
    them alone (memory: the output, whatever the number of clients). Subclasses implement
    :meth:`finish`; a NaN or Inf in any input reaches those sums, so the output shows it."""

    propagates_non_finite = True
    retains_inputs = False

    def start(self, name: str, target_rank: int | None) -> PaddedSums:
        return PaddedSums(target_rank)

    def fold_in(self, state: PaddedSums, a: torch.Tensor, b: torch.Tensor, weight: float) -> None:
        state.add(a, b, weight)

    def fold_in_scaled(
        self, state: PaddedSums, a: torch.Tensor, b: torch.Tensor, weight: float, root: float
    ) -> None:
        state.add(a, b, weight, root)

    def fold_in_many(
        self, state: PaddedSums, a: torch.Tensor, b: torch.Tensor, weights: list[float], roots: list[float]
    ) -> None:
        state.add_many(a, b, weights, roots)
