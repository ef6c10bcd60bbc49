"""Push rounds to a local Hub-compatible server with the real huggingface_hub client, and pull
them back with our API, with ``aggregate_adapters`` and with plain ``PeftModel.from_pretrained``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from hub_server import LocalHub
from testing_utils import HUB_TOKEN, tiny_bert, write_peft_adapter

from hf_fedlora import LoraAdapter, aggregate_adapters, pull_round
from hf_fedlora.constants import ADAPTER_CONFIG_NAME, ADAPTER_SAFETENSORS_NAME, PROVENANCE_NAME
from hf_fedlora.hub import HubPushError, list_rounds, push_round, round_tag

REPO = "user/fed-tiny"
CARD = {
    "base_model": "sentence-transformers/all-MiniLM-L6-v2",
    "num_clients": 2,
    "clients_per_round": 2,
    "task": "sst2",
}


@pytest.fixture
def rounds(tmp_path: Path) -> dict[int, Path]:
    """Two rounds' global adapters written as the recipe writes them (aggregated, with provenance)."""
    a = write_peft_adapter(tmp_path / "clients" / "a", r=2, lora_alpha=4, seed=1)
    b = write_peft_adapter(tmp_path / "clients" / "b", r=4, lora_alpha=8, seed=2)
    out = {}
    previous = None
    for n in (1, 2):
        g = aggregate_adapters([a, b], strategy="replication", num_examples=[10 * n, 30], previous=previous)
        out[n] = g.save_pretrained(tmp_path / "run" / round_tag(n))
        previous = g
    return out


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def _push(round_dir: Path, n: int, hub: LocalHub, **kw):
    history = [{"round": i, "eval_accuracy": 0.5 + i / 10, "eval_loss": 1.0 / i} for i in range(1, n + 1)]
    return push_round(
        round_dir, REPO, n, token=HUB_TOKEN, endpoint=hub.url, card_info=CARD, metrics_history=history, **kw
    )


def test_round_pushed_tagged_and_pulled_back_bit_identical(rounds, hub_env: LocalHub) -> None:
    sha = _push(rounds[1], 1, hub_env)

    repo = hub_env.repos[REPO]
    assert repo.tags == {"round-0001": sha} and repo.branches["main"] == sha
    assert len(hub_env.commits(REPO)) == 2  # the repo's initial commit + round 1
    assert hub_env.count("POST", "/commit/") == 1
    assert set(repo.commits[sha].files) == {
        ".gitattributes",
        ADAPTER_CONFIG_NAME,
        ADAPTER_SAFETENSORS_NAME,
        PROVENANCE_NAME,
        "README.md",
    }
    local = _bytes(rounds[1])
    assert {name: hub_env.file_bytes(REPO, "round-0001", name) for name in local} == local
    assert list_rounds(REPO, endpoint=hub_env.url) == [1]

    pulled = pull_round(REPO, 1, endpoint=hub_env.url)
    assert pulled.label == f"{REPO}@round-0001"
    assert (pulled.directory / ADAPTER_SAFETENSORS_NAME).read_bytes() == local[ADAPTER_SAFETENSORS_NAME]
    assert pulled.provenance["strategy"] == "replication"
    # the core's source resolution (HF_ENDPOINT, as users set it) gives the same bytes
    by_id = LoraAdapter.from_pretrained(REPO, revision="round-0001")
    assert (by_id.directory / ADAPTER_SAFETENSORS_NAME).read_bytes() == local[ADAPTER_SAFETENSORS_NAME]
    assert by_id.sha256() == LoraAdapter.from_pretrained(rounds[1]).sha256()


def test_peft_model_from_pretrained_loads_the_tagged_round(rounds, hub_env: LocalHub) -> None:
    from peft import PeftModel

    _push(rounds[1], 1, hub_env)
    _push(rounds[2], 2, hub_env)
    for n in (1, 2):
        model = PeftModel.from_pretrained(tiny_bert(), REPO, revision=round_tag(n))
        loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        expected = LoraAdapter.from_pretrained(rounds[n])
        for module in expected.modules:
            a, b = expected.lora_factors(module)
            assert torch.equal(loaded[f"{module}.lora_A.default.weight"], a)
            assert torch.equal(loaded[f"{module}.lora_B.default.weight"], b)
    # each round's weights really came over HTTP (the identical config blob is cached once)
    assert hub_env.count("GET", ADAPTER_SAFETENSORS_NAME) == 2


def test_two_rounds_give_two_commits_and_two_tags(rounds, hub_env: LocalHub) -> None:
    sha1 = _push(rounds[1], 1, hub_env)
    sha2 = _push(rounds[2], 2, hub_env)

    assert sha1 != sha2
    assert hub_env.repos[REPO].tags == {"round-0001": sha1, "round-0002": sha2}
    assert [c.sha for c in hub_env.commits(REPO)][:2] == [sha2, sha1]
    assert len(hub_env.commits(REPO)) == 3
    assert [c.title for c in hub_env.commits(REPO)][:2] == [
        "Round 2: global adapter (replication)",
        "Round 1: global adapter (replication)",
    ]
    assert list_rounds(REPO, endpoint=hub_env.url) == [1, 2]
    assert (
        pull_round(REPO, 1, endpoint=hub_env.url).sha256() == LoraAdapter.from_pretrained(rounds[1]).sha256()
    )
    assert (
        pull_round(REPO, 2, endpoint=hub_env.url).sha256() == LoraAdapter.from_pretrained(rounds[2]).sha256()
    )


def test_model_card_metadata_federation_metrics_and_loading(rounds, hub_env: LocalHub) -> None:
    from huggingface_hub import ModelCard

    _push(rounds[1], 1, hub_env)
    _push(rounds[2], 2, hub_env)
    text = hub_env.file_bytes(REPO, "round-0002", "README.md").decode()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == CARD["base_model"]
    assert set(meta["tags"]) >= {"lora", "federated-learning", "hf-fedlora", "replication"}
    assert ModelCard(text).data.library_name == "peft"  # huggingface_hub parses it
    assert "| clients | 2 (2 sampled per round) |" in text
    assert "r=2: 1 client, r=4: 1 client" in text
    assert "| round | eval_accuracy | eval_loss |" in text
    assert "| 1 | 0.6000 | 1.0000 |" in text and "| 2 | 0.7000 | 0.5000 |" in text
    assert f'PeftModel.from_pretrained(base, "{REPO}", revision="round-0002")' in text
    assert "AutoModelForSequenceClassification" in text
    round1 = hub_env.file_bytes(REPO, "round-0001", "README.md").decode()
    assert "| 2 | 0.7000" not in round1 and 'revision="round-0001"' in round1


def test_model_card_of_an_output_folder_shows_the_run(rounds) -> None:
    from huggingface_hub import ModelCard

    from hf_fedlora.hub.model_card import build_model_card

    adapter = LoraAdapter.from_pretrained(rounds[2])
    info = {
        **CARD,
        "strategy": "replication",
        "rounds": 2,
        "partition": "dirichlet",
        "seed": 0,
        "num_labels": 4,
        "eval_metric": "accuracy",
        "command": "accelerate launch recipes/fed_glue.py",
        "summary": "round  acc\n1  0.5",
        "plot": "metrics.png",
    }
    text = build_model_card(
        None, round_index=2, config=adapter.config, provenance=adapter.provenance, card_info=info
    )
    assert text == build_model_card(
        None, round_index=2, config=adapter.config, provenance=adapter.provenance, card_info=info
    )
    assert text.startswith("---\nlibrary_name: peft\n")
    assert ModelCard(text).data.tags == ["lora", "federated-learning", "hf-fedlora", "replication"]
    assert "| data partition | dirichlet |" in text and "| rounds | 2 |" in text and "| seed | 0 |" in text
    assert "```text\nround  acc\n1  0.5\n```" in text and "![accuracy by round](metrics.png)" in text
    assert 'from_pretrained("sentence-transformers/all-MiniLM-L6-v2", num_labels=4)' in text
    assert 'PeftModel.from_pretrained(base, "round-0002")' in text
    assert "```bash\naccelerate launch recipes/fed_glue.py\n```" in text


def test_aggregate_adapters_from_hub_repo_ids(tmp_path: Path, hub_env: LocalHub) -> None:
    folders = {
        "client-a": write_peft_adapter(tmp_path / "a", r=2, lora_alpha=4, seed=1),
        "client-b": write_peft_adapter(tmp_path / "b", r=4, lora_alpha=8, seed=2),
    }
    for name, folder in folders.items():
        sha = LoraAdapter.from_pretrained(folder).push_to_hub(
            f"user/{name}", token=HUB_TOKEN, endpoint=hub_env.url
        )
        assert hub_env.repos[f"user/{name}"].branches["main"] == sha

    from_hub = aggregate_adapters(["user/client-a@main", "user/client-b@main"], strategy="replication")
    local = aggregate_adapters(list(folders.values()), strategy="replication")
    assert from_hub.modules == local.modules
    for key, value in local.state_dict().items():
        assert torch.equal(from_hub.state_dict()[key], value), key


def test_push_to_hub_with_revision_tag_and_existing_tag_refused(rounds, hub_env: LocalHub) -> None:
    adapter = LoraAdapter.from_pretrained(rounds[1])
    sha = adapter.push_to_hub(
        "user/single", revision_tag="v1", token=HUB_TOKEN, endpoint=hub_env.url, private=True
    )
    assert hub_env.repos["user/single"].tags == {"v1": sha} and hub_env.repos["user/single"].private
    with pytest.raises(HubPushError, match="tag 'v1' already exists on 'user/single'"):
        adapter.push_to_hub("user/single", revision_tag="v1", token=HUB_TOKEN, endpoint=hub_env.url)
    assert hub_env.count("POST", "/commit/") == 1


def test_private_repo_needs_the_token_to_pull(rounds, hub_env: LocalHub) -> None:
    from hf_fedlora import AdapterNotFoundError

    _push(rounds[1], 1, hub_env, private=True)
    assert hub_env.repos[REPO].private
    with pytest.raises(AdapterNotFoundError, match="private: pass `token`"):
        pull_round(REPO, 1, endpoint=hub_env.url)
    assert list_rounds(REPO, endpoint=hub_env.url) == []
    assert list_rounds(REPO, endpoint=hub_env.url, token=HUB_TOKEN) == [1]
    pulled = pull_round(REPO, 1, endpoint=hub_env.url, token=HUB_TOKEN)
    assert pulled.sha256() == LoraAdapter.from_pretrained(rounds[1]).sha256()


def test_missing_round_is_a_clear_error(rounds, hub_env: LocalHub) -> None:
    from hf_fedlora import AdapterNotFoundError

    _push(rounds[1], 1, hub_env)
    with pytest.raises(AdapterNotFoundError, match=r"has no tag 'round-0007'.*list_rounds"):
        pull_round(REPO, 7, endpoint=hub_env.url)


def test_card_refused_for_unknown_base_model_is_pushed_without_it(rounds, hub_env: LocalHub, caplog) -> None:
    hub_env.known_models = {"bert-base-uncased"}  # the real Hub refuses base_model ids it does not host
    with caplog.at_level("WARNING", logger="hf_fedlora.hub"):
        sha = _push(rounds[1], 1, hub_env)
    assert "refused the model card's metadata" in caplog.text
    text = hub_env.file_bytes(REPO, sha, "README.md").decode()
    meta = yaml.safe_load(text.split("---")[1])
    assert "base_model" not in meta and meta["library_name"] == "peft"
    assert f"`{CARD['base_model']}`" in text  # still named in the description
    assert hub_env.repos[REPO].tags == {"round-0001": sha}


def test_push_round_refuses_a_folder_that_is_not_a_lora_adapter(
    rounds, tmp_path: Path, hub_env: LocalHub
) -> None:
    from hf_fedlora import AdapterFormatError, AdapterNotFoundError, UnsupportedAdapterError

    with pytest.raises(AdapterNotFoundError, match="no such folder"):
        _push(tmp_path / "missing", 1, hub_env)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ADAPTER_CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterFormatError, match=ADAPTER_CONFIG_NAME):
        _push(broken, 1, hub_env)
    (broken / ADAPTER_CONFIG_NAME).write_text((rounds[1] / ADAPTER_CONFIG_NAME).read_text())
    with pytest.raises(AdapterNotFoundError, match=ADAPTER_SAFETENSORS_NAME):
        _push(broken, 1, hub_env)
    (broken / ADAPTER_SAFETENSORS_NAME).write_bytes((rounds[1] / ADAPTER_SAFETENSORS_NAME).read_bytes()[:100])
    with pytest.raises(AdapterFormatError, match="not a valid safetensors file"):
        _push(broken, 1, hub_env)
    (broken / ADAPTER_CONFIG_NAME).write_text('{"peft_type": "IA3", "target_modules": ["query"]}')
    with pytest.raises(UnsupportedAdapterError, match="LoRA adapters only"):
        _push(broken, 1, hub_env)
    assert hub_env.count("POST", "/commit/") == 0 and REPO not in hub_env.repos
