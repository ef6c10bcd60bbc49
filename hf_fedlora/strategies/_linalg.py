"""Running sums shared by the padding strategies: in-place accumulation, no padded copies, memory
independent of the number of clients folded in."""

from __future__ import annotations

import torch


class PaddedSums:
    """``sum_k w_k pad(A'_k)`` and ``sum_k w_k pad(B'_k)`` over the clients folded in so far, and each
    slot's owner weight ``sum_{k: r_k > i} w_k``.

    The rank is ``target_rank`` when given (longer clients are cut), else the largest rank seen so
    far: the sums grow (padded with zeros) when a client of a larger rank arrives.
    """

    def __init__(self, target_rank: int | None):
        self.target_rank = target_rank
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self._weight_by_rank: dict[int, float] = {}  # sum of w_k over clients with r_k = rank (cut)

    @property
    def rank(self) -> int:
        return 0 if self.a is None else self.a.shape[0]

    def reserve(self, a: torch.Tensor, b: torch.Tensor) -> int:
        """Allocate or grow the sums for a client of these shapes; returns its slots that count."""
        rank = self.target_rank or max(self.rank, a.shape[0])
        if self.a is None:
            self.a = a.new_zeros(rank, a.shape[1])
            self.b = b.new_zeros(b.shape[0], rank)
        elif rank > self.rank:
            grow = rank - self.rank
            self.a = torch.cat([self.a, self.a.new_zeros(grow, self.a.shape[1])], dim=0)
            self.b = torch.cat([self.b, self.b.new_zeros(self.b.shape[0], grow)], dim=1)
        return min(a.shape[0], rank)

    @property
    def owner_weight(self) -> torch.Tensor:
        """Each slot's owner weight ``sum_{k: r_k > i} w_k`` (float64, ``[rank]``)."""
        out = torch.zeros(self.rank, dtype=torch.float64)
        for r, weight in self._weight_by_rank.items():
            out[:r] += weight
        return out

    def add(self, a: torch.Tensor, b: torch.Tensor, weight: float) -> None:
        """Fold ``weight * pad(a)``, ``weight * pad(b)`` in."""
        r = self.reserve(a, b)
        self.a[:r].add_(a[:r], alpha=weight)
        self.b[:, :r].add_(b[:, :r], alpha=weight)
        self._weight_by_rank[r] = self._weight_by_rank.get(r, 0.0) + weight

    def clear(self) -> None:
        """Zero the sums, keeping their rank."""
        if self.a is not None:
            self.a.zero_()
            self.b.zero_()
        self._weight_by_rank.clear()

    def scaled(self, total: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The sums divided by ``total`` (in place; returned as is when ``total`` is 1)."""
        if total != 1.0:
            self.a.div_(total)
            self.b.div_(total)
        return self.a, self.b
