"""Adapter I/O: ``LoraAdapter`` and the helpers it is built from."""

from .adapter import LoraAdapter
from .keys import lora_a_key, lora_b_key, module_path, pattern_for
from .scaling import declared_rank_alpha, fold, lora_scale, module_scale, unfold
from .sources import AdapterSource, describe_source, pull_round, resolve_adapter

__all__ = [
    "AdapterSource",
    "LoraAdapter",
    "declared_rank_alpha",
    "describe_source",
    "fold",
    "lora_a_key",
    "lora_b_key",
    "lora_scale",
    "module_path",
    "module_scale",
    "pattern_for",
    "pull_round",
    "resolve_adapter",
    "unfold",
]
