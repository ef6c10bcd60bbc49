"""LoraAdapter sources, laziness, dtypes and weights; the strategy registry; the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from testing_utils import tiny_bert

import hf_fedlora as hfl
from hf_fedlora import LoraAdapter, aggregate_adapters
from hf_fedlora.adapters.io import SafetensorsStore
from hf_fedlora.cli import main
from hf_fedlora.strategies import ModuleInputs, Strategy, register_strategy

QUERY0 = "base_model.model.bert.encoder.layer.0.attention.self.query"


def test_opening_reads_headers_only(make_adapter, monkeypatch):
    reads = []
    original = SafetensorsStore.get
    monkeypatch.setattr(
        SafetensorsStore, "get", lambda self, key, out=None: reads.append(key) or original(self, key, out)
    )
    adapter = LoraAdapter.from_pretrained(make_adapter("a", 4, 8))
    assert adapter.ranks[QUERY0] == 4 and adapter.num_parameters() > 0
    assert reads == []
    adapter.delta_weight(QUERY0)
    assert sorted(reads) == [QUERY0 + ".lora_A.weight", QUERY0 + ".lora_B.weight"]


def test_aggregation_streams_one_module_at_a_time(make_adapter, monkeypatch):
    """While module m is merged, no client tensor of a later module has been read yet."""
    sources = [make_adapter(n, r, 2 * r, seed=i) for i, (n, r) in enumerate([("a", 2), ("b", 4), ("c", 8)])]
    order = []
    original = SafetensorsStore.get
    monkeypatch.setattr(
        SafetensorsStore, "get", lambda self, key, out=None: order.append(key) or original(self, key, out)
    )
    aggregate_adapters(sources)
    modules = [k.rsplit(".lora_", 1)[0] for k in order if ".lora_" in k]
    first_seen = {m: modules.index(m) for m in dict.fromkeys(modules)}
    last_seen = {m: len(modules) - 1 - modules[::-1].index(m) for m in first_seen}
    ordered = sorted(first_seen, key=first_seen.get)
    for earlier, later in zip(ordered, ordered[1:]):
        assert last_seen[earlier] < first_seen[later]


def test_bf16_inputs_give_bf16_output_computed_in_float32(make_adapter, tmp_path):
    folders = [make_adapter("a", 2, 4, seed=1), make_adapter("b", 8, 16, seed=2)]
    bf16 = []
    for folder in folders:
        adapter = LoraAdapter.from_pretrained(folder)
        bf16.append(adapter.save_pretrained(tmp_path / f"{folder.name}-bf16", dtype=torch.bfloat16))
    merged = aggregate_adapters(bf16, strategy="stacking")
    assert merged.dtype == torch.bfloat16
    clients = [LoraAdapter.from_pretrained(f) for f in bf16]
    want = sum(0.5 * c.delta_weight(QUERY0).double() for c in clients)
    # bf16 output factors: relative error of a bf16 rounding, not of bf16 arithmetic
    torch.testing.assert_close(merged.delta_weight(QUERY0).double(), want, rtol=2e-2, atol=2e-3)
    assert aggregate_adapters(bf16, dtype=torch.float32).dtype == torch.float32


def test_peft_model_and_lora_adapter_sources(make_adapter):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(
        tiny_bert(),
        LoraConfig(
            r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False
        ),
    )
    in_memory = LoraAdapter.from_pretrained(make_adapter("b", 8, 16, seed=2))
    merged = aggregate_adapters([peft_model, in_memory], strategy="stacking")
    from_model = LoraAdapter.from_peft_model(peft_model)
    want = 0.5 * from_model.delta_weight(QUERY0) + 0.5 * in_memory.delta_weight(QUERY0)
    torch.testing.assert_close(merged.delta_weight(QUERY0), want, rtol=1e-5, atol=1e-6)


def test_example_counts_from_provenance_become_weights(make_adapter, tmp_path):
    saved = []
    for name, rank, count in (("a", 2, 30), ("b", 4, 10)):
        adapter = LoraAdapter.from_pretrained(make_adapter(name, rank, 8, seed=rank))
        adapter.num_examples = count
        saved.append(adapter.save_pretrained(tmp_path / f"{name}-counted"))
    merged = aggregate_adapters(saved)
    with pytest.raises(TypeError):
        aggregate_adapters(saved, "replication", [1.0, 1.0])  # weights and later arguments are keyword-only
    assert [c["weight"] for c in merged.provenance["clients"]] == [0.75, 0.25]
    assert merged.provenance["num_examples"] == 40


def test_previous_global_fills_slots_no_client_owns(make_adapter):
    previous = aggregate_adapters([make_adapter("big", 8, 8, seed=1)])
    merged = aggregate_adapters([make_adapter("small", 2, 4, seed=2)], previous=previous)
    assert merged.ranks[QUERY0] == 8
    a, b = merged.folded_factors(QUERY0)
    pa, pb = previous.folded_factors(QUERY0)
    torch.testing.assert_close(a[2:], pa[2:])
    torch.testing.assert_close(b[:, 2:], pb[:, 2:])


class TestRegistry:
    def test_a_new_rule_is_one_class(self, make_adapter, monkeypatch):
        from hf_fedlora.strategies import registry

        monkeypatch.setattr(registry, "_STRATEGIES", dict(registry._STRATEGIES))

        @register_strategy
        class FirstClientStrategy(Strategy):
            name = "first_client_for_test"
            paper = "test"

            def aggregate_module(self, inputs: ModuleInputs):
                return inputs.a[0], inputs.b[0]

        assert "first_client_for_test" in hfl.list_strategies()
        first = LoraAdapter.from_pretrained(make_adapter("a", 2, 4, seed=1))
        merged = aggregate_adapters(
            [first, make_adapter("b", 4, 8, seed=2)], strategy="first_client_for_test"
        )
        torch.testing.assert_close(merged.delta_weight(QUERY0), first.delta_weight(QUERY0))

    def test_bad_names_and_duplicates_are_refused(self):
        class Upper(Strategy):
            name = "Replication2"

            def aggregate_module(self, inputs):
                raise NotImplementedError

        class Duplicate(Upper):
            name = "replication"

        with pytest.raises(hfl.AdapterError, match="snake_case"):
            register_strategy(Upper)
        with pytest.raises(hfl.AdapterError, match="already registered"):
            register_strategy(Duplicate)
        with pytest.raises(hfl.AdapterError, match="not a subclass"):
            register_strategy(dict)

        class BadSendBack(Upper):
            name = "bad_send_back_for_test"
            send_back = "pad"

        with pytest.raises(
            hfl.AdapterError, match="`BadSendBack.send_back` must be one of 'truncate', 'svd'"
        ):
            register_strategy(BadSendBack)

    def test_to_rank_refuses_unknown_send_back_methods(self, make_adapter):
        with pytest.raises(hfl.AdapterError, match="`method` must be one of 'truncate', 'svd', got 'pad'"):
            LoraAdapter.from_pretrained(make_adapter("a", 2, 4)).to_rank(2, method="pad")


def test_cli_aggregate_then_inspect(make_adapter, tmp_path, capsys):
    out = tmp_path / "global"
    sources = [str(make_adapter("a", 2, 4, seed=1)), str(make_adapter("b", 8, 16, seed=2))]
    assert (
        main(["aggregate", *sources, "--strategy", "flexlora", "--target-rank", "4", "--output", str(out)])
        == 0
    )
    assert "ranks [4]" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["modules"][QUERY0] == {"rank": 4, "scale": 1.0, "shape_A": [4, 32], "shape_B": [32, 4]}
    assert summary["provenance"]["strategy"] == "flexlora"
    assert main(["inspect", str(out)]) == 0
    assert "4 LoRA modules" in capsys.readouterr().out


def test_cli_help_explains_strategies(capsys):
    with pytest.raises(SystemExit):
        main(["aggregate", "--help"])
    text = capsys.readouterr().out
    assert "replication" in text and "--target-rank" in text
