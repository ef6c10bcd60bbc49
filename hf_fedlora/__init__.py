"""hf_fedlora: federated LoRA fine-tuning with heterogeneous ranks, native to PEFT and the Hub.

The core entry points::

    from hf_fedlora import LoraAdapter, StreamingAggregator, aggregate_adapters

    global_adapter = aggregate_adapters(["clients/a", "clients/b"], strategy="replication")
    global_adapter.save_pretrained("global")          # loads with peft.PeftModel.from_pretrained
    client_view = global_adapter.to_rank(4, lora_alpha=8)

    agg = StreamingAggregator("replication")      # the same merge, one reply at a time
    for reply in replies:
        agg.add(reply)
    global_adapter = agg.result()
"""

from .adapters import LoraAdapter, pull_round
from .aggregation import aggregate_adapters
from .constants import __version__
from .errors import (
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
from .strategies import Strategy, get_strategy, list_strategies, register_strategy
from .streaming import StreamingAggregator

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
    "StreamingAggregator",
    "UnknownStrategyError",
    "UnsafeFormatError",
    "UnsupportedAdapterError",
    "__version__",
    "aggregate_adapters",
    "get_strategy",
    "list_strategies",
    "pull_round",
    "register_strategy",
]
