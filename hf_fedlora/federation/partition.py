"""Split a labelled training set among simulated clients: IID, Dirichlet, or the seed paper's split.

Partitioners work on the label array only and return, per client, the indices of its examples.
They are deterministic for a given seed, so every process of a run computes the same split.
Regression labels (e.g. STS-B scores) are binned into quantiles before any label-aware split.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np


def label_groups(labels: Sequence, num_bins: int = 5) -> np.ndarray:
    """Integer class ids for label-aware partitioning: the labels themselves, or quantile bins of
    float labels (regression tasks)."""
    values = np.asarray(labels)
    if np.issubdtype(values.dtype, np.floating) and not np.all(values == np.round(values)):
        edges = np.quantile(values, np.linspace(0, 1, num_bins + 1)[1:-1])
        return np.searchsorted(edges, values, side="right")
    _, ids = np.unique(values, return_inverse=True)
    return ids.reshape(-1)


class Partitioner(ABC):
    """Splits ``labels`` into ``num_partitions`` disjoint index sets covering every example.

    Args:
        num_partitions (`int`): number of clients.
        seed (`int`, *optional*, defaults to 0): seed of the split.
    """

    def __init__(self, num_partitions: int, seed: int = 0):
        if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
            raise ValueError(f"`num_partitions` must be a positive integer, got {num_partitions!r}.")
        self.num_partitions = num_partitions
        self.seed = seed

    def __call__(self, labels: Sequence) -> list[np.ndarray]:
        """Split; returns one sorted int64 index array per client."""
        labels = np.asarray(labels)
        if len(labels) < self.num_partitions:
            raise ValueError(
                f"cannot give {self.num_partitions} clients at least one example each from {len(labels)} examples; "
                "lower `num_clients` or raise `max_train_samples`."
            )
        parts = self._split(labels, np.random.default_rng(self.seed))
        return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]

    @abstractmethod
    def _split(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]: ...


class IidPartitioner(Partitioner):
    """A random permutation cut into near-equal parts (sizes differ by at most one)."""

    def _split(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        return list(np.array_split(rng.permutation(len(labels)), self.num_partitions))


class DirichletPartitioner(Partitioner):
    """Label-skewed split: each class is shared among clients with proportions ~ Dir(``alpha``).

    Small ``alpha`` gives each client few classes; large ``alpha`` tends to IID. Proportions are
    redrawn (up to 20 times) until every client holds at least ``min_partition_size`` examples.

    Args:
        alpha (`float`, *optional*, defaults to 0.5): Dirichlet concentration, > 0.
        min_partition_size (`int`, *optional*, defaults to 1): smallest acceptable client shard.
    """

    def __init__(self, num_partitions: int, alpha: float = 0.5, seed: int = 0, min_partition_size: int = 1):
        super().__init__(num_partitions, seed)
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"`dirichlet_alpha` must be a positive number, got {alpha!r}.")
        self.alpha = float(alpha)
        self.min_partition_size = min_partition_size

    def _split(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        groups = label_groups(labels)
        best: list[np.ndarray] = []
        for _ in range(20):
            parts: list[list[int]] = [[] for _ in range(self.num_partitions)]
            for cls in np.unique(groups):
                members = rng.permutation(np.flatnonzero(groups == cls))
                shares = rng.dirichlet([self.alpha] * self.num_partitions)
                cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
                for client, chunk in enumerate(np.split(members, cuts)):
                    parts[client].extend(chunk.tolist())
            best = [np.asarray(p) for p in parts]
            if min(len(p) for p in best) >= self.min_partition_size:
                return best
        warnings.warn(
            f"Dirichlet split (alpha={self.alpha}) left a client with fewer than {self.min_partition_size} "
            "examples after 20 draws; raise `dirichlet_alpha` or lower `num_clients`. Moving examples from the "
            "largest clients to fill them.",
            stacklevel=3,
        )
        for small in range(self.num_partitions):
            while len(best[small]) < self.min_partition_size:
                largest = int(np.argmax([len(p) for p in best]))
                best[small] = np.append(best[small], best[largest][-1])
                best[largest] = best[largest][:-1]
        return best


class HighQualityPartitioner(Partitioner):
    """The seed paper's split: a fraction of clients hold class-balanced ("high-quality") data, the
    rest share the remaining examples with a Dirichlet label skew.

    The first ``ceil(high_quality_fraction * num_partitions)`` clients are the high-quality ones.
    Each gets ``high_quality_size`` examples (default: an equal share of the data) with every class
    represented equally (as far as the class sizes allow).

    Args:
        high_quality_fraction (`float`): fraction of clients with balanced data, in (0, 1).
        alpha (`float`, *optional*, defaults to 0.5): Dirichlet concentration for the other clients.
        high_quality_size (`int`, *optional*): examples per high-quality client.
    """

    def __init__(
        self,
        num_partitions: int,
        high_quality_fraction: float,
        alpha: float = 0.5,
        seed: int = 0,
        high_quality_size: int | None = None,
    ):
        super().__init__(num_partitions, seed)
        if not 0 < high_quality_fraction < 1:
            raise ValueError(f"`high_quality_fraction` must be in (0, 1), got {high_quality_fraction!r}.")
        self.num_high_quality = max(1, math.ceil(high_quality_fraction * num_partitions))
        if self.num_high_quality >= num_partitions:
            raise ValueError(
                f"`high_quality_fraction`={high_quality_fraction} makes all {num_partitions} clients high-quality; "
                "lower it so some clients get the Dirichlet split."
            )
        self.alpha = alpha
        self.high_quality_size = high_quality_size

    def _split(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        groups = label_groups(labels)
        classes = np.unique(groups)
        num_low = self.num_partitions - self.num_high_quality
        size = self.high_quality_size or len(labels) // self.num_partitions
        size = max(
            1, min(size, (len(labels) - num_low) // self.num_high_quality)
        )  # leave one per other client
        pools = {c: list(rng.permutation(np.flatnonzero(groups == c))) for c in classes}
        high: list[np.ndarray] = []
        for _ in range(self.num_high_quality):
            take: list[int] = []
            while len(take) < size and any(pools.values()):  # one of each class in turn: balanced to +-1
                for c in classes:
                    if pools[c] and len(take) < size:
                        take.append(pools[c].pop(0))
            high.append(np.asarray(take))
        rest = np.sort(np.concatenate([np.asarray(p, dtype=np.int64) for p in pools.values()]))
        low_seed = int(rng.integers(2**31))
        low = DirichletPartitioner(self.num_partitions - self.num_high_quality, self.alpha, seed=low_seed)(
            labels[rest]
        )
        return high + [rest[p] for p in low]


PARTITIONS = ("iid", "dirichlet", "high_quality")


def make_partitioner(
    name: str,
    num_partitions: int,
    *,
    seed: int = 0,
    dirichlet_alpha: float = 0.5,
    high_quality_fraction: float = 0.1,
) -> Partitioner:
    """The partitioner named ``name`` (one of ``iid``, ``dirichlet``, ``high_quality``).

    Raises:
        ValueError: unknown name (listing the valid ones) or invalid parameters.
    """
    if name == "iid":
        return IidPartitioner(num_partitions, seed=seed)
    if name == "dirichlet":
        return DirichletPartitioner(num_partitions, alpha=dirichlet_alpha, seed=seed)
    if name == "high_quality":
        return HighQualityPartitioner(num_partitions, high_quality_fraction, alpha=dirichlet_alpha, seed=seed)
    raise ValueError(f"`partition` must be one of {list(PARTITIONS)}, got {name!r}.")


__all__ = [
    "PARTITIONS",
    "DirichletPartitioner",
    "HighQualityPartitioner",
    "IidPartitioner",
    "Partitioner",
    "label_groups",
    "make_partitioner",
]
