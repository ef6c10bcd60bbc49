"""Issue 16, the aggregation items: overflow after the output cast, NaN norms, weights whose sums
overflow, generator sources, and a hostile first client that must not become the round's reference.

Every adapter here is built in memory (two layers of 16x16 ``q``/``v`` projections), so the whole
file runs in a few seconds; each case checks the error class and the client it names, or that the
round goes on, against float64 references computed here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from hf_fedlora import (
    IncompatibleAdaptersError,
    LoraAdapter,
    NonFiniteTensorError,
    RankMismatchError,
    StreamingAggregator,
    aggregate_adapters,
    list_strategies,
)
from hf_fedlora.adapters.validate import check_finite, sum_is_finite
from hf_fedlora.merging import cast_checked

BASE = "base/model"
DIM = 16
STRATEGIES = list_strategies()


def lora(
    r: int,
    seed: int,
    *,
    base: str = BASE,
    targets: tuple[str, ...] = ("q", "v"),
    layers_to_transform: list[int] | None = None,
    value: float | None = None,
) -> LoraAdapter:
    """An in-memory adapter of rank ``r`` (alpha ``2r``) on ``layers.{0,1}.attn.<targets>``."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer in (0, 1):
        for proj in targets:
            key = f"base_model.model.layers.{layer}.attn.{proj}"
            a, b = torch.randn(r, DIM, generator=gen), torch.randn(DIM, r, generator=gen)
            if value is not None:
                a, b = torch.full_like(a, value), torch.full_like(b, value)
            state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = a, b
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(targets),
        layers_to_transform=layers_to_transform,
        base_model_name_or_path=base,
    )
    return LoraAdapter.from_state_dict(config, state, label=f"seed{seed}")


def dense(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    return {m: adapter.delta_weight(m).double() for m in adapter.modules}


# --- overflow after the output cast, NaN norms ---------------------------------------------------


def test_a_float16_output_that_overflows_names_the_module():
    big = [lora(4, 1, value=1e5), lora(4, 2, value=1e5)]  # 1e5 * sqrt(2): finite in float32, not in float16
    with pytest.raises(NonFiniteTensorError, match=r"merged module `.*layers\.0\.attn\.q`.*float16"):
        aggregate_adapters(big, "replication", dtype=torch.float16)
    agg = StreamingAggregator("replication", dtype=torch.float16)
    for adapter in big:
        agg.add(adapter)
    with pytest.raises(NonFiniteTensorError, match=r"merged module .*float16"):
        agg.result()
    merged = aggregate_adapters(big, "replication", dtype=torch.float32)  # float32 holds it
    assert torch.isfinite(merged.lora_factors(merged.modules[0])[0]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_finite_checks_fall_back_to_every_value_when_a_sum_of_finite_values_overflows(dtype):
    big = torch.full((64,), torch.finfo(dtype).max / 4, dtype=dtype)  # finite; 16x the max in total
    # float16 and float8 are summed to a float32 result, which holds it; the others overflow and fall back
    assert sum_is_finite(big) == (dtype in (torch.float16, torch.float8_e4m3fn))
    check_finite(big, "client 0", "layer.lora_A.weight")  # every value finite: accepted
    assert torch.equal(cast_checked(big.float(), dtype, "layer", "layer.lora_A.weight"), big)
    big[3] = float("nan")
    assert not sum_is_finite(big)
    with pytest.raises(NonFiniteTensorError, match=r"client 0: tensor `layer\.lora_A\.weight` holds 1 NaN"):
        check_finite(big, "client 0", "layer.lora_A.weight")
    with pytest.raises(NonFiniteTensorError, match=r"merged module `layer`: tensor `k` holds 1 NaN"):
        cast_checked(big.float(), dtype, "layer", "k")


def test_float8_clients_merge_the_same_listed_or_streamed():
    def float8(adapter: LoraAdapter) -> LoraAdapter:
        state = {
            key: factor.to(torch.float8_e4m3fn)
            for module in adapter.modules
            for key, factor in zip(adapter.layout.factor_keys(module), adapter.lora_factors(module))
        }
        return LoraAdapter.from_state_dict(adapter.config, state)

    clients = [float8(lora(4, 1)), float8(lora(8, 2))]
    listed = aggregate_adapters(clients, "replication", dtype=torch.float32)
    agg = StreamingAggregator("replication", dtype=torch.float32)
    for client in clients:
        agg.add(client)
    streamed = agg.result()
    for module in listed.modules:
        torch.testing.assert_close(streamed.delta_weight(module), listed.delta_weight(module))
        # float64 reference: slots 0-3 are the two clients' mean, slots 4-7 the rank-8 client's own
        (a4, b4), (a8, b8) = [
            (a.double(), b.double()) for a, b in (c.folded_factors(module) for c in clients)
        ]
        a = torch.cat([(a4 + a8[:4]) / 2, a8[4:]])
        b = torch.cat([(b4 + b8[:, :4]) / 2, b8[:, 4:]], dim=1)
        torch.testing.assert_close(listed.delta_weight(module).double(), b @ a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["list", "stream"])
def test_hetlora_with_1e19_values_names_the_client_and_the_round_goes_on(mode):
    good = [lora(4, 1), lora(8, 2)]
    huge = lora(4, 3, value=1e19)  # finite, but ||B'A'||_F is past float32 (its Gram products are NaN/Inf)
    if mode == "list":
        with pytest.raises(NonFiniteTensorError, match=r"client 2 \(seed3\).*norm"):
            aggregate_adapters([*good, huge], "hetlora")
        merged = aggregate_adapters(good, "hetlora")
    else:
        agg = StreamingAggregator("hetlora")
        agg.add(good[0])
        with pytest.raises(NonFiniteTensorError, match=r"client 1 \(seed3\).*norm"):
            agg.add(huge)
        agg.add(good[1])
        merged = agg.result()
    # float64 reference, module by module: zero-padding with weights p_k ||dW_k||_F (p uniform)
    for module in good[0].modules:
        weights = torch.stack([torch.linalg.matrix_norm(dense(a)[module]) for a in good])
        folded = [a.folded_factors(module) for a in good]
        pad = [
            torch.cat([f[0].double(), torch.zeros(8 - f[0].shape[0], DIM, dtype=torch.float64)])
            for f in folded
        ]
        want = sum(w * a for w, a in zip(weights, pad)) / weights.sum()
        torch.testing.assert_close(merged.lora_factors(module)[0].double(), want, rtol=1e-5, atol=1e-6)


# --- weights whose sums overflow -----------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_weights_of_1e308_stream_to_the_list_result(strategy):
    clients = [lora(4, 1), lora(4, 2), lora(4, 3)]
    weights = [1e308, 5e307, 1e308]  # the running sum overflows float64
    listed = aggregate_adapters(clients, strategy, weights=weights)
    agg = StreamingAggregator(strategy)
    for adapter, weight in zip(clients, weights):
        agg.add(adapter, weight=weight)
    streamed = agg.result()
    p = torch.tensor([2.0, 1.0, 2.0], dtype=torch.float64) / 5
    assert [c["weight"] for c in streamed.provenance["clients"]] == pytest.approx(p.tolist())
    for module in clients[0].modules:
        got_list, got_stream = listed.delta_weight(module).double(), streamed.delta_weight(module).double()
        torch.testing.assert_close(got_stream, got_list, rtol=1e-5, atol=1e-6)
        if strategy in ("zero_padding", "replication", "fedavg", "stacking"):  # equal ranks: the mean update
            want = sum(pk * dense(a)[module] for pk, a in zip(p, clients)) if strategy == "stacking" else None
            if want is None:
                fa = [a.folded_factors(module) for a in clients]
                mean_a = sum(pk * f[0].double() for pk, f in zip(p, fa))
                mean_b = sum(pk * f[1].double() for pk, f in zip(p, fa))
                want = mean_b @ mean_a
            torch.testing.assert_close(got_list, want, rtol=1e-5, atol=1e-6)


def test_huge_example_counts_stream_to_the_list_result():
    clients = [lora(4, 1), lora(8, 2)]
    counts = [10**308, 10**308]
    listed = aggregate_adapters(clients, "replication", num_examples=counts)
    agg = StreamingAggregator("replication")
    for adapter, count in zip(clients, counts):
        agg.add(adapter, num_examples=count)
    streamed = agg.result()
    for module in clients[0].modules:
        torch.testing.assert_close(
            streamed.delta_weight(module), listed.delta_weight(module), rtol=1e-5, atol=1e-6
        )
    assert [c["weight"] for c in streamed.provenance["clients"]] == pytest.approx([0.5, 0.5])


# --- generator sources ---------------------------------------------------------------------------


def test_generator_sources_keep_every_client_in_the_provenance(tmp_path: Path):
    folders = [lora(r, seed).save_pretrained(tmp_path / f"c{seed}") for seed, r in enumerate((2, 4, 8))]
    from_list = aggregate_adapters(folders, "replication")
    from_generator = aggregate_adapters((f for f in folders), "replication")
    want = [(str(f), c["sha256"]) for f, c in zip(folders, from_list.provenance["clients"])]
    got = [(c["source"], c["sha256"]) for c in from_generator.provenance["clients"]]
    assert got == want and from_generator.provenance["num_clients"] == 3
    agg = StreamingAggregator("replication")
    for folder in (f for f in folders):
        agg.add(folder)
    assert [(c["source"], c["sha256"]) for c in agg.result().provenance["clients"]] == want
    # computed from the tensor reads, equal to a plain hash of each file
    files = [hashlib.sha256((f / "adapter_model.safetensors").read_bytes()).hexdigest() for f in folders]
    assert [sha for _, sha in want] == files


# --- the reference is never client 0 -------------------------------------------------------------

HOSTILE_FIRST = {
    "other base model": (dict(base="evil/model"), "base_model_name_or_path"),
    "layers_to_transform=[0]": (dict(layers_to_transform=[0]), "layers_to_transform"),
    "other target_modules": (dict(targets=("q", "k")), "target modules"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_FIRST))
def test_a_hostile_first_client_is_the_outlier_by_majority(case):
    kwargs, culprit = HOSTILE_FIRST[case]
    hostile, honest = lora(4, 0, **kwargs), [lora(4, 1), lora(8, 2)]
    with pytest.raises(IncompatibleAdaptersError, match=r"client 0 \(seed0\)") as caught:
        aggregate_adapters([hostile, *honest], "replication")
    assert culprit in str(caught.value) and "client 1 (seed1)" in str(caught.value)
    merged = aggregate_adapters(honest, "replication")  # the round goes on without it
    assert merged.config.base_model_name_or_path == BASE and merged.config.layers_to_transform is None


@pytest.mark.parametrize("case", sorted(HOSTILE_FIRST))
@pytest.mark.parametrize("given", ["previous", "reference_config", "reference_adapter"])
def test_a_hostile_first_client_is_refused_against_the_federations_reference(case, given):
    kwargs, culprit = HOSTILE_FIRST[case]
    hostile, honest = lora(4, 0, **kwargs), [lora(4, 1), lora(8, 2)]
    federation = LoraConfig(r=8, lora_alpha=8, target_modules=["q", "v"], base_model_name_or_path=BASE)
    options = {
        "previous": {"previous": aggregate_adapters(honest, "replication")},
        "reference_config": {"reference": federation},
        "reference_adapter": {"reference": honest[1]},
    }[given]
    with pytest.raises(IncompatibleAdaptersError, match=r"client 0 \(seed0\)") as caught:
        aggregate_adapters([hostile, honest[0]], "replication", **options)  # 1 vs 1: the reference decides
    assert culprit in str(caught.value)
    agg = StreamingAggregator("replication", **options)
    with pytest.raises(IncompatibleAdaptersError, match=r"client 0 \(seed0\)"):
        agg.add(hostile)
    for adapter in honest:
        agg.add(adapter)
    streamed = agg.result()
    listed = aggregate_adapters(honest, "replication", **options)
    assert streamed.config.base_model_name_or_path == BASE and streamed.config.layers_to_transform is None
    assert sorted(streamed.config.target_modules) == ["q", "v"]
    for module in honest[0].modules:
        torch.testing.assert_close(
            streamed.delta_weight(module), listed.delta_weight(module), rtol=1e-5, atol=1e-6
        )


def test_one_against_one_without_a_reference_names_both():
    with pytest.raises(
        IncompatibleAdaptersError, match=r"client 1 \(seed1\).*client 0 \(seed0\).*no majority"
    ):
        aggregate_adapters([lora(4, 0, base="evil/model"), lora(4, 1)], "replication")


def test_the_global_config_is_the_references_not_client_0s():
    honest = [lora(4, 1), lora(8, 2)]
    previous = aggregate_adapters(honest, "replication")
    # client 0 agrees on every compatibility field but carries another `lora_dropout`: the global
    # config comes from the previous round, not from it
    odd = lora(4, 0)
    odd.config.lora_dropout = 0.77
    merged = aggregate_adapters([odd, *honest], "replication", previous=previous)
    assert merged.config.lora_dropout == previous.config.lora_dropout != 0.77


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_target_rank_larger_than_the_layers_is_refused_before_merging(strategy):
    clients = [lora(4 if strategy == "fedavg" else 2, 0), lora(4, 1)]
    with pytest.raises(RankMismatchError, match=r"`target_rank=10000000` is larger than module .* \(16 x 16"):
        aggregate_adapters(clients, strategy, target_rank=10**7)
    if strategy != "stacking":  # stacking refuses any target_rank when constructed
        stream = StreamingAggregator(strategy, target_rank=10**7)
        with pytest.raises(RankMismatchError, match="`target_rank=10000000`"):
            stream.add(clients[0])
        assert stream.num_clients == 0
    assert (
        aggregate_adapters(
            clients, strategy if strategy != "stacking" else "flexlora", target_rank=16
        ).max_rank
        == 16
    )
