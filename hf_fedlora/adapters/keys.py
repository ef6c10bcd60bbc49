"""Mapping between PEFT's on-disk tensor keys and hf_fedlora's module names.

A module name is PEFT's key without its factor suffix (e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query``); its *path* drops the
``base_model.model.`` prefix and is what ``rank_pattern``/``alpha_pattern`` keys match.

PEFT writes, per LoRA module: ``.lora_A.weight`` / ``.lora_B.weight`` (linear and convolution
layers) or ``.lora_embedding_A`` / ``.lora_embedding_B`` (embedding layers); ``.lora_B.bias`` with
``lora_bias=True``; ``.lora_magnitude_vector`` with ``use_dora=True``; and, when an embedding layer
is targeted or resized, the embedding weight itself (``.base_layer.weight`` or ``embed_tokens.weight``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from peft.utils.constants import EMBEDDING_LAYER_NAMES

from ..constants import LORA_A_SUFFIX, LORA_B_SUFFIX, PEFT_PREFIX
from ..errors import AdapterFormatError, UnsupportedAdapterError

EMBEDDING_A_SUFFIX = ".lora_embedding_A"
EMBEDDING_B_SUFFIX = ".lora_embedding_B"
BIAS_SUFFIX = ".lora_B.bias"
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"
BASE_LAYER_SUFFIX = ".base_layer.weight"

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
_SAVED_EMBEDDING = re.compile(rf"(^|\.)({'|'.join(map(re.escape, EMBEDDING_LAYER_NAMES))})\.weight$")

_UNSUPPORTED_MARKERS = {
    ".lora_A.bias": "a bias on LoRA's A factor (PEFT never writes one)",
    ".lora_embedding_A.": "a parameter under an embedding LoRA factor",
    ".lora_embedding_B.": "a parameter under an embedding LoRA factor",
}


@dataclass(frozen=True)
class KeyLayout:
    """Which tensors of an adapter are LoRA factors, LoRA biases, DoRA magnitudes and dense extras.

    Attributes:
        modules: LoRA module names, sorted.
        extras: dense tensors (``modules_to_save``, and embedding weights PEFT saved), sorted.
        embeddings: the modules stored as ``lora_embedding_A``/``lora_embedding_B``.
        biases: the modules with a ``lora_B.bias`` (``lora_bias=True``).
        magnitudes: the modules with a DoRA ``lora_magnitude_vector`` (``use_dora=True``).
        saved_embeddings: the extras that are a base embedding weight PEFT saved with the adapter.
    """

    modules: tuple[str, ...]
    extras: tuple[str, ...]
    embeddings: frozenset[str] = frozenset()
    biases: frozenset[str] = frozenset()
    magnitudes: frozenset[str] = frozenset()
    saved_embeddings: frozenset[str] = frozenset()

    def factor_keys(self, module: str) -> tuple[str, str]:
        """PEFT's keys of the module's A and B factors."""
        if module in self.embeddings:
            return module + EMBEDDING_A_SUFFIX, module + EMBEDDING_B_SUFFIX
        return lora_a_key(module), lora_b_key(module)

    def lora_keys(self, module: str) -> tuple[str, ...]:
        """Every key of the module's LoRA tensors: A, B, then its bias and magnitude when present."""
        keys = self.factor_keys(module)
        keys += (bias_key(module),) if module in self.biases else ()
        keys += (magnitude_key(module),) if module in self.magnitudes else ()
        return keys


def lora_a_key(module: str) -> str:
    """PEFT's key of a linear (or convolution) module's A factor."""
    return module + LORA_A_SUFFIX


def lora_b_key(module: str) -> str:
    """PEFT's key of a linear (or convolution) module's B factor."""
    return module + LORA_B_SUFFIX


def bias_key(module: str) -> str:
    """PEFT's key of a module's LoRA bias (``lora_bias=True``)."""
    return module + BIAS_SUFFIX


def magnitude_key(module: str) -> str:
    """PEFT's key of a module's DoRA magnitude vector (``use_dora=True``)."""
    return module + MAGNITUDE_SUFFIX


def module_path(module: str) -> str:
    """The module's path inside the base model, the form ``rank_pattern`` keys match."""
    return module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module


def pattern_for(module: str) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that matches exactly this module in PEFT."""
    return re.escape(module_path(module))


def _is_extra(key: str, modules_to_save: Sequence[str]) -> bool:
    parts = module_path(key).split(".")
    return any(name in parts for name in modules_to_save)


_ROLES = (  # suffix, role; the first that matches wins
    (LORA_A_SUFFIX, "a"),
    (LORA_B_SUFFIX, "b"),
    (EMBEDDING_A_SUFFIX, "embedding_a"),
    (EMBEDDING_B_SUFFIX, "embedding_b"),
    (BIAS_SUFFIX, "bias"),
    (MAGNITUDE_SUFFIX, "magnitude"),
)


def _role(key: str) -> tuple[str, str] | None:
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            return role, key[: -len(suffix)]
    return None


def _refuse_unsupported(key: str, where: str) -> None:
    for marker, what in _UNSUPPORTED_MARKERS.items():
        if marker in key:
            raise UnsupportedAdapterError(
                f"{where}: tensor `{key}` belongs to {what}, which hf_fedlora cannot merge. "
                "Train LoRA adapters with `peft.LoraConfig` (DoRA, `lora_bias` and embedding LoRA are fine)."
            )


def split_keys(keys: Iterable[str], modules_to_save: Sequence[str] | None, where: str) -> KeyLayout:
    """Sort an adapter's tensor keys into LoRA modules (of each kind) and dense extras.

    Raises:
        UnsupportedAdapterError: tensors of a LoRA kind PEFT does not write (e.g. a bias on A).
        AdapterFormatError: a name that is not a dotted path, a module with only one of A/B (or a
            bias or magnitude without factors), or a tensor that is none of these.
    """
    found: dict[str, set[str]] = {role: set() for _, role in _ROLES}
    extras, unknown, base_layers = [], [], []
    for key in keys:
        if not _SAFE_KEY.match(key):
            raise AdapterFormatError(
                f"{where}: tensor name {key!r} is not a dotted module path (only letters, digits, '_', '-' "
                "between single dots). Such names are refused so that no name can act as a file path."
            )
        _refuse_unsupported(key, where)
        role = _role(key)
        if role is not None:
            found[role[0]].add(role[1])
        elif _is_extra(key, modules_to_save or ()):
            extras.append(key)
        elif key.endswith(BASE_LAYER_SUFFIX):
            base_layers.append(key)
        elif _SAVED_EMBEDDING.search(key):
            extras.append(key)  # a resized embedding PEFT saved although it is not targeted
        else:
            unknown.append(key)
    embeddings = found["embedding_a"] | found["embedding_b"]
    saved = {k for k in base_layers if k[: -len(BASE_LAYER_SUFFIX)] in embeddings}
    saved |= {k for k in extras if _SAVED_EMBEDDING.search(k) and not _is_extra(k, modules_to_save or ())}
    unknown += sorted(set(base_layers) - saved)
    if unknown:
        raise AdapterFormatError(
            f"{where}: unknown tensors {sorted(unknown)[:5]} are neither LoRA tensors "
            "(`*.lora_A.weight`/`*.lora_B.weight`, `*.lora_embedding_A/B`, `*.lora_B.bias`, "
            "`*.lora_magnitude_vector`) nor under `modules_to_save` "
            f"{list(modules_to_save or [])}. Remove them or list their module in `modules_to_save`."
        )
    _check_pairs(found, where)
    modules = found["a"] | found["embedding_a"]
    return KeyLayout(
        modules=tuple(sorted(modules)),
        extras=tuple(sorted(set(extras) | saved)),
        embeddings=frozenset(found["embedding_a"]),
        biases=frozenset(found["bias"]),
        magnitudes=frozenset(found["magnitude"]),
        saved_embeddings=frozenset(saved),
    )


def _check_pairs(found: dict[str, set[str]], where: str) -> None:
    """Every module has both factors of one kind; biases and magnitudes belong to a module."""
    pairs = (
        (found["a"], found["b"], "lora_A.weight", "lora_B.weight"),
        (found["embedding_a"], found["embedding_b"], "lora_embedding_A", "lora_embedding_B"),
    )
    for a_modules, b_modules, a_name, b_name in pairs:
        for missing, present, factor in ((a_modules, b_modules, a_name), (b_modules, a_modules, b_name)):
            lonely = sorted(present - missing)
            if lonely:
                raise AdapterFormatError(
                    f"{where}: module `{lonely[0]}` has no `{factor}` tensor"
                    f"{f' (and {len(lonely) - 1} more modules)' if len(lonely) > 1 else ''}; "
                    "every LoRA module needs both A and B. The file is incomplete: re-save it with PEFT."
                )
    both = sorted(found["a"] & found["embedding_a"])
    if both:
        raise AdapterFormatError(
            f"{where}: module `{both[0]}` holds both `lora_A.weight` and `lora_embedding_A`; "
            "a module is either a linear or an embedding LoRA layer."
        )
    modules = found["a"] | found["embedding_a"]
    for role, suffix in (("bias", BIAS_SUFFIX), ("magnitude", MAGNITUDE_SUFFIX)):
        orphans = sorted(found[role] - modules)
        if orphans:
            raise AdapterFormatError(
                f"{where}: tensor `{orphans[0]}{suffix}` belongs to no LoRA module (no `lora_A` factor "
                "beside it). The file is incomplete: re-save it with PEFT."
            )
