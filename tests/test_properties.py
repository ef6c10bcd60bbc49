"""Property-based checks (hypothesis) of the aggregation invariants, on random heterogeneous factors."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from hf_fedlora import list_strategies
from hf_fedlora.strategies import ModuleInputs, get_strategy

OUT, IN = 12, 10
HETEROGENEOUS = [s for s in list_strategies() if get_strategy(s).supports_heterogeneous_ranks]

ranks_lists = st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=5)
weights_lists = st.lists(st.floats(min_value=0.05, max_value=20.0), min_size=5, max_size=5)


def make_inputs(ranks, weights, seed) -> ModuleInputs:
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor(weights[: len(ranks)], dtype=torch.float64)
    return ModuleInputs(
        name="m",
        a=[torch.randn(r, IN, generator=g) for r in ranks],
        b=[torch.randn(OUT, r, generator=g) for r in ranks],
        weights=(w / w.sum()).float(),
    )


def update(strategy: str, inputs: ModuleInputs) -> torch.Tensor:
    a, b = get_strategy(strategy).aggregate_module(inputs)
    return b.double() @ a.double()


@given(ranks=ranks_lists, weights=weights_lists, seed=st.integers(0, 2**16), data=st.data())
def test_client_order_does_not_matter(ranks, weights, seed, data):
    inputs = make_inputs(ranks, weights, seed)
    order = data.draw(st.permutations(range(len(ranks))))
    shuffled = ModuleInputs(
        "m", [inputs.a[i] for i in order], [inputs.b[i] for i in order], inputs.weights[list(order)]
    )
    for strategy in HETEROGENEOUS:
        torch.testing.assert_close(update(strategy, shuffled), update(strategy, inputs), rtol=1e-4, atol=1e-5)


@given(rank=st.integers(1, 8), clients=st.integers(1, 5), weights=weights_lists, seed=st.integers(0, 2**16))
def test_equal_ranks_make_the_padding_rules_agree_with_fedavg(rank, clients, weights, seed):
    inputs = make_inputs([rank] * clients, weights, seed)
    reference = get_strategy("fedavg").aggregate_module(inputs)
    for strategy in ("replication", "zero_padding"):
        for got, want in zip(get_strategy(strategy).aggregate_module(inputs), reference):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@given(ranks=ranks_lists, weights=weights_lists, seed=st.integers(0, 2**16), factor=st.floats(0.01, 100.0))
def test_scaling_all_weights_changes_nothing(ranks, weights, seed, factor):
    inputs = make_inputs(ranks, weights, seed)
    raw = torch.tensor(weights[: len(ranks)], dtype=torch.float64) * factor
    rescaled = ModuleInputs("m", inputs.a, inputs.b, (raw / raw.sum()).float())
    for strategy in HETEROGENEOUS:
        torch.testing.assert_close(update(strategy, rescaled), update(strategy, inputs), rtol=1e-4, atol=1e-5)


@given(ranks=ranks_lists, weights=weights_lists, seed=st.integers(0, 2**16))
def test_replication_keeps_a_slot_its_owners_agree_on(ranks, weights, seed):
    """If every owner of slot i holds the same values, replication returns them unshrunk."""
    inputs = make_inputs(ranks, weights, seed)
    top = max(ranks) - 1
    shared_a, shared_b = torch.randn(IN), torch.randn(OUT)
    for k, r in enumerate(ranks):
        if r > top:
            inputs.a[k][top] = shared_a
            inputs.b[k][:, top] = shared_b
    a, b = get_strategy("replication").aggregate_module(inputs)
    torch.testing.assert_close(a[top], shared_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b[:, top], shared_b, rtol=1e-5, atol=1e-6)
    owners_share = float(sum(w for w, r in zip(inputs.weights, ranks) if r > top))
    za, _ = get_strategy("zero_padding").aggregate_module(inputs)
    torch.testing.assert_close(za[top], owners_share * shared_a, rtol=1e-4, atol=1e-5)
