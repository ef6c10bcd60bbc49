"""End-to-end tests of ``recipes/fed_instruct.py`` on a tiny Llama (2 layers, the real SmolLM2
tokenizer) and a few dozen real instruction rows.

A 2-round run with heterogeneous ranks records round 0 (the base model) and every round's loss
and perplexity, and its round folders load with plain PEFT + ``AutoModelForCausalLM`` offline and
reproduce the recorded loss; an interrupted run resumes to the same adapter; every round is pushed
to the local Hub; ``python`` and ``accelerate launch`` (2 processes) run the script too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import LocalHub
from testing_utils import (
    HUB_TOKEN,
    INSTRUCT_RECIPE,
    REPO_ROOT,
    adapter_tensors,
    instruct_recipe_args,
    killed_before_recording_round,
    load_instruct_recipe,
    read_metrics,
    run_instruct_recipe,
)

from hf_fedlora import pull_round
from hf_fedlora.federation.instruct_data import IGNORE_INDEX, encode_rows, load_instruct_task
from hf_fedlora.hub import list_rounds

recipe = load_instruct_recipe()
CONFIGS = REPO_ROOT / "recipes" / "configs"


def _assert_same_adapter(got: Path, want: Path, atol: float = 1e-6) -> None:
    ours, reference = adapter_tensors(got), adapter_tensors(want)
    assert set(ours) == set(reference)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=atol, msg=key)


def _response_loss(model, tokenizer, split, max_seq_length: int) -> float:
    """Mean negative log-likelihood of the response tokens, from the logits (not the model's own loss)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(split), 4):
            batch = encode_rows(tokenizer, split, range(lo, min(lo + 4, len(split))), max_seq_length)
            labels = batch.pop("labels")[:, 1:]
            logits = model(**batch).logits[:, :-1].float()
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    labels.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
            count += int((labels != IGNORE_INDEX).sum())
    return nll / count


def test_two_round_run_records_round_zero_and_writes_loadable_causal_adapters(
    instruct_baseline, tiny_llama_dir, shared_data
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("round-0000", "round-0001", "round-0002", "metrics.jsonl", "state.json", "metrics.png"):
        assert (instruct_baseline / name).exists(), name
    assert not (instruct_baseline / "_exchange").exists()

    records = read_metrics(instruct_baseline)
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records:
        values = record["eval"]
        assert math.isfinite(values["loss"]) and values["perplexity"] == pytest.approx(
            math.exp(values["loss"])
        )
        assert (
            record["eval_metric"] == "loss"
            and values["score"] == -values["loss"]
            and values["num_tokens"] > 0
        )
        assert record["global_rank"] == 8 and record["adapter"] == f"round-{record['round']:04d}"
    assert (
        "clients" not in records[0] and records[0]["cumulative_bytes"] == 0
    )  # the base model: nobody trained
    assert [len(r["clients"]) for r in records[1:]] == [2, 2]
    ranks = {c["rank"] for r in records[1:] for c in r["clients"]}
    assert len(ranks) > 1, "the clients trained at different ranks"
    assert records[2]["eval"]["loss"] < records[0]["eval"]["loss"]

    # every round folder is a PEFT adapter of the base folder, loaded offline, that gives the recorded loss
    validation = load_instruct_task(
        shared_data / "instruct" / "alpaca_libre_train.jsonl",
        shared_data / "instruct" / "alpaca_libre_test.jsonl",
        max_eval_samples=8,
    ).validation
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert _response_loss(base, tokenizer, validation, 48) == pytest.approx(
        records[0]["eval"]["loss"], rel=1e-5
    )
    for n in (1, 2):
        folder = instruct_baseline / f"round-{n:04d}"
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(tiny_llama_dir)
        model = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
        model = PeftModel.from_pretrained(model, folder).eval()
        loss = _response_loss(model, tokenizer, validation, 48)
        assert loss == pytest.approx(records[n]["eval"]["loss"], rel=1e-5), n

    card = (instruct_baseline / "README.md").read_text()
    assert "AutoModelForCausalLM" in card and "accelerate launch recipes/fed_instruct.py" in card
    assert "num_labels" not in card and "| eval metric | loss |" in card


def test_resume_after_round_one_equals_uninterrupted_run(
    instruct_baseline, tiny_llama_dir, shared_data, tmp_path, monkeypatch
):
    out = tmp_path / "interrupted"
    with killed_before_recording_round(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        run_instruct_recipe(instruct_recipe_args(tiny_llama_dir, shared_data, out))
    assert json.loads((out / "state.json").read_text())["completed_round"] == 1

    result = run_instruct_recipe(instruct_recipe_args(tiny_llama_dir, shared_data, out, resume=True))
    assert [r.round for r in result.records] == [0, 1, 2]
    _assert_same_adapter(out / "round-0002", instruct_baseline / "round-0002")
    got, want = read_metrics(out), read_metrics(instruct_baseline)
    assert [r["round"] for r in got] == [0, 1, 2]  # round 0 kept once
    for g, w in zip(got, want):
        assert g["eval"] == pytest.approx(w["eval"], rel=1e-5)


def test_every_round_is_pushed_and_a_resumed_run_pushes_no_round_twice(
    hub_env: LocalHub, instruct_baseline, tiny_llama_dir, shared_data, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    repo, out = "user/fed-instruct", tmp_path / "run"
    options = dict(push_to_hub=True, hub_model_id=repo, hub_token=HUB_TOKEN)
    run_instruct_recipe(instruct_recipe_args(tiny_llama_dir, shared_data, out, rounds=1, **options))
    run_instruct_recipe(instruct_recipe_args(tiny_llama_dir, shared_data, out, resume=True, **options))

    assert list_rounds(repo, token=HUB_TOKEN, endpoint=hub_env.url) == [1, 2]
    assert len([r for r in hub_env.requests("POST", "/commit/") if r.status == 200]) == 2
    _assert_same_adapter(out / "round-0002", instruct_baseline / "round-0002")  # extending = uninterrupted
    pulled = pull_round(repo, 2, token=HUB_TOKEN, endpoint=hub_env.url)
    for name in ("adapter_model.safetensors", "adapter_config.json", "fedlora_provenance.json"):
        digest = [
            hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (pulled.directory / name, out / "round-0002" / name)
        ]
        assert digest[0] == digest[1], name
    card = (pulled.directory / "README.md").read_text()
    assert "AutoModelForCausalLM" in card and "federated-learning" in card
    assert "| 0 |" in card, "the card's metrics table starts at round 0, the base model"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), pulled.directory)
    assert model.peft_config["default"].task_type == "CAUSAL_LM"
    assert HUB_TOKEN not in (out / "metrics.jsonl").read_text()


def test_task_type_partition_and_another_strategy_run(tiny_llama_dir, shared_data, tmp_path):
    out = tmp_path / "task_type"
    result = run_instruct_recipe(
        instruct_recipe_args(
            tiny_llama_dir, shared_data, out, rounds=1, partition="task_type", strategy="flexlora"
        )
    )
    assert [r.round for r in result.records] == [0, 1]
    assert result.records[1].strategy == "flexlora" and math.isfinite(result.final_metrics["loss"])
    with pytest.raises(ValueError, match=r"one of \['iid', 'dirichlet', 'task_type'\] for instruction data"):
        run_instruct_recipe(
            instruct_recipe_args(tiny_llama_dir, shared_data, tmp_path / "hq", partition="high_quality")
        )


def test_quickstart_config_and_defaults_parse(shared_data, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO_ROOT)
    model_args, data_args, client_args, fed_args = recipe.parse(
        ["--config", str(CONFIGS / "instruct_quickstart.yaml"), "--strategy", "flexlora"]
    )
    assert model_args.model_name_or_path is None and model_args.dtype == "auto"
    assert Path(data_args.train_file).is_file() and Path(data_args.validation_file).is_file()
    assert client_args.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (fed_args.strategy, fed_args.partition, fed_args.ranks) == ("flexlora", "iid", "4,8,16")
    assert fed_args.output_dir.startswith("outputs/")

    _, data_args, client_args, fed_args = recipe.parse(
        ["--partition", "task_type"]
    )  # no config: the defaults
    assert (
        Path(data_args.train_file).resolve()
        == (shared_data / "instruct" / "alpaca_libre_train.jsonl").resolve()
    )
    assert (fed_args.partition, fed_args.output_dir, client_args.per_device_eval_batch_size) == (
        "task_type",
        "outputs/fed_instruct",
        8,
    )
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        recipe.parse(["--dtype", "float64"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_file: x.jsonl\ndata_dir: ../shared/data/glue\n")
    with pytest.raises(ValueError, match=r"unknown keys \['data_dir'\]"):
        recipe.parse(["--config", str(bad)])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_script(prefix: list[str], argv: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*prefix, str(INSTRUCT_RECIPE), *argv],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_plain_python_and_two_processes_give_the_baseline_adapters(
    instruct_baseline, tiny_llama_dir, shared_data, tmp_path
):
    _run_script([sys.executable], instruct_recipe_args(tiny_llama_dir, shared_data, tmp_path / "python"))
    accelerate = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--main_process_port",
        str(_free_port()),
    ]
    accelerate += ["--config_file", str(REPO_ROOT / "recipes" / "accelerate_configs" / "cpu_2proc.yaml")]
    _run_script(accelerate, instruct_recipe_args(tiny_llama_dir, shared_data, tmp_path / "k2"))
    # a second process's clients reach the main one through `_exchange/` folders (its own: in memory)
    for run, exchanged in ((tmp_path / "k2", True), (instruct_baseline, False)):
        provenance = json.loads((run / "round-0001" / "fedlora_provenance.json").read_text())
        assert any("_exchange" in c["source"] for c in provenance["clients"]) == exchanged
    for out, atol in ((tmp_path / "python", 1e-6), (tmp_path / "k2", 1e-5)):
        for name in ("round-0001", "round-0002"):
            _assert_same_adapter(out / name, instruct_baseline / name, atol=atol)
        assert [r["round"] for r in read_metrics(out)] == [0, 1, 2]
        shutil.rmtree(out)
