"""Which LoRA rank each simulated client trains at.

Two ways to say it in a config:

- ``ranks: "4,8,16"``: a fixed list, cycled over the clients (client ``i`` gets ``list[i % len]``);
  ``"8"`` gives every client rank 8.
- ``ranks: "5:0.9,20:0.1"``: a distribution ``rank:share``; exactly ``round(share * num_clients)``
  clients get each rank (largest remainders decide the leftovers), placed by a seeded permutation.

And the seed paper's quality-based upgrade (:func:`quality_upgrade`): every client starts at the
low rank; after a given round the clients with the best validation scores switch to the high rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RankSpec:
    """A parsed ``ranks`` option: ``shares`` is ``None`` for a fixed list."""

    ranks: tuple[int, ...]
    shares: tuple[float, ...] | None = None

    @property
    def max_rank(self) -> int:
        """The largest rank any client can get."""
        return max(self.ranks)


def _positive_int(text: str, spec: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"`ranks` entry {text.strip()!r} in {spec!r} is not a positive integer rank.")
    return value


def parse_rank_spec(spec: str | int | list) -> RankSpec:
    """Parse ``"4,8,16"`` (fixed list), ``"5:0.9,20:0.1"`` (distribution) or ``8``.

    Raises:
        ValueError: a rank that is not a positive integer, a share that is not positive, a mix of
            both forms, or shares that do not sum to 1 (within 1e-6).
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = str(spec)
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(s) for s in spec)
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise ValueError("`ranks` is empty; give e.g. '8', '4,8,16' or '5:0.9,20:0.1'.")
    with_share = [":" in s for s in items]
    if not any(with_share):
        return RankSpec(tuple(_positive_int(s, spec) for s in items))
    if not all(with_share):
        raise ValueError(f"`ranks` {spec!r} mixes 'rank' and 'rank:share' entries; use one form.")
    ranks, shares = [], []
    for item in items:
        rank, share = item.split(":", 1)
        ranks.append(_positive_int(rank, spec))
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"`ranks` share {share!r} in {spec!r} must be a positive number.")
        shares.append(value)
    if abs(sum(shares) - 1) > 1e-6:
        raise ValueError(f"`ranks` shares in {spec!r} sum to {sum(shares):g}; they must sum to 1.")
    return RankSpec(tuple(ranks), tuple(shares))


def allocate_ranks(spec: str | RankSpec, num_clients: int, seed: int = 0) -> list[int]:
    """Each client's rank (index = client id) under ``spec``.

    Fixed lists are cycled in client order. Distributions give exactly the rounded counts (largest
    remainder method, so they sum to ``num_clients``), shuffled with ``seed``.
    """
    spec = spec if isinstance(spec, RankSpec) else parse_rank_spec(spec)
    if spec.shares is None:
        return [spec.ranks[i % len(spec.ranks)] for i in range(num_clients)]
    exact = np.asarray(spec.shares) * num_clients
    counts = np.floor(exact).astype(int)
    leftovers = num_clients - counts.sum()
    for i in np.argsort(-(exact - counts), kind="stable")[:leftovers]:
        counts[i] += 1
    ranks = np.repeat(np.asarray(spec.ranks), counts)
    return [int(r) for r in np.random.default_rng(seed).permutation(ranks)]


def quality_upgrade(
    ranks: list[int],
    scores: Mapping[int, float],
    *,
    high_rank: int,
    fraction: float,
) -> list[int]:
    """The seed paper's rank upgrade: the top ``fraction`` of the scored clients get ``high_rank``.

    ``ceil(fraction * len(scores))`` clients (at least one) with the highest validation scores are
    upgraded; ties go to the lower client id. Clients without a score keep their rank.

    Args:
        ranks: current rank per client id.
        scores: validation score of each scored client (higher is better).
        high_rank: the rank upgraded clients get.
        fraction: share of the scored clients to upgrade, in (0, 1].

    Returns:
        The new rank per client id.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"`upgrade_fraction` must be in (0, 1], got {fraction!r}.")
    new = list(ranks)
    if not scores:
        return new
    count = max(1, math.ceil(fraction * len(scores)))
    ordered = sorted(scores, key=lambda client: (-scores[client], client))
    for client in ordered[:count]:
        new[client] = high_rank
    return new


__all__ = ["RankSpec", "allocate_ranks", "parse_rank_spec", "quality_upgrade"]
