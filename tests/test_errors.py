"""Each kind of bad input (the gallery in bad_adapters.py) raises its own AdapterError subclass, names
the culprit, and writes nothing."""

from __future__ import annotations

import pytest
from bad_adapters import CASES, DOC, _pickle_only, markdown_table, replace_section, run_gallery

import hf_fedlora as hfl
from hf_fedlora.cli import main


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_client_is_named_and_nothing_is_written(case, tmp_path, capsys):
    from testing_utils import write_peft_adapter

    good = write_peft_adapter(tmp_path / "good", 4, 8, seed=1)
    bad = write_peft_adapter(tmp_path / "bad", 4, 8, seed=2)
    case.corrupt(good, bad)
    with pytest.raises(case.error) as caught:
        hfl.aggregate_adapters([good, bad])
    message = str(caught.value)
    assert isinstance(caught.value, hfl.AdapterError) and isinstance(caught.value, ValueError)
    assert "client 1" in message and str(bad) in message, message
    assert case.culprit in message, message

    out = tmp_path / "global"
    assert main(["aggregate", str(good), str(bad), "--output", str(out)]) == 2
    assert case.culprit in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".global")]


def test_reliability_doc_lists_every_gallery_case_with_its_outcome():
    table = markdown_table(run_gallery())
    assert "FAILED" not in table
    assert replace_section(DOC.read_text(), table) == DOC.read_text(), "run `python tests/bad_adapters.py`"


def test_pickle_is_accepted_only_when_opted_in(make_adapter):
    good, bad = make_adapter("good", 4, 8, seed=1), make_adapter("bad", 4, 8, seed=2)
    _pickle_only(good, bad)
    merged = hfl.aggregate_adapters([good, bad], allow_pickle=True)
    assert set(merged.ranks.values()) == {4}


@pytest.mark.parametrize(
    "weights, fragment",
    [
        ([1.0], "1 entries for 2 clients"),
        ([1.0, 0.0], "client 1"),
        ([1.0, -2.0], "client 1"),
        ([float("nan"), 1.0], "client 0"),
    ],
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


@pytest.mark.parametrize("source", ["../x", "user/repo..x", "user/a/b", "a--b", "user/re po@main"])
def test_a_missing_folder_that_is_no_repo_id_is_not_downloaded(source):
    with pytest.raises(hfl.AdapterNotFoundError, match="is not a valid Hub repo id"):
        hfl.LoraAdapter.from_pretrained(source)


def test_failed_save_leaves_no_partial_output(make_adapter, tmp_path, monkeypatch):
    import hf_fedlora.adapters.adapter as adapter_module

    merged = hfl.aggregate_adapters([make_adapter("a", 2, 4, seed=1), make_adapter("b", 4, 8, seed=2)])

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapter_module, "save_file", disk_full)
    with pytest.raises(OSError):
        merged.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.parametrize(
    "strategy, target_rank",
    [
        (s, t) for s in hfl.list_strategies() for t in (None, 2) if not (s == "stacking" and t)
    ],  # stacking: no target
)
def test_non_finite_client_is_named_by_every_strategy(strategy, target_rank, tmp_path):
    """Rules that carry every input value into the result check each merged module once and look for
    the culprit only then; the others (or a ``target_rank`` that cuts clients) check every input.
    Either way the NaN client is named, even when the NaN sits in a slot the output does not keep."""
    import torch
    from safetensors.torch import load_file, save_file
    from testing_utils import write_peft_adapter

    ranks = (4, 4) if strategy == "fedavg" else (2, 4)
    good = write_peft_adapter(tmp_path / "good", ranks[0], 8, seed=1)
    bad = write_peft_adapter(tmp_path / "bad", ranks[1], 8, seed=2)
    path = bad / "adapter_model.safetensors"
    state = load_file(str(path))
    key = sorted(k for k in state if k.endswith("lora_A.weight"))[-1]  # the last module, a late slot
    state[key][-1, 0] = float("nan")
    save_file(state, str(path))
    with pytest.raises(hfl.NonFiniteTensorError, match=r"client 1 .*" + key.replace(".", r"\.")):
        hfl.aggregate_adapters([good, bad], strategy=strategy, target_rank=target_rank)
    assert torch.isfinite(load_file(str(good / "adapter_model.safetensors"))[key]).all()
