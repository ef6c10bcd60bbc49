"""File names and formats shared by the package (leaf module: imports nothing of ours)."""

from __future__ import annotations

from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

ADAPTER_CONFIG_NAME = CONFIG_NAME  # "adapter_config.json"
ADAPTER_SAFETENSORS_NAME = SAFETENSORS_WEIGHTS_NAME  # "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = WEIGHTS_NAME  # "adapter_model.bin"
PROVENANCE_NAME = "fedlora_provenance.json"
MODEL_CARD_NAME = "README.md"

PEFT_PREFIX = "base_model.model."
LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"

ROUND_TAG_FORMAT = "round-{:04d}"

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_PICKLE_NAME",
    "ADAPTER_SAFETENSORS_NAME",
    "LORA_A_SUFFIX",
    "LORA_B_SUFFIX",
    "MODEL_CARD_NAME",
    "PEFT_PREFIX",
    "PROVENANCE_NAME",
    "ROUND_TAG_FORMAT",
]
