"""Aggregation rules for heterogeneous-rank LoRA: one file per rule, one registry.

Add a rule by subclassing :class:`Strategy` (implementing ``aggregate_module``, or the incremental
``start``/``fold_in``/``finish``), decorating it with :func:`register_strategy`, and importing its
module; ``aggregate_adapters(..., strategy="<name>")`` and ``StreamingAggregator("<name>")`` then
find it.
"""

from .base import ModuleInputs, ModuleStacks, Strategy
from .fedavg import FedAvgStrategy
from .flexlora import FlexLoraStrategy
from .hetlora import HetLoraStrategy
from .raflora import RaFloraStrategy
from .registry import get_strategy, list_strategies, register_strategy
from .replication import ReplicationStrategy
from .stacking import StackingStrategy
from .zero_padding import ZeroPaddingStrategy

__all__ = [
    "FedAvgStrategy",
    "FlexLoraStrategy",
    "HetLoraStrategy",
    "ModuleInputs",
    "ModuleStacks",
    "RaFloraStrategy",
    "ReplicationStrategy",
    "StackingStrategy",
    "Strategy",
    "ZeroPaddingStrategy",
    "get_strategy",
    "list_strategies",
    "register_strategy",
]
