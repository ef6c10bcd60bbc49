"""Partitioners: disjoint, covering, deterministic, and skewed the way each one promises."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_fedlora.federation.partition import (
    DirichletPartitioner,
    HighQualityPartitioner,
    IidPartitioner,
    label_groups,
    make_partitioner,
)


def _check_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n, "every example is assigned exactly once"
    assert np.array_equal(np.sort(joined), np.arange(n))
    assert all(len(p) >= 1 for p in parts)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(20, 400),
    num_clients=st.integers(1, 20),
    num_classes=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(["iid", "dirichlet", "high_quality"]),
)
def test_every_partitioner_is_a_disjoint_cover_and_deterministic(n, num_clients, num_classes, seed, name):
    if name == "high_quality" and num_clients < 2:
        num_clients = 2
    labels = np.random.default_rng(seed).integers(0, num_classes, size=n)

    def make(s):
        return make_partitioner(name, num_clients, seed=s, dirichlet_alpha=0.5, high_quality_fraction=0.2)

    parts = make(seed)(labels)
    assert len(parts) == num_clients
    _check_disjoint_cover(parts, n)
    again = make(seed)(labels)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_iid_sizes_differ_by_at_most_one_and_seed_changes_the_split():
    labels = np.zeros(103, dtype=int)
    parts = IidPartitioner(10, seed=1)(labels)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    other = IidPartitioner(10, seed=2)(labels)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def _skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean over clients of the largest class share (1.0 = every client holds one class)."""
    return float(np.mean([np.bincount(labels[p], minlength=labels.max() + 1).max() / len(p) for p in parts]))


def test_small_dirichlet_alpha_is_more_label_skewed_than_large(shared_data):
    with open(shared_data / "ag_news" / "train.tsv", encoding="utf-8") as handle:
        names = [row[1] for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    labels = label_groups(names)
    assert len(np.unique(labels)) == 4
    skewed = DirichletPartitioner(20, alpha=0.1, seed=0)(labels)
    mixed = DirichletPartitioner(20, alpha=100.0, seed=0)(labels)
    _check_disjoint_cover(skewed, len(labels))
    assert _skew(skewed, labels) > 0.6
    assert _skew(mixed, labels) < 0.35  # close to the 0.25 of a balanced 4-class shard


def test_high_quality_clients_get_balanced_data_and_the_rest_is_skewed():
    labels = np.repeat(np.arange(4), 250)
    partitioner = HighQualityPartitioner(20, high_quality_fraction=0.1, alpha=0.1, seed=3)
    parts = partitioner(labels)
    _check_disjoint_cover(parts, len(labels))
    assert partitioner.num_high_quality == 2
    for part in parts[:2]:
        counts = np.bincount(labels[part], minlength=4)
        assert (
            counts.sum() == 1000 // 20 and counts.max() - counts.min() <= 1
        )  # an equal share, classes balanced
    assert _skew(parts[2:], labels) > 0.6


def test_regression_labels_are_binned_into_quantiles():
    scores = np.linspace(0.0, 5.0, 100)
    groups = label_groups(scores.astype(np.float32) + 0.01)
    assert sorted(np.bincount(groups)) == [20] * 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="random", num_partitions=3), "`partition` must be one of"),
        (
            dict(name="dirichlet", num_partitions=3, dirichlet_alpha=0.0),
            "`dirichlet_alpha` must be a positive",
        ),
        (
            dict(name="high_quality", num_partitions=3, high_quality_fraction=1.5),
            "`high_quality_fraction` must be in",
        ),
        (dict(name="iid", num_partitions=0), "`num_partitions` must be a positive"),
    ],
)
def test_invalid_parameters_name_the_option(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        make_partitioner(name, **kwargs)


def test_more_clients_than_examples_is_refused():
    with pytest.raises(ValueError, match="lower `num_clients`"):
        IidPartitioner(10)(np.zeros(5))
