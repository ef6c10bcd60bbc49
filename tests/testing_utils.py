"""Helpers shared by the tests (as in PEFT's ``tests/testing_utils.py``): import them from here,
never from ``conftest``. Fixtures live in ``conftest.py``.

- a tiny BERT built from a config (no download) and PEFT-written client adapters on it;
- the paths of the repository, the real data folder, the recipe and the benchmarks;
- the recipe driven in-process with the small options the recipe tests share;
- the token the local Hub (``hub_server``) requires;
- the causal-LM side: a tiny Llama config (used with the real SmolLM2 tokenizer), the instruction
  files, and ``recipes/fed_instruct.py`` driven in-process like the classification recipe.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
RECIPE = REPO_ROOT / "recipes" / "fed_glue.py"
TINY_BERT = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "num_labels": 3,
}
INSTRUCT_RECIPE = REPO_ROOT / "recipes" / "fed_instruct.py"
INSTRUCT_TRAIN_FILE = "alpaca_libre_train.jsonl"
INSTRUCT_TEST_FILE = "alpaca_libre_test.jsonl"
TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
"""A 2-layer Llama; the vocabulary and special tokens come from the tokenizer (``tiny_llama_dir``)."""
HUB_TOKEN = "hf_localhubSECRETtoken0123456789"
"""The token the ``local_hub`` / ``hub_env`` fixtures' server requires for writes and private reads."""


# -- models and adapters ------------------------------------------------------------------------


def tiny_bert(seed: int = 0):
    """A 2-layer BERT for sequence classification with random weights (same seed, same weights)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**TINY_BERT)).eval()


def write_peft_adapter(
    folder: Path,
    r: int,
    lora_alpha: float,
    seed: int,
    *,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    base_model_name_or_path: str | None = None,
    target_modules: tuple[str, ...] = ("query", "value"),
) -> Path:
    """Have PEFT itself write a client adapter with random (non-zero) A and B on the tiny BERT."""
    from peft import LoraConfig, get_peft_model

    model = tiny_bert()
    model.config._name_or_path = base_model_name_or_path or ""
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        task_type="SEQ_CLS",
        init_lora_weights=False,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    peft_model.save_pretrained(str(folder))
    return folder


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter, read with safetensors only."""
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# -- scripts: the recipe and the benchmarks -----------------------------------------------------


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as module ``name`` (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@functools.cache
def load_recipe() -> ModuleType:
    """``recipes/fed_glue.py`` imported as a module (once per session)."""
    spec = importlib.util.spec_from_file_location("fed_glue_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_args(model_dir: Path, data: Path, out: Path, **overrides) -> list[str]:
    """The recipe's command line for a small run (SST-2, 4 clients of ranks 2/4/8, 3 per round, 2
    rounds of 3 steps, seed 7); ``overrides`` replace or add options."""
    options = {
        "model_name_or_path": model_dir,
        "task": "sst2",
        "data_dir": data / "glue",
        "max_train_samples": 320,
        "max_eval_samples": 64,
        "max_seq_length": 32,
        "num_clients": 4,
        "clients_per_round": 3,
        "rounds": 2,
        "local_steps": 3,
        "per_device_train_batch_size": 8,
        "learning_rate": 5e-3,
        "ranks": "2,4,8",
        "seed": 7,
        "output_dir": out,
        **overrides,
    }
    return options_argv(options)


def options_argv(options: dict) -> list[str]:
    """``{"rounds": 2, "resume": True, "report_to": ["tensorboard"]}`` as ``--rounds 2 --resume true
    --report_to tensorboard``."""
    argv = []
    for key, value in options.items():
        if isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def run_recipe(argv: list[str]):
    """Parse ``argv`` and run the recipe in this process; returns what its ``main`` returns."""
    recipe = load_recipe()
    return recipe.main(*recipe.parse(argv))


def read_metrics(out: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``, one per round."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- the causal-LM recipe -------------------------------------------------------------------------


@functools.cache
def load_instruct_recipe() -> ModuleType:
    """``recipes/fed_instruct.py`` imported as a module (once per session)."""
    spec = importlib.util.spec_from_file_location("fed_instruct_recipe", INSTRUCT_RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instruct_recipe_args(model_dir: Path, data: Path, out: Path, **overrides) -> list[str]:
    """``recipes/fed_instruct.py``'s command line for a small run on the real instruction files (48
    training rows, 8 validation rows, 48 tokens; 4 clients of ranks 2/4/8, 2 per round, 2 rounds
    of 2 steps, seed 7); ``overrides`` replace or add options."""
    options = {
        "model_name_or_path": model_dir,
        "train_file": data / "instruct" / INSTRUCT_TRAIN_FILE,
        "validation_file": data / "instruct" / INSTRUCT_TEST_FILE,
        "max_train_samples": 48,
        "max_eval_samples": 8,
        "max_seq_length": 48,
        "num_clients": 4,
        "clients_per_round": 2,
        "rounds": 2,
        "local_steps": 2,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-2,
        "lora_dropout": 0.0,
        "ranks": "2,4,8",
        "seed": 7,
        "output_dir": out,
        **overrides,
    }
    return options_argv(options)


def run_instruct_recipe(argv: list[str]):
    """Parse ``argv`` and run ``recipes/fed_instruct.py`` in this process; returns what its ``main`` returns."""
    recipe = load_instruct_recipe()
    return recipe.main(*recipe.parse(argv))


@contextlib.contextmanager
def killed_before_recording_round(monkeypatch, round_index: int):
    """Inside the block, a run dies (``KeyboardInterrupt``) right after writing ``round-NNNN/`` of
    ``round_index`` and before its ``metrics.jsonl`` line and ``state.json``: the worst moment to resume from."""
    import hf_fedlora.federation.rounds as rounds

    real_append = rounds.append_record

    def crash(output_dir, record):
        if record.round == round_index:
            raise KeyboardInterrupt("simulated kill")
        real_append(output_dir, record)

    monkeypatch.setattr(rounds, "append_record", crash)
    try:
        yield
    finally:
        monkeypatch.setattr(rounds, "append_record", real_append)
