"""The recipe with --push_to_hub against the local Hub-compatible server: every round becomes a
tagged commit with a model card, pulled back bit-identical; a resumed run pushes no round twice."""

from __future__ import annotations

import hashlib

from hub_server import LocalHub
from testing_utils import HUB_TOKEN, recipe_args, run_recipe

from hf_fedlora import pull_round
from hf_fedlora.hub import list_rounds

REPO = "user/fed-recipe"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_recipe_pushes_every_round_and_resume_skips_pushed_ones(
    hub_env: LocalHub, tiny_model_dir, shared_data, tmp_path
):
    out = tmp_path / "run"
    options = dict(push_to_hub=True, hub_model_id=REPO, hub_token=HUB_TOKEN)
    run_recipe(recipe_args(tiny_model_dir, shared_data, out, rounds=1, **options))
    run_recipe(
        recipe_args(tiny_model_dir, shared_data, out, rounds=2, resume=True, **options)
    )  # continue to round 2

    assert list_rounds(REPO, token=HUB_TOKEN, endpoint=hub_env.url) == [1, 2]
    commits = [r for r in hub_env.requests("POST", "/commit/") if r.status == 200]
    assert len(commits) == 2, "one commit per round, none repeated on resume"
    for n in (1, 2):
        pulled = pull_round(REPO, n, token=HUB_TOKEN, endpoint=hub_env.url)
        for name in ("adapter_model.safetensors", "adapter_config.json", "fedlora_provenance.json"):
            assert _sha(pulled.directory / name) == _sha(out / f"round-{n:04d}" / name), name
        card = (pulled.directory / "README.md").read_text()
        assert "library_name: peft" in card and "federated-learning" in card and "replication" in card
    assert HUB_TOKEN not in (out / "metrics.jsonl").read_text()
