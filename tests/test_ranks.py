"""Rank allocation: fixed lists, distributions with exact counts, and the quality-based upgrade."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_fedlora.federation.ranks import RankSpec, allocate_ranks, parse_rank_spec, quality_upgrade


def test_parse_fixed_list_and_distribution():
    assert parse_rank_spec("4,8,16") == RankSpec((4, 8, 16))
    assert parse_rank_spec(8) == RankSpec((8,))
    assert parse_rank_spec("5:0.9, 20:0.1") == RankSpec((5, 20), (0.9, 0.1))
    assert parse_rank_spec("5:0.9,20:0.1").max_rank == 20


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "empty"),
        ("4,0", "not a positive integer"),
        ("4,x", "not a positive integer"),
        ("5:0.5,20:0.4", "sum to 0.9"),
        ("5:0.5,20", "mixes"),
        ("5:-1,20:2", "must be a positive number"),
    ],
)
def test_invalid_specs_say_what_is_wrong(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_rank_spec(spec)


def test_fixed_list_is_cycled_in_client_order():
    assert allocate_ranks("4,8,16", 7) == [4, 8, 16, 4, 8, 16, 4]


@settings(max_examples=60, deadline=None)
@given(num_clients=st.integers(1, 300), share=st.floats(0.01, 0.99), seed=st.integers(0, 1000))
def test_distribution_counts_are_the_rounded_shares_and_deterministic(num_clients, share, seed):
    spec = f"5:{share!r},20:{1 - share!r}"
    ranks = allocate_ranks(spec, num_clients, seed=seed)
    assert len(ranks) == num_clients
    assert set(ranks) <= {5, 20}
    assert abs(ranks.count(20) - (1 - share) * num_clients) < 1  # largest remainder: off by < 1
    assert ranks == allocate_ranks(spec, num_clients, seed=seed)


def test_distribution_places_ranks_by_seed():
    a = allocate_ranks("5:0.9,20:0.1", 100, seed=0)
    b = allocate_ranks("5:0.9,20:0.1", 100, seed=1)
    assert a.count(20) == b.count(20) == 10
    assert a != b


def test_quality_upgrade_gives_the_top_fraction_the_high_rank():
    ranks = [5] * 10
    scores = {1: 0.6, 3: 0.9, 4: 0.7, 8: 0.9, 9: 0.1}
    upgraded = quality_upgrade(ranks, scores, high_rank=20, fraction=0.4)  # ceil(0.4 * 5) = 2 clients
    assert [c for c, r in enumerate(upgraded) if r == 20] == [3, 8]
    one = quality_upgrade(ranks, scores, high_rank=20, fraction=0.1)  # at least one; tie -> lower id
    assert [c for c, r in enumerate(one) if r == 20] == [3]
    assert ranks == [5] * 10, "the input list is not modified"
    assert quality_upgrade(ranks, {}, high_rank=20, fraction=0.5) == ranks
    with pytest.raises(ValueError, match="`upgrade_fraction`"):
        quality_upgrade(ranks, scores, high_rank=20, fraction=0)
