"""The contract every registered aggregation rule keeps, run over each name in ``list_strategies()``
(read at collection time, so a newly registered rule is checked without editing this file).

Clients are written by PEFT itself on the tiny BERT with heterogeneous ranks, alphas, rsLoRA and a
per-module rank pattern; a rule that needs equal ranks (``supports_heterogeneous_ranks = False``)
gets clients of one rank instead. What each rule computes is checked against independent
references in ``test_strategies_reference.py``; here, what every rule promises:

- the output loads with plain ``PeftModel.from_pretrained`` and applies exactly the update
  ``LoraAdapter.delta_weight`` reports;
- its rank is the declared one: the sum of the clients' ranks for rules whose rank grows with the
  clients (``rank_grows_with_clients``), else ``target_rank`` or the largest client rank;
- scaling every client weight by one factor changes nothing;
- a NaN in one client raises ``NonFiniteTensorError`` naming that client;
- ``previous=`` is accepted; ``target_rank=`` sets the output rank (growing rules refuse a fixed
  rank with an ``AdapterError`` naming the option);
- ``send_back`` is a valid ``LoraAdapter.to_rank`` method; the same inputs give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from testing_utils import tiny_bert, write_peft_adapter

from hf_fedlora import (
    AdapterError,
    IncompatibleAdaptersError,
    LoraAdapter,
    NonFiniteTensorError,
    StreamingAggregator,
    aggregate_adapters,
    list_strategies,
)
from hf_fedlora.constants import SEND_BACK_METHODS
from hf_fedlora.strategies import Strategy, get_strategy

STRATEGIES = list_strategies()
EQUAL_RANKS_ONLY = [name for name in STRATEGIES if not get_strategy(name).supports_heterogeneous_ranks]
WEIGHTS = [1.0, 2.0, 3.0]
HETEROGENEOUS = [  # ranks 2, 8 and 4 (6 on `value`); different alphas; rsLoRA beside plain scaling
    {"r": 2, "lora_alpha": 4},
    {"r": 8, "lora_alpha": 16, "use_rslora": True},
    {"r": 4, "lora_alpha": 4, "rank_pattern": {"value": 6}, "alpha_pattern": {"value": 12}},
]
EQUAL = [{"r": 4, "lora_alpha": 8}] * 3


@pytest.fixture(scope="module")
def client_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """PEFT-written client folders, made once for this module and only read by the tests."""
    root = tmp_path_factory.mktemp("contract_clients")
    return {
        kind: [
            write_peft_adapter(root / f"{kind}{i}", seed=i + 1, **kwargs) for i, kwargs in enumerate(specs)
        ]
        for kind, specs in (("heterogeneous", HETEROGENEOUS), ("equal", EQUAL))
    }


@pytest.fixture(params=STRATEGIES)
def strategy(request: pytest.FixtureRequest) -> Strategy:
    return get_strategy(request.param)


@pytest.fixture
def clients(strategy: Strategy, client_sets: dict[str, list[Path]]) -> list[Path]:
    return client_sets["heterogeneous" if strategy.supports_heterogeneous_ranks else "equal"]


def declared_ranks(strategy: Strategy, clients: list[Path], target_rank: int | None = None) -> dict[str, int]:
    """Each module's output rank as the rule declares it."""
    ranks = [LoraAdapter.from_pretrained(c).ranks for c in clients]
    if strategy.rank_grows_with_clients:
        return {m: sum(r[m] for r in ranks) for m in ranks[0]}
    return {m: target_rank or max(r[m] for r in ranks) for m in ranks[0]}


def test_registered_under_its_name_with_valid_attributes(strategy: Strategy) -> None:
    assert type(get_strategy(strategy.name)) is type(strategy)
    assert strategy.paper, "cite the rule's paper"
    assert strategy.send_back in SEND_BACK_METHODS
    for flag in ("supports_heterogeneous_ranks", "propagates_non_finite", "rank_grows_with_clients"):
        assert isinstance(getattr(strategy, flag), bool), flag


def test_output_loads_with_plain_peft_and_applies_its_delta_weight(strategy, clients, tmp_path) -> None:
    from peft import PeftModel, get_peft_model_state_dict

    merged = aggregate_adapters(clients, strategy.name, weights=WEIGHTS)
    folder = merged.save_pretrained(tmp_path / "global")
    model = PeftModel.from_pretrained(tiny_bert(), folder)
    loaded, saved = get_peft_model_state_dict(model), merged.state_dict()
    assert set(loaded) == set(saved), "PEFT found exactly the saved tensors"
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)

    base = dict(tiny_bert().named_parameters())
    updated = dict(model.merge_and_unload().named_parameters())
    for module in merged.modules:
        name = module.removeprefix("base_model.model.") + ".weight"
        delta = updated[name].detach() - base[name].detach()
        torch.testing.assert_close(delta, merged.delta_weight(module), rtol=1e-4, atol=1e-6, msg=module)


def test_output_rank_is_the_declared_one(strategy, clients, tmp_path) -> None:
    merged = aggregate_adapters(clients, strategy.name, weights=WEIGHTS)
    assert merged.ranks == declared_ranks(strategy, clients)
    assert LoraAdapter.from_pretrained(merged.save_pretrained(tmp_path / "global")).ranks == merged.ranks


@pytest.mark.parametrize("factor", [1e-3, 7.0, 1e4])
def test_scaling_every_weight_changes_nothing(strategy, clients, factor) -> None:
    merged = aggregate_adapters(clients, strategy.name, weights=WEIGHTS)
    scaled = aggregate_adapters(clients, strategy.name, weights=[w * factor for w in WEIGHTS])
    for module in merged.modules:
        torch.testing.assert_close(scaled.delta_weight(module), merged.delta_weight(module), msg=module)


def test_a_nan_in_one_client_names_that_client(strategy, clients) -> None:
    adapter = LoraAdapter.from_pretrained(clients[1])
    state = adapter.state_dict()
    key = max(k for k in state if k.endswith("lora_A.weight"))  # the last module, in its last slot
    state[key][-1, 0] = float("nan")
    broken = LoraAdapter.from_state_dict(adapter.config, state, label="nan-client")
    with pytest.raises(NonFiniteTensorError, match=r"client 1 \(nan-client\).*" + key.replace(".", r"\.")):
        aggregate_adapters([clients[0], broken, clients[2]], strategy.name, weights=WEIGHTS)


def test_previous_global_adapter_is_accepted(strategy, clients) -> None:
    previous = aggregate_adapters(clients, strategy.name, weights=WEIGHTS)
    again = aggregate_adapters(clients, strategy.name, weights=WEIGHTS, previous=previous)
    assert again.ranks == declared_ranks(strategy, clients)
    assert all(torch.isfinite(t).all() for t in again.state_dict().values())


def test_target_rank_sets_the_output_rank_or_is_refused(strategy, clients) -> None:
    previous = aggregate_adapters(clients, strategy.name, weights=WEIGHTS)
    if strategy.rank_grows_with_clients:  # a fixed rank is refused, naming the option
        with pytest.raises(AdapterError, match="target_rank"):
            aggregate_adapters(clients, strategy.name, target_rank=3, previous=previous)
        return
    capped = aggregate_adapters(clients, strategy.name, weights=WEIGHTS, target_rank=3, previous=previous)
    assert capped.ranks == declared_ranks(strategy, clients, target_rank=3)
    assert all(torch.isfinite(t).all() for t in capped.state_dict().values())


def test_send_back_gives_every_client_a_view_of_its_rank(strategy, clients) -> None:
    merged = aggregate_adapters(clients, strategy.name, weights=WEIGHTS)
    for rank in (2, 5):
        view = merged.to_rank(rank, lora_alpha=2 * rank, method=strategy.send_back)
        assert (
            set(view.ranks.values()) == {rank}
            and view.config.r == rank
            and view.config.lora_alpha == 2 * rank
        )


def test_same_inputs_give_the_same_bytes(strategy, clients, tmp_path) -> None:
    first = aggregate_adapters(clients, strategy.name, weights=WEIGHTS)
    second = aggregate_adapters(clients, strategy.name, weights=WEIGHTS)
    assert first.sha256() == second.sha256()
    one, two = (
        a.save_pretrained(tmp_path / f"out{i}") / "adapter_model.safetensors"
        for i, a in enumerate((first, second))
    )
    assert one.read_bytes() == two.read_bytes()


@pytest.mark.parametrize("name", EQUAL_RANKS_ONLY)
def test_a_rule_for_equal_ranks_refuses_heterogeneous_clients(name, client_sets) -> None:
    with pytest.raises(IncompatibleAdaptersError, match=f"strategy '{name}' needs equal ranks"):
        aggregate_adapters(client_sets["heterogeneous"], name)


def test_fold_in_scaled_is_fold_in_of_the_scaled_factors(strategy) -> None:
    """The module loop hands running-sum rules unscaled float32 factors and ``sqrt(s)``; what they
    fold in must be the folded factors' contribution, whatever the rule does with the root."""
    if not strategy.implements_rule() or strategy.retains_inputs:
        pytest.skip("the loop calls fold_in_scaled only for rules of running sums")
    gen = torch.Generator().manual_seed(0)
    clients = [(torch.randn(r, 12, generator=gen), torch.randn(10, r, generator=gen)) for r in (4, 4, 2)]
    roots, weights = [0.5, 3.0, 1.7], [1.0, 2.0, 0.5]
    if not strategy.supports_heterogeneous_ranks:
        clients = clients[:2]
    folded, scaled = strategy.start("m", None), strategy.start("m", None)
    for (a, b), root, weight in zip(clients, roots, weights):
        strategy.fold_in(folded, a * root, b * root, weight)
        strategy.fold_in_scaled(scaled, a.clone(), b.clone(), weight, root)
    total = sum(weights[: len(clients)])
    for want, got in zip(strategy.finish(folded, total), strategy.finish(scaled, total)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("target_rank", [None, 3, 6])
def test_fold_in_many_is_fold_in_scaled_one_by_one(strategy, target_rank) -> None:
    """Clients of one rank folded in at once (``fold_in_many``, as the module loop hands them to
    running-sum rules) give what folding them in one at a time gives, zero weights included."""
    if not strategy.implements_rule() or strategy.retains_inputs:
        pytest.skip("the loop calls fold_in_many only for rules of running sums")
    gen = torch.Generator().manual_seed(1)
    groups = [  # the largest rank first, as the loop orders them; a zero weight only reserves
        (
            torch.randn(3, 4, 12, generator=gen),
            torch.randn(3, 10, 4, generator=gen),
            [1.0, 0.0, 2.5],
            [0.5, 2.0, 1.1],
        ),
        (torch.randn(2, 2, 12, generator=gen), torch.randn(2, 10, 2, generator=gen), [0.25, 4.0], [3.0, 0.7]),
    ]
    if not strategy.supports_heterogeneous_ranks:
        groups = groups[:1]
    many, one_by_one = strategy.start("m", target_rank), strategy.start("m", target_rank)
    for a, b, weights, roots in groups:
        strategy.fold_in_many(many, a.clone(), b.clone(), weights, roots)
        for k in range(a.shape[0]):
            strategy.fold_in_scaled(one_by_one, a[k].clone(), b[k].clone(), weights[k], roots[k])
    total = sum(sum(g[2]) for g in groups)
    for want, got in zip(strategy.finish(one_by_one, total), strategy.finish(many, total)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_in_memory_clients_are_not_modified(strategy, clients) -> None:
    adapters = [LoraAdapter.from_pretrained(c) for c in clients]
    states = [{k: v.clone() for k, v in a.state_dict().items()} for a in adapters]
    memory = [
        LoraAdapter.from_state_dict(a.config, s, label=f"c{i}")
        for i, (a, s) in enumerate(zip(adapters, states))
    ]
    aggregate_adapters(memory, strategy.name, weights=WEIGHTS)
    streaming = StreamingAggregator(strategy.name)
    for client, weight in zip(memory, WEIGHTS):
        streaming.add(client, weight=weight)
    streaming.result()
    for adapter, state in zip(adapters, states):
        for key, value in adapter.state_dict().items():
            assert torch.equal(state[key], value), key
