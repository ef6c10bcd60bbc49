"""Running sums shared by the padding strategies: in-place accumulation, no padded copies, memory
independent of the number of clients folded in, and no overflow whatever the weights' size."""

from __future__ import annotations

import math

import torch


def power_of_two_unit(weight: float) -> float:
    """The power of two ``2**e`` with ``2**e <= weight < 2**(e+1)`` (``weight`` finite, > 0): a unit
    that keeps ``weight / unit`` in ``[1, 2)`` and that exists even for the largest floats."""
    return math.ldexp(1.0, math.frexp(weight)[1] - 1)


class PaddedSums:
    """``sum_k w_k pad(A'_k)`` and ``sum_k w_k pad(B'_k)`` over the clients folded in so far, each
    slot's owner weight ``sum_{k: r_k > i} w_k`` and the total weight, all kept relative to a power
    of two no smaller than half of every weight seen (1 for weights up to 1, as ``aggregate_adapters``
    passes them): weights of 1e308 or example counts past float range cannot overflow the sums, and
    since the unit is a power of two, rescaling (when a larger weight arrives) is exact.

    The rank is ``target_rank`` when given (longer clients are cut), else the largest rank seen so
    far: the sums grow (padded with zeros) when a client of a larger rank arrives.
    """

    def __init__(self, target_rank: int | None):
        self.target_rank = target_rank
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.unit = 1.0  # a power of two, at least half of every weight: stored weights are relative to it
        self.total = 0.0  # sum of the relative weights folded in
        self._weight_by_rank: dict[int, float] = {}  # relative weight of the clients with r_k = rank (cut)

    @property
    def rank(self) -> int:
        return 0 if self.a is None else self.a.shape[0]

    def reserve(self, a: torch.Tensor, b: torch.Tensor) -> int:
        """Allocate or grow the sums for a client of these shapes; returns its slots that count."""
        rank = self.target_rank or max(self.rank, a.shape[0])
        if self.a is None:
            self.a = torch.zeros(rank, a.shape[1], dtype=torch.float32)
            self.b = torch.zeros(b.shape[0], rank, dtype=torch.float32)
        elif rank > self.rank:
            grow = rank - self.rank
            self.a = torch.cat([self.a, self.a.new_zeros(grow, self.a.shape[1])], dim=0)
            self.b = torch.cat([self.b, self.b.new_zeros(self.b.shape[0], grow)], dim=1)
        return min(a.shape[0], rank)

    @property
    def owner_weight(self) -> torch.Tensor:
        """Each slot's owner weight ``sum_{k: r_k > i} w_k``, relative to :attr:`unit` (float64, ``[rank]``)."""
        out = torch.zeros(self.rank, dtype=torch.float64)
        for r, weight in self._weight_by_rank.items():
            out[:r] += weight
        return out

    def add(self, a: torch.Tensor, b: torch.Tensor, weight: float, root: float = 1.0) -> None:
        """Fold ``weight * pad(root * a)``, ``weight * pad(root * b)`` in (``weight`` finite, >= 0; a
        zero weight only reserves the rank; ``root`` is the factors' scale, counted in the sums but not
        in the slot weights)."""
        r = self.reserve(a, b)
        if weight <= 0:
            return
        self._raise_unit(weight)
        relative = weight / self.unit
        self.a[:r].add_(a[:r], alpha=relative * root)
        self.b[:, :r].add_(b[:, :r], alpha=relative * root)
        self._weight_by_rank[r] = self._weight_by_rank.get(r, 0.0) + relative
        self.total += relative

    def _raise_unit(self, weight: float) -> None:
        """Make the stored sums relative to a unit no smaller than half of ``weight`` (exact: a power of two)."""
        unit = power_of_two_unit(weight)
        if unit > self.unit:
            ratio = self.unit / unit
            self.a.mul_(ratio)
            self.b.mul_(ratio)
            self.total *= ratio
            self._weight_by_rank = {k: v * ratio for k, v in self._weight_by_rank.items()}
            self.unit = unit

    def add_many(self, a: torch.Tensor, b: torch.Tensor, weights: list[float], roots: list[float]) -> None:
        """:meth:`add` of clients of one rank at once: ``a`` is ``[n, r, in]`` and ``b`` ``[n, out, r]``,
        client k with ``weights[k]`` and ``roots[k]``; one weighted sum per factor instead of n adds."""
        r = self.reserve(a[0], b[0])
        live = [k for k, w in enumerate(weights) if w > 0]  # a zero weight only reserves the rank
        if not live:
            return
        self._raise_unit(max(weights[k] for k in live))
        relative = [weights[k] / self.unit for k in live]
        coeffs = torch.tensor([w * roots[k] for w, k in zip(relative, live)], dtype=torch.float32)
        if len(live) < len(weights):
            a, b = a[live], b[live]
        if r < a.shape[1]:  # cut to the target rank
            a, b = a[:, :r], b[:, :, :r]
        n = len(live)
        self.a[:r].view(-1).addmv_(a.reshape(n, -1).T, coeffs)  # rows [:r]: contiguous
        if r == self.rank:
            self.b.view(-1).addmv_(b.reshape(n, -1).T, coeffs)
        else:
            self.b[:, :r].add_(torch.mv(b.reshape(n, -1).T, coeffs).view(self.b.shape[0], r))
        self._weight_by_rank[r] = self._weight_by_rank.get(r, 0.0) + sum(relative)
        self.total += sum(relative)

    def clear(self) -> None:
        """Zero the sums and weights, keeping their rank."""
        if self.a is not None:
            self.a.zero_()
            self.b.zero_()
        self._weight_by_rank.clear()
        self.unit, self.total = 1.0, 0.0

    def normalised(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted means ``sum_k w_k pad(x_k) / sum_k w_k`` (in place; zeros when nothing was
        added with a positive weight)."""
        if self.total > 0 and self.total != 1.0:
            self.a.div_(self.total)
            self.b.div_(self.total)
        return self.a, self.b
