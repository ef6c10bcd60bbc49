"""Mapping between PEFT's on-disk tensor keys and hf_fedlora's module names.

A module name is PEFT's key without ``.lora_A.weight`` (e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query``); its *path* drops the
``base_model.model.`` prefix and is what ``rank_pattern``/``alpha_pattern`` keys match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..constants import LORA_A_SUFFIX, LORA_B_SUFFIX, PEFT_PREFIX
from ..errors import AdapterFormatError, UnsupportedAdapterError

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")

_UNSUPPORTED_MARKERS = {
    "lora_magnitude_vector": "DoRA (`use_dora=True`)",
    "lora_embedding_A": "LoRA on embedding layers",
    "lora_embedding_B": "LoRA on embedding layers",
    ".lora_A.bias": "LoRA biases (`lora_bias=True`)",
    ".lora_B.bias": "LoRA biases (`lora_bias=True`)",
}


@dataclass(frozen=True)
class KeyLayout:
    """Which tensors of an adapter are LoRA factors and which are dense extras."""

    modules: tuple[str, ...]
    extras: tuple[str, ...]


def lora_a_key(module: str) -> str:
    """PEFT's key of a module's A factor."""
    return module + LORA_A_SUFFIX


def lora_b_key(module: str) -> str:
    """PEFT's key of a module's B factor."""
    return module + LORA_B_SUFFIX


def module_path(module: str) -> str:
    """The module's path inside the base model, the form ``rank_pattern`` keys match."""
    return module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module


def pattern_for(module: str) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that matches exactly this module in PEFT."""
    return re.escape(module_path(module))


def _is_extra(key: str, modules_to_save: Sequence[str]) -> bool:
    parts = module_path(key).split(".")
    return any(name in parts for name in modules_to_save)


def split_keys(keys: Iterable[str], modules_to_save: Sequence[str] | None, where: str) -> KeyLayout:
    """Sort an adapter's tensor keys into LoRA modules and dense extras (``modules_to_save``).

    Raises:
        UnsupportedAdapterError: DoRA, LoRA bias or embedding-LoRA tensors.
        AdapterFormatError: a module with only one of A/B, or a tensor that is neither.
    """
    a_modules, b_modules, extras, unknown = set(), set(), [], []
    for key in keys:
        if not _SAFE_KEY.match(key):
            raise AdapterFormatError(
                f"{where}: tensor name {key!r} is not a dotted module path (only letters, digits, '_', '-' "
                "between single dots). Such names are refused so that no name can act as a file path."
            )
        for marker, what in _UNSUPPORTED_MARKERS.items():
            if marker in key:
                raise UnsupportedAdapterError(
                    f"{where}: tensor `{key}` belongs to {what}, which hf_fedlora cannot merge. "
                    "Train plain LoRA adapters (the defaults of `peft.LoraConfig`)."
                )
        if key.endswith(LORA_A_SUFFIX):
            a_modules.add(key[: -len(LORA_A_SUFFIX)])
        elif key.endswith(LORA_B_SUFFIX):
            b_modules.add(key[: -len(LORA_B_SUFFIX)])
        elif _is_extra(key, modules_to_save or ()):
            extras.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise AdapterFormatError(
            f"{where}: unknown tensors {sorted(unknown)[:5]} are neither LoRA factors "
            "(`*.lora_A.weight`/`*.lora_B.weight`) nor under `modules_to_save` "
            f"{list(modules_to_save or [])}. Remove them or list their module in `modules_to_save`."
        )
    for missing, present, factor in ((a_modules, b_modules, "lora_A"), (b_modules, a_modules, "lora_B")):
        lonely = sorted(present - missing)
        if lonely:
            raise AdapterFormatError(
                f"{where}: module `{lonely[0]}` has no `{factor}.weight` tensor"
                f"{f' (and {len(lonely) - 1} more modules)' if len(lonely) > 1 else ''}; "
                "every LoRA module needs both A and B. The file is incomplete: re-save it with PEFT."
            )
    return KeyLayout(modules=tuple(sorted(a_modules)), extras=tuple(sorted(extras)))
