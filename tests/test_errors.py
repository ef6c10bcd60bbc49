"""Each kind of bad input raises its own AdapterError subclass, names the culprit, and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_fedlora as hfl
from hf_fedlora.cli import main

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
QUERY0_A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS))


def _different_base(good, bad):
    edit_config(bad, base_model_name_or_path="someone/other-model")


def _different_targets(good, bad):
    import shutil

    from conftest import write_peft_adapter

    shutil.rmtree(bad)
    write_peft_adapter(bad, 4, 8, seed=3, target_modules=("query", "key"))


def _different_layer_shape(good, bad):
    def widen(t):
        t[QUERY0_A] = torch.randn(4, 40)

    edit_tensors(bad, widen)


def _not_lora(good, bad):
    edit_config(bad, peft_type="IA3")


def _dora(good, bad):
    edit_config(bad, use_dora=True)


def _rank_contradiction(good, bad):
    edit_config(bad, r=6)


def _nan(good, bad):
    def poison(t):
        t[QUERY0_A][0, 0] = float("nan")

    edit_tensors(bad, poison)


def _inf(good, bad):
    def poison(t):
        t["base_model.model.classifier.weight"][1, 1] = float("inf")

    edit_tensors(bad, poison)


def _missing_config(good, bad):
    (bad / CONFIG).unlink()


def _missing_weights(good, bad):
    (bad / WEIGHTS).unlink()


def _corrupt_weights(good, bad):
    data = (bad / WEIGHTS).read_bytes()
    (bad / WEIGHTS).write_bytes(data[: len(data) // 2])


def _config_not_json(good, bad):
    (bad / CONFIG).write_text("{ r: 4, this is not json")


def _pickle_only(good, bad):
    torch.save(load_file(str(bad / WEIGHTS)), bad / "adapter_model.bin")
    (bad / WEIGHTS).unlink()


def _absurd_rank(good, bad):
    def huge(t):
        for key in list(t):
            if key.endswith("lora_A.weight"):
                t[key] = torch.randn(64, 32)
            elif key.endswith("lora_B.weight"):
                t[key] = torch.randn(32, 64)

    edit_tensors(bad, huge)
    edit_config(bad, r=64)


CASES = [
    ("different base model", _different_base, hfl.IncompatibleAdaptersError, "base_model_name_or_path"),
    ("different target modules", _different_targets, hfl.IncompatibleAdaptersError, "target modules"),
    ("different layer shape", _different_layer_shape, hfl.IncompatibleAdaptersError, "layer shape"),
    ("non-LoRA PEFT type", _not_lora, hfl.UnsupportedAdapterError, "`peft_type`"),
    ("DoRA", _dora, hfl.UnsupportedAdapterError, "`use_dora`"),
    ("rank contradicts config", _rank_contradiction, hfl.RankMismatchError, "declares rank 6"),
    ("rank larger than the layer", _absurd_rank, hfl.RankMismatchError, "larger than the layer"),
    ("NaN in a LoRA factor", _nan, hfl.NonFiniteTensorError, QUERY0_A),
    ("Inf in the classifier head", _inf, hfl.NonFiniteTensorError, "classifier.weight"),
    ("missing config", _missing_config, hfl.AdapterNotFoundError, CONFIG),
    ("missing weights", _missing_weights, hfl.AdapterNotFoundError, WEIGHTS),
    ("truncated safetensors", _corrupt_weights, hfl.AdapterFormatError, WEIGHTS),
    ("config is not JSON", _config_not_json, hfl.AdapterFormatError, "not valid JSON"),
    ("pickle weights only", _pickle_only, hfl.UnsafeFormatError, "allow_pickle"),
]


@pytest.mark.parametrize("label, corrupt, error, culprit", CASES, ids=[c[0] for c in CASES])
def test_bad_client_is_named_and_nothing_is_written(label, corrupt, error, culprit, make_adapter, tmp_path, capsys):
    good, bad = make_adapter("good", 4, 8, seed=1), make_adapter("bad", 4, 8, seed=2)
    corrupt(good, bad)
    with pytest.raises(error) as caught:
        hfl.aggregate_adapters([good, bad])
    message = str(caught.value)
    assert isinstance(caught.value, hfl.AdapterError) and isinstance(caught.value, ValueError)
    assert "client 1" in message and str(bad) in message, message
    assert culprit in message, message

    out = tmp_path / "global"
    assert main(["aggregate", str(good), str(bad), "--output", str(out)]) == 2
    assert culprit in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".global")]


def test_pickle_is_accepted_only_when_opted_in(make_adapter):
    good, bad = make_adapter("good", 4, 8, seed=1), make_adapter("bad", 4, 8, seed=2)
    _pickle_only(good, bad)
    merged = hfl.aggregate_adapters([good, bad], allow_pickle=True)
    assert set(merged.ranks.values()) == {4}


@pytest.mark.parametrize(
    "weights, fragment",
    [([1.0], "1 entries for 2 clients"), ([1.0, 0.0], "client 1"), ([1.0, -2.0], "client 1"), ([float("nan"), 1.0], "client 0")],
)
def test_invalid_weights(weights, fragment, make_adapter):
    sources = [make_adapter("a", 2, 4, seed=1), make_adapter("b", 4, 8, seed=2)]
    with pytest.raises(hfl.InvalidWeightsError, match=fragment):
        hfl.aggregate_adapters(sources, weights=weights)


def test_unknown_strategy_lists_the_valid_names(make_adapter):
    with pytest.raises(hfl.UnknownStrategyError) as caught:
        hfl.aggregate_adapters([make_adapter("a", 2, 4)], strategy="average")
    assert "'average'" in str(caught.value) and "replication" in str(caught.value)


def test_fedavg_refuses_heterogeneous_ranks(make_adapter):
    with pytest.raises(hfl.IncompatibleAdaptersError, match="needs equal ranks"):
        hfl.aggregate_adapters([make_adapter("a", 2, 4), make_adapter("b", 4, 8)], strategy="fedavg")


def test_missing_folder_is_not_found():
    with pytest.raises(hfl.AdapterNotFoundError, match="no such folder"):
        hfl.aggregate_adapters(["/definitely/not/here"])


def test_failed_save_leaves_no_partial_output(make_adapter, tmp_path, monkeypatch):
    import hf_fedlora.adapters.adapter as adapter_module

    merged = hfl.aggregate_adapters([make_adapter("a", 2, 4, seed=1), make_adapter("b", 4, 8, seed=2)])

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapter_module, "save_file", disk_full)
    with pytest.raises(OSError):
        merged.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
