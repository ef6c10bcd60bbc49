"""Public exceptions of hf_fedlora.

Every error raised because of a user's input is an :class:`AdapterError`, which is also a
``ValueError``. Messages say what is wrong, where (the client, the file, the tensor or config
field) and how to fix it, e.g.::

    RankMismatchError: client 1 ('clients/b', file 'adapter_model.safetensors'): tensor
    `base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight` has 4 rows but the
    config declares rank 8 for this module (`r`/`rank_pattern`). Re-save the adapter with PEFT.
"""

from __future__ import annotations


class AdapterError(ValueError):
    """Base class: an adapter (or a set of adapters) cannot be read, checked or merged."""


class AdapterNotFoundError(AdapterError, FileNotFoundError):
    """A source names no adapter: missing folder, missing ``adapter_config.json`` or weights file."""


class AdapterFormatError(AdapterError):
    """A file exists but is not a well-formed PEFT adapter: corrupt safetensors, config that is not
    JSON, a tensor that is not floating point, a module with only one of A/B, unknown tensors."""


class UnsupportedAdapterError(AdapterError):
    """The adapter is valid PEFT but not a LoRA kind we can merge: another PEFT type, ``bias="all"``
    or ``"lora_only"``, trainable token indices, or a bias on ``lora_A``. (LoRA on linear and
    embedding layers, ``lora_bias`` and DoRA are merged.)"""


class RankMismatchError(AdapterFormatError):
    """A tensor's shape contradicts the rank the config declares for its module, or A and B
    disagree on the rank, or the rank is larger than the layer."""


class NonFiniteTensorError(AdapterError):
    """A client's tensor holds NaN or Inf."""


class UnsafeFormatError(AdapterError):
    """The adapter is only available as a pickle file (``adapter_model.bin``); loading it could run
    code. Pass ``allow_pickle=True`` only for files you trust."""


class IncompatibleAdaptersError(AdapterError):
    """Adapters cannot be merged together: different base models, target modules or shapes,
    or ranks a strategy does not accept (``fedavg`` with unequal ranks)."""


class InvalidWeightsError(AdapterError):
    """Aggregation weights are zero, negative, NaN or do not match the number of clients."""


class UnknownStrategyError(AdapterError, KeyError):
    """No aggregation strategy is registered under that name. The message lists the valid names."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return ValueError.__str__(self)


class StrategyRegistrationError(AdapterError):
    """A strategy class cannot be registered: bad name, duplicate name, or missing attributes."""


__all__ = [
    "AdapterError",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "IncompatibleAdaptersError",
    "InvalidWeightsError",
    "NonFiniteTensorError",
    "RankMismatchError",
    "StrategyRegistrationError",
    "UnknownStrategyError",
    "UnsafeFormatError",
    "UnsupportedAdapterError",
]
