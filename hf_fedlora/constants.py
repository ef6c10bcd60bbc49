"""File names and formats shared by the package (leaf module: imports nothing of ours)."""

from __future__ import annotations

from typing import Literal, get_args

from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

__version__ = "0.1.0.dev0"
"""The package version (``hf_fedlora.__version__``), recorded in provenance files and Hub commits;
it lives here so that modules below the package root can read it without importing the root."""

ADAPTER_CONFIG_NAME = CONFIG_NAME  # "adapter_config.json"
ADAPTER_SAFETENSORS_NAME = SAFETENSORS_WEIGHTS_NAME  # "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = WEIGHTS_NAME  # "adapter_model.bin"
PROVENANCE_NAME = "fedlora_provenance.json"
MODEL_CARD_NAME = "README.md"

PEFT_PREFIX = "base_model.model."
LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"

ROUND_TAG_FORMAT = "round-{:04d}"

# Bounds on what a client's files can make the server read or parse (adapters/limits.py).
MAX_JSON_BYTES = 1 << 20  # adapter_config.json, fedlora_provenance.json: 1 MiB
MAX_JSON_DEPTH = 64  # nesting of [ and { in those files
MAX_SAFETENSORS_HEADER_BYTES = 8 << 20  # a safetensors JSON header: 8 MiB (~50k tensors)
MAX_PATTERN_LENGTH = 256  # characters of one rank_pattern / alpha_pattern key
MAX_PATTERN_ENTRIES = 4096  # keys of rank_pattern / alpha_pattern
MAX_PATTERN_UNBOUNDED_REPEATS = 3  # `*`, `+`, `{n,}` in one pattern key
HUB_TIMEOUT_S = 60.0  # read/connect timeout of every Hub request (env HF_FEDLORA_HUB_TIMEOUT)

SendBackMethod = Literal["truncate", "svd"]
"""How a client gets its rank-r view of the global adapter: ``"truncate"`` keeps the first r slots
(rules whose slots are aligned across rounds), ``"svd"`` the best rank-r approximation."""
SEND_BACK_METHODS: tuple[str, ...] = get_args(SendBackMethod)


def check_send_back(method: object, field: str = "send_back") -> SendBackMethod:
    """The one check of a send-back method name; returns it, or raises ``ValueError`` naming the choices."""
    if method not in SEND_BACK_METHODS:
        raise ValueError(
            f"`{field}` must be one of {', '.join(map(repr, SEND_BACK_METHODS))}, got {method!r}."
        )
    return method  # type: ignore[return-value]


__all__ = [
    "__version__",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_PICKLE_NAME",
    "ADAPTER_SAFETENSORS_NAME",
    "LORA_A_SUFFIX",
    "LORA_B_SUFFIX",
    "MODEL_CARD_NAME",
    "PEFT_PREFIX",
    "PROVENANCE_NAME",
    "ROUND_TAG_FORMAT",
    "HUB_TIMEOUT_S",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_PATTERN_ENTRIES",
    "MAX_PATTERN_LENGTH",
    "MAX_PATTERN_UNBOUNDED_REPEATS",
    "MAX_SAFETENSORS_HEADER_BYTES",
    "SEND_BACK_METHODS",
    "SendBackMethod",
    "check_send_back",
]
