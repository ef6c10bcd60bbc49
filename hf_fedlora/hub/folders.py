"""Local adapter folders as the Hub layer sees them: what to upload, and a check that a folder is a
PEFT LoRA adapter before anything is sent (without the ``LoraAdapter`` type, which sits above)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peft import LoraConfig

from ..constants import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_PICKLE_NAME,
    ADAPTER_SAFETENSORS_NAME,
    MAX_SAFETENSORS_HEADER_BYTES,
    MODEL_CARD_NAME,
    PROVENANCE_NAME,
)
from ..errors import AdapterFormatError, AdapterNotFoundError, UnsafeFormatError, UnsupportedAdapterError
from ..files import open_regular, parse_json, read_small_text


def collect_files(folder: Path) -> dict[str, Path]:
    """Files to upload from ``folder``: every regular file, recursively, except hidden ones
    (temporary files of atomic saves) and a ``README.md`` (replaced by the generated card)."""
    files: dict[str, Path] = {}
    root = folder.resolve()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_symlink():
            try:
                inside = path.resolve(strict=True).is_relative_to(root)
            except (OSError, RuntimeError):  # dangling, or a loop
                inside = False
            if not inside:
                raise AdapterFormatError(
                    f"'{folder}', file '{rel.as_posix()}': is a symlink leading outside the folder (or nowhere); "
                    "refusing to upload its target. Copy the file into the folder instead."
                )
        if not path.is_file():
            continue
        if rel.as_posix() == MODEL_CARD_NAME:
            continue
        files[rel.as_posix()] = path
    return files


def _read_json(path: Path, label: str) -> dict[str, Any]:
    data = parse_json(
        read_small_text(path, label), label, "the file", path.name
    )  # bounded: no FIFO, no 100 MB
    if not isinstance(data, dict):
        raise AdapterFormatError(
            f"{label}, file '{path.name}': must be a JSON object, got {type(data).__name__}."
        )
    return data


def read_adapter_folder(folder: Path, label: str) -> tuple[LoraConfig, dict[str, Any]]:
    """Check that ``folder`` is a PEFT LoRA adapter folder before anything is sent, and return its
    config and provenance (for the model card).

    The config must parse as a ``peft.LoraConfig`` and the safetensors header must be readable;
    the tensors themselves are not read.

    Raises:
        AdapterNotFoundError: no such folder, or no config or weights file in it.
        AdapterFormatError, UnsupportedAdapterError, UnsafeFormatError: naming the file at fault.
    """
    from safetensors import safe_open

    if not folder.is_dir():
        raise AdapterNotFoundError(f"{label}: no such folder; pass the PEFT adapter folder to push.")
    if not os.path.lexists(folder / ADAPTER_CONFIG_NAME):
        raise AdapterNotFoundError(
            f"{label}: adapter config '{ADAPTER_CONFIG_NAME}' is missing from '{folder}'."
        )
    data = _read_json(folder / ADAPTER_CONFIG_NAME, label)
    try:
        config = LoraConfig.from_peft_type(**data)
    except (TypeError, ValueError, KeyError) as exc:
        raise AdapterFormatError(
            f"{label}, file '{ADAPTER_CONFIG_NAME}': not a valid LoraConfig ({exc})."
        ) from exc
    if not isinstance(config, LoraConfig):
        raise UnsupportedAdapterError(
            f"{label}, file '{ADAPTER_CONFIG_NAME}': field `peft_type` is {data.get('peft_type')!r}; "
            "hf_fedlora pushes LoRA adapters only (`peft_type: LORA`)."
        )
    weights = folder / ADAPTER_SAFETENSORS_NAME
    if not os.path.lexists(weights):
        if (folder / ADAPTER_PICKLE_NAME).is_file():
            raise UnsafeFormatError(
                f"{label}, file '{ADAPTER_PICKLE_NAME}': only a pickle weights file is present; save the adapter "
                f"as '{ADAPTER_SAFETENSORS_NAME}' (PEFT's default) before pushing it."
            )
        raise AdapterNotFoundError(f"{label}: no '{ADAPTER_SAFETENSORS_NAME}' in '{folder}'.")
    with os.fdopen(open_regular(weights, label), "rb") as handle:
        size, prefix = os.fstat(handle.fileno()).st_size, handle.read(8)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 0 <= length <= min(MAX_SAFETENSORS_HEADER_BYTES, size - 8):
        raise AdapterFormatError(
            f"{label}, file '{weights.name}': its header declares {length:,} bytes (limit "
            f"{MAX_SAFETENSORS_HEADER_BYTES:,}, file {size:,} bytes); not a valid safetensors file."
        )
    try:
        with safe_open(str(weights), framework="pt", device="cpu"):
            pass
    except Exception as exc:  # safetensors raises its own error type for every kind of corruption
        raise AdapterFormatError(
            f"{label}, file '{weights.name}': not a valid safetensors file ({exc})."
        ) from exc
    provenance = (
        _read_json(folder / PROVENANCE_NAME, label) if os.path.lexists(folder / PROVENANCE_NAME) else {}
    )
    return config, provenance


__all__ = ["collect_files", "read_adapter_folder"]
