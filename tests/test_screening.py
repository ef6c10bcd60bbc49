"""Screening a round: broken or hostile clients are dropped (or clipped) with a reason; the rest go on."""

from __future__ import annotations

import pytest
from bad_adapters import CASES
from safetensors.torch import load_file, save_file
from testing_utils import write_peft_adapter

import hf_fedlora as hfl
from hf_fedlora.screening import adapter_update_norm, screen_clients


def scale_update(folder, factor):
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    for key in tensors:
        if ".lora_B." in key:
            tensors[key] = tensors[key] * factor
    save_file(tensors, str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("case", [c for c in CASES if "different" not in c.name][:12], ids=lambda c: c.name)
def test_a_broken_client_is_dropped_with_its_error_and_the_round_goes_on(case, tmp_path):
    good = write_peft_adapter(tmp_path / "good", 4, 8, seed=1)
    bad = write_peft_adapter(tmp_path / "bad", 4, 8, seed=2)
    other = write_peft_adapter(tmp_path / "other", 2, 4, seed=3)
    case.corrupt(good, bad)
    accepted, verdicts = screen_clients([good, bad, other])
    assert [v.accepted for v in verdicts] == [True, False, True]
    assert case.error.__name__ in verdicts[1].reason and case.culprit in verdicts[1].reason
    merged = hfl.aggregate_adapters(accepted)
    assert merged.provenance["num_clients"] == 2


def test_incompatible_client_is_dropped(tmp_path):
    good = write_peft_adapter(tmp_path / "good", 4, 8, seed=1)
    alien = write_peft_adapter(tmp_path / "alien", 4, 8, seed=2, base_model_name_or_path="someone/else")
    accepted, verdicts = screen_clients([good, alien])
    assert len(accepted) == 1 and "IncompatibleAdaptersError" in verdicts[1].reason


def test_client_whose_config_targets_other_layers_is_dropped(tmp_path):
    """Same tensors, but a config that tells PEFT to adapt other layers: loading the global adapter
    would follow whichever config wins, so screening refuses it as aggregation does."""
    import json

    good = write_peft_adapter(tmp_path / "good", 4, 8, seed=1)
    odd = write_peft_adapter(tmp_path / "odd", 4, 8, seed=2)
    config = json.loads((odd / "adapter_config.json").read_text())
    config["layers_to_transform"] = [0]
    (odd / "adapter_config.json").write_text(json.dumps(config))
    accepted, verdicts = screen_clients([good, odd])
    assert len(accepted) == 1 and "IncompatibleAdaptersError" in verdicts[1].reason
    assert "layers_to_transform" in verdicts[1].reason


def test_huge_update_is_rejected_relative_to_the_median(tmp_path):
    folders = [write_peft_adapter(tmp_path / f"c{i}", 4, 8, seed=i) for i in range(4)]
    scale_update(folders[2], 1e4)
    accepted, verdicts = screen_clients(folders, max_norm_ratio=10.0)
    assert [v.accepted for v in verdicts] == [True, True, False, True]
    assert "median" in verdicts[2].reason and verdicts[2].update_norm > 100 * verdicts[0].update_norm


def test_absolute_bound_and_clipping(tmp_path):
    folders = [write_peft_adapter(tmp_path / f"c{i}", 4, 8, seed=i) for i in range(2)]
    norms = [adapter_update_norm(hfl.LoraAdapter.from_pretrained(f)) for f in folders]
    _, verdicts = screen_clients(folders, max_update_norm=min(norms) * 1.0001)
    assert sum(v.accepted for v in verdicts) == 1
    clip = min(norms) / 2
    accepted, verdicts = screen_clients(folders, clip_update_norm=clip)
    assert all(v.accepted and v.clipped for v in verdicts)
    for adapter in accepted:
        assert adapter_update_norm(adapter) == pytest.approx(clip, rel=1e-4)


def test_invalid_thresholds_are_refused(tmp_path):
    with pytest.raises(hfl.AdapterError, match="max_norm_ratio"):
        screen_clients([write_peft_adapter(tmp_path / "a", 2, 4, seed=1)], max_norm_ratio=-1)
