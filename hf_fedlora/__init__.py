"""hf_fedlora: federated LoRA fine-tuning with heterogeneous ranks, native to PEFT and the Hub.

The core entry points::

    from hf_fedlora import LoraAdapter, aggregate_adapters

    global_adapter = aggregate_adapters(["clients/a", "clients/b"], strategy="replication")
    global_adapter.save_pretrained("global")          # loads with peft.PeftModel.from_pretrained
    client_view = global_adapter.to_rank(4, lora_alpha=8)
"""

__version__ = "0.1.0.dev0"

from .adapters import LoraAdapter  # noqa: E402
from .aggregation import aggregate_adapters  # noqa: E402
from .errors import (  # noqa: E402
    AdapterError,
    AdapterFormatError,
    AdapterNotFoundError,
    IncompatibleAdaptersError,
    InvalidWeightsError,
    NonFiniteTensorError,
    RankMismatchError,
    UnknownStrategyError,
    UnsafeFormatError,
    UnsupportedAdapterError,
)
from .strategies import Strategy, get_strategy, list_strategies, register_strategy  # noqa: E402

__all__ = [
    "AdapterError",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "IncompatibleAdaptersError",
    "InvalidWeightsError",
    "LoraAdapter",
    "NonFiniteTensorError",
    "RankMismatchError",
    "Strategy",
    "UnknownStrategyError",
    "UnsafeFormatError",
    "UnsupportedAdapterError",
    "__version__",
    "aggregate_adapters",
    "get_strategy",
    "list_strategies",
    "register_strategy",
]
