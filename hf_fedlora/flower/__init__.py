"""Flower integration: run heterogeneous-rank LoRA federations on Flower's engine.

Install with ``pip install "hf-fedlora[flower]"``. Flower sends telemetry and checks for updates by
default; set ``FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0``.

Server side::

    from hf_fedlora.flower import HeteroLoraStrategy, RoundWriter, adapter_to_records

    strategy = HeteroLoraStrategy(aggregation="replication", on_aggregate=RoundWriter("out"))  # round-NNNN/, metrics.jsonl
    arrays, adapter_config = adapter_to_records(initial_adapter)
    strategy.start(grid, initial_arrays=arrays, train_config=ConfigRecord(dict(adapter_config)), num_rounds=10,
                   timeout=600)  # seconds a round waits for replies; missing nodes are logged, the round goes on

Client side (inside ``@app.train()``)::

    view = client_view(msg, rank=8, lora_alpha=16)     # this client's rank and alpha
    ...train a PEFT model initialised from view.state_dict()...
    return train_reply(msg, LoraAdapter.from_peft_model(model), num_examples=len(train_set))
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'hf_fedlora.flower needs Flower: pip install "hf-fedlora[flower]" (or pip install "flwr[simulation]>=1.42,<1.43").'
    ) from exc

from ..federation.rounds import RoundWriter
from .client import client_view, train_reply
from .collect import ReplyCollector
from .records import (
    ADAPTER_CONFIG_KEYS,
    adapter_from_records,
    adapter_to_records,
    array_to_tensor,
    tensor_to_array,
)
from .strategy import SEND_BACK_KEY, HeteroLoraStrategy, RoundReplies

__all__ = [
    "ADAPTER_CONFIG_KEYS",
    "SEND_BACK_KEY",
    "HeteroLoraStrategy",
    "ReplyCollector",
    "RoundReplies",
    "RoundWriter",
    "adapter_from_records",
    "adapter_to_records",
    "array_to_tensor",
    "client_view",
    "tensor_to_array",
    "train_reply",
]
