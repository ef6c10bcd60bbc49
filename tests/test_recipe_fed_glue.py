"""End-to-end tests of ``recipes/fed_glue.py`` on a tiny BERT and a few hundred real examples.

A 2-round run yields PEFT-loadable adapters and the JSONL; an interrupted run resumes to the same
tensors; ``accelerate launch`` with 2 processes gives the same global adapter as 1 process.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from testing_utils import (
    RECIPE,
    REPO_ROOT,
    adapter_tensors,
    killed_before_recording_round,
    load_recipe,
    read_metrics,
    recipe_args,
    run_recipe,
)

from hf_fedlora.federation import ClientArguments, FedArgumentParser, RoundRecord, train_client
from hf_fedlora.federation.data import load_task

CONFIGS = REPO_ROOT / "recipes" / "configs"
recipe = load_recipe()


def test_two_round_run_writes_loadable_adapters_and_jsonl(baseline, tiny_model_dir, shared_data):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    for name in (
        "round-0000",
        "round-0001",
        "round-0002",
        "metrics.jsonl",
        "state.json",
        "metrics.png",
        "README.md",
    ):
        assert (baseline / name).exists(), name
    assert not (baseline / "_exchange").exists()
    assert list(baseline.rglob("events.out.tfevents*")), "tensorboard tracker wrote nothing"

    records = read_metrics(baseline)
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert {"clients", "eval", "seconds", "cumulative_bytes", "global_rank", "strategy"} <= set(record)
        assert set(record["seconds"]) == {"train", "aggregate", "eval", "wall"}
        assert len(record["clients"]) == 3
        for client in record["clients"]:
            assert client["rank"] == [2, 4, 8][client["client"] % 3]
            assert client["bytes_up"] > 0 and client["bytes_down"] > 0 and math.isfinite(client["loss"])
        assert 0.0 <= record["eval"]["accuracy"] <= 1.0
        assert record["global_rank"] == 8
    assert records[1]["cumulative_bytes"] == records[0]["bytes_round"] + records[1]["bytes_round"]
    assert (baseline / "README.md").read_text().startswith("---\nlibrary_name: peft")
    assert (baseline / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # PEFT itself loads the round: every saved tensor lands in the model, nothing is missing.
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, baseline / "round-0002").eval()
    saved = adapter_tensors(baseline / "round-0002")
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert any("classifier" in k for k in saved), "the trained head travels with the adapter"

    # and reproduces the accuracy the recipe logged for that round
    data = load_task(recipe.parse(recipe_args(tiny_model_dir, shared_data, baseline))[1], seed=7).validation
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        batch = tokenizer(data.texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
        predictions = model(**batch).logits.argmax(-1).numpy()
    assert float(np.mean(predictions == data.labels)) == pytest.approx(
        records[1]["eval"]["accuracy"], abs=1 / 64
    )


def test_existing_output_is_refused_and_resume_checks_options(baseline, tiny_model_dir, shared_data):
    with pytest.raises(FileExistsError, match="--resume"):
        run_recipe(recipe_args(tiny_model_dir, shared_data, baseline))
    with pytest.raises(ValueError, match="`strategy`: saved 'replication', now 'zero_padding'"):
        run_recipe(recipe_args(tiny_model_dir, shared_data, baseline, resume=True, strategy="zero_padding"))


def test_a_run_saved_before_an_option_existed_resumes(baseline, tiny_model_dir, shared_data, tmp_path):
    import shutil

    old = tmp_path / "old_run"
    shutil.copytree(baseline, old)
    state = json.loads((old / "state.json").read_text())
    del (
        state["fingerprint"]["quality_scoring"],
        state["fingerprint"]["clip_update_norm"],
    )  # options added later
    (old / "state.json").write_text(json.dumps(state))
    result = run_recipe(
        recipe_args(tiny_model_dir, shared_data, old, resume=True, rounds=3)
    )  # one more round
    assert [r.round for r in result.records] == [1, 2, 3]
    with pytest.raises(ValueError, match="`quality_scoring`: saved 'sampled', now 'all'"):
        run_recipe(
            recipe_args(tiny_model_dir, shared_data, old, resume=True, rounds=4, quality_scoring="all")
        )


def test_resume_after_interruption_equals_uninterrupted_run(
    baseline, tiny_model_dir, shared_data, tmp_path, monkeypatch
):
    out = tmp_path / "interrupted"
    with killed_before_recording_round(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        run_recipe(recipe_args(tiny_model_dir, shared_data, out))
    assert json.loads((out / "state.json").read_text())["completed_round"] == 1
    assert (out / "round-0002").is_dir()

    run_recipe(recipe_args(tiny_model_dir, shared_data, out, resume=True))
    # Equal up to CPU thread-scheduling noise (two identical fresh runs on a loaded machine differ
    # by ~1e-8); a resume that changed anything (data, seeds, ranks, previous adapter) differs by >1e-3.
    resumed, reference = adapter_tensors(out / "round-0002"), adapter_tensors(baseline / "round-0002")
    assert set(resumed) == set(reference)
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=key)
    got, want = read_metrics(out), read_metrics(baseline)
    assert [r["round"] for r in got] == [1, 2]
    for g, w in zip(got, want):
        assert g["eval"] == pytest.approx(w["eval"])
        assert [(c["client"], c["rank"]) for c in g["clients"]] == [
            (c["client"], c["rank"]) for c in w["clients"]
        ]
        assert [c["loss"] for c in g["clients"]] == pytest.approx([c["loss"] for c in w["clients"]], abs=1e-6)


def assert_two_processes_trained(out, one_process) -> None:
    """The main process folds its own clients in memory; a second process's clients come through
    ``_exchange/`` folders, so the merge's provenance shows whether one really ran."""
    for run, exchanged in ((out, True), (one_process, False)):
        sources = [
            c["source"]
            for c in json.loads((run / "round-0001" / "fedlora_provenance.json").read_text())["clients"]
        ]
        assert any("_exchange" in s for s in sources) == exchanged, sources


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_same_global_adapter_as_one(baseline, tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "k2"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO_ROOT / "recipes" / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port",
        str(_free_port()),
        str(RECIPE),
        *recipe_args(tiny_model_dir, shared_data, out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_two_processes_trained(out, baseline)
    for name in ("round-0001", "round-0002"):
        two, one = adapter_tensors(out / name), adapter_tensors(baseline / name)
        assert set(two) == set(one)
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    got, want = read_metrics(out), read_metrics(baseline)
    assert [[c["client"] for c in r["clients"]] for r in got] == [
        [c["client"] for c in r["clients"]] for r in want
    ]
    assert [r["eval"]["accuracy"] for r in got] == [r["eval"]["accuracy"] for r in want]


def test_paper_setup_upgrades_the_best_scored_clients(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "paper"
    run_recipe(
        recipe_args(
            tiny_model_dir,
            shared_data,
            out,
            task="ag_news",
            data_dir=shared_data / "ag_news",
            max_train_samples=400,
            num_clients=6,
            clients_per_round=3,
            partition="high_quality",
            high_quality_fraction=0.2,
            quality_upgrade=True,
            low_rank=2,
            high_rank=6,
            upgrade_fraction=0.34,
            quality_eval_samples=32,
        )
    )
    # the card's "Load a round" snippet gives AG News its 4 labels (PEFT fails to load it otherwise)
    assert "num_labels=4" in (out / "README.md").read_text()
    first, second = read_metrics(out)
    assert all(c["rank"] == 2 and "quality_score" in c for c in first["clients"])
    ranked = sorted(first["clients"], key=lambda c: (-c["quality_score"], c["client"]))
    upgraded = {c["client"] for c in ranked[:2]}  # ceil(0.34 * 3) = 2
    ranks = json.loads((out / "state.json").read_text())["ranks"]
    assert {c for c, r in enumerate(ranks) if r == 6} == upgraded
    assert all(c["rank"] == ranks[c["client"]] for c in second["clients"])
    assert set(first["eval"]) == {"accuracy", "f1", "score"}  # 4-class: accuracy and macro F1
    assert first["global_rank"] == second["global_rank"] == 6


def test_failed_hub_push_is_recorded_and_the_round_is_kept(
    tiny_model_dir, shared_data, tmp_path, monkeypatch
):
    import hf_fedlora.hub

    def failing_push(round_dir, repo_id, round_index, **kwargs):
        raise ConnectionError(f"could not reach the Hub with token {kwargs['token']}")

    monkeypatch.setattr(hf_fedlora.hub, "push_round", failing_push)
    out = tmp_path / "push"
    run_recipe(
        recipe_args(
            tiny_model_dir,
            shared_data,
            out,
            rounds=1,
            push_to_hub=True,
            hub_model_id="me/run",
            hub_token="hf_secret",
        )
    )
    (record,) = read_metrics(out)
    assert record["hub_push"]["ok"] is False
    assert "ConnectionError" in record["hub_push"]["error"] and "hf_secret" not in record["hub_push"]["error"]
    assert (out / "round-0001" / "adapter_model.safetensors").is_file()


def test_train_client_is_reusable_and_seeded(tiny_model_dir, shared_data):
    from hf_fedlora.federation import get_trainer
    from hf_fedlora.federation.client import _TRAINERS

    data = load_task(recipe.parse(recipe_args(tiny_model_dir, shared_data, Path("unused")))[1], seed=0)
    shard = data.train.select(range(40))
    args = ClientArguments(local_steps=2, per_device_train_batch_size=8)
    before = set(_TRAINERS)
    first, metrics = train_client(str(tiny_model_dir), None, 4, 8.0, shard, args, seed=3, max_seq_length=32)
    again, _ = train_client(str(tiny_model_dir), None, 4, 8.0, shard, args, seed=3, max_seq_length=32)
    assert first.num_examples == 40 and metrics["num_steps"] == 2 and set(first.ranks.values()) == {4}
    assert all(torch.equal(first.state_dict()[k], again.state_dict()[k]) for k in first.state_dict())
    # a rank-4 adapter given to a rank-2 client is cut to its view first
    smaller, _ = train_client(str(tiny_model_dir), first, 2, 8.0, shard, args, seed=4, max_seq_length=32)
    assert set(smaller.ranks.values()) == {2}
    # the three calls shared one cached base model, which now holds both rank slots
    assert len(set(_TRAINERS) - before) <= 1
    trainer = get_trainer(
        str(tiny_model_dir),
        2,
        target_modules=("query", "value"),
        lora_alpha=8.0,
        lora_dropout=0.05,
        use_rslora=False,
        is_regression=False,
        config_overrides=None,
        device="cpu",
    )
    assert {"r4", "r2"} <= set(trainer.model.peft_config)


@pytest.mark.parametrize(
    "config", sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("instruct_"))
)  # instruct_*.yaml are recipes/fed_instruct.py's (tests/test_recipe_fed_instruct.py)
def test_shipped_configs_parse_and_point_at_real_data(config, shared_data, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    model_args, data_args, client_args, fed_args = recipe.parse(["--config", str(CONFIGS / config)])
    assert data_args.data_dir is None or (REPO_ROOT / data_args.data_dir).is_dir()
    assert fed_args.output_dir.startswith("outputs/")


def test_yaml_gives_defaults_cli_overrides_and_unknown_keys_fail(tmp_path):
    _, data_args, client_args, fed_args = recipe.parse(
        ["--config", str(CONFIGS / "quickstart.yaml"), "--rounds", "2", "--strategy", "zero_padding"]
    )
    assert (data_args.task, fed_args.num_clients, fed_args.ranks) == ("sst2", 10, "4,8,16")
    assert (fed_args.rounds, fed_args.strategy) == (2, "zero_padding")
    assert client_args.target_modules == ["query", "value"]
    paper = recipe.parse(["--config", str(CONFIGS / "ag_news_paper.yaml")])[3]
    assert (paper.num_clients, paper.clients_per_round, paper.partition) == (100, 10, "high_quality")
    assert (paper.quality_upgrade, paper.low_rank, paper.high_rank, paper.high_quality_fraction) == (
        True,
        5,
        20,
        0.1,
    )

    bad = tmp_path / "bad.yaml"
    bad.write_text("task: sst2\nnum_client: 3\nlearning_rte: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rte', 'num_client'\]"):
        FedArgumentParser().parse_args_and_config(["--config", str(bad)])
    env = tmp_path / "env.yaml"
    env.write_text("env:\n  HF_FEDLORA_TEST_VAR: yes-set\nrounds: 3\n")
    assert FedArgumentParser().parse_args_and_config(["--config", str(env)])[3].rounds == 3
    assert os.environ.pop("HF_FEDLORA_TEST_VAR") == "yes-set"


def test_invalid_options_name_the_field():
    with pytest.raises(ValueError, match="`clients_per_round` must be between 1 and `num_clients`"):
        recipe.parse(["--num_clients", "3", "--clients_per_round", "5"])
    with pytest.raises(ValueError, match="unknown aggregation strategy 'avg'"):
        recipe.parse(["--strategy", "avg"])
    assert "hub_token='***'" in repr(recipe.parse(["--hub_token", "hf_abc"])[3])
    assert ClientArguments().target_modules == ["query", "value"]


def test_defaults_that_depend_on_other_options_are_set_by_the_arguments():
    fed_args = recipe.parse(["--push_to_hub", "true", "--output_dir", "outputs/my_run/"])[3]
    assert fed_args.hub_model_id == "my_run"
    assert recipe.parse(["--output_dir", "outputs/my_run"])[3].hub_model_id is None  # not pushing: no repo
    assert (
        ClientArguments(local_steps=0, local_epochs=1.5, per_device_train_batch_size=8).num_local_steps(20)
        == 4
    )


def test_metrics_lines_read_back_as_typed_records(baseline):
    from hf_fedlora.federation import ClientRecord, read_records

    records = read_records(baseline)
    assert [r.to_dict() for r in records] == read_metrics(baseline)  # one format, read and written losslessly
    assert all(isinstance(c, ClientRecord) for r in records for c in r.clients)
    assert records[1].cumulative_bytes == sum(r.bytes_round for r in records)
    assert RoundRecord.from_dict({"round": 3, "clients-accepted": 4}).to_dict() == {
        "round": 3,
        "clients-accepted": 4,
    }
    with pytest.raises(ValueError, match="may not use the record's own keys"):
        RoundRecord(1, metrics={"eval": 0.5})


@pytest.mark.parametrize(
    "task, num_labels, first_label, pair",
    [
        ("sst2", 2, 0, False),
        ("cola", 2, 1, False),
        ("mrpc", 2, 1, True),
        ("rte", 2, 1, True),
        ("stsb", 1, 5.0, True),
        ("wnli", 2, 1, True),
    ],
)
def test_glue_tsv_layout_is_read_with_its_quirks(task, num_labels, first_label, pair, shared_data):
    from types import SimpleNamespace

    data = load_task(
        SimpleNamespace(
            task=task,
            data_dir=str(shared_data / "glue"),
            max_train_samples=None,
            max_eval_samples=None,
        )
    )
    assert data.num_labels == num_labels
    assert data.train.labels[0] == pytest.approx(first_label)
    assert (data.train.text_pairs is not None) == pair
    assert len(data.validation) > 0 and all(isinstance(t, str) and t for t in data.train.texts[:50])


def test_quality_scoring_all_probes_every_client_but_aggregates_the_sampled(
    tiny_model_dir, shared_data, tmp_path
):
    """The seed paper's allocation: every client is scored after round 1; the top fraction of all of them is upgraded."""
    out = tmp_path / "probe_all"
    run_recipe(
        recipe_args(
            tiny_model_dir,
            shared_data,
            out,
            task="ag_news",
            data_dir=shared_data / "ag_news",
            max_train_samples=400,
            num_clients=6,
            clients_per_round=2,
            rounds=1,
            partition="high_quality",
            high_quality_fraction=0.2,
            quality_upgrade=True,
            low_rank=2,
            high_rank=6,
            upgrade_fraction=0.34,
            quality_eval_samples=32,
            quality_scoring="all",
        )
    )
    (record,) = read_metrics(out)
    state = json.loads((out / "state.json").read_text())
    assert sorted(map(int, state["scores"])) == list(range(6))
    assert len(record["clients"]) == 2
    assert json.loads((out / "round-0001" / "fedlora_provenance.json").read_text())["num_clients"] == 2
    scores = {int(k): v for k, v in state["scores"].items()}
    upgraded = sorted(scores, key=lambda c: (-scores[c], c))[:3]  # ceil(0.34 * 6) = 3
    assert sorted(c for c, r in enumerate(state["ranks"]) if r == 6) == sorted(upgraded)


def test_resume_treats_options_newer_than_the_saved_run_as_defaults(tmp_path):
    from hf_fedlora.federation.state import RunState

    saved = RunState(ranks=[4, 8], fingerprint={"strategy": "replication", "rounds_seen": 1})
    defaults = {"quality_scoring": "sampled", "strategy": "replication"}
    # an option the old run did not record, at its default: resumable
    saved.check_resumable(
        {"strategy": "replication", "rounds_seen": 1, "quality_scoring": "sampled"}, tmp_path, defaults
    )
    # the same option changed from its default, or another recorded option changed: refused, each named
    with pytest.raises(ValueError, match=r"`quality_scoring`: saved 'sampled', now 'all'"):
        saved.check_resumable(
            {"strategy": "replication", "rounds_seen": 1, "quality_scoring": "all"}, tmp_path, defaults
        )
    with pytest.raises(ValueError, match=r"`strategy`: saved 'replication', now 'flexlora'"):
        saved.check_resumable({"strategy": "flexlora", "rounds_seen": 1}, tmp_path, defaults)
    # an option with no known default that the old run did not record: refused
    with pytest.raises(ValueError, match=r"`brand_new`: saved '\(absent\)', now 3"):
        saved.check_resumable(
            {"strategy": "replication", "rounds_seen": 1, "brand_new": 3}, tmp_path, defaults
        )
