"""Simulated federations of heterogeneous-rank LoRA clients: data splits, rank allocation, local
training, the round loop and its resumable state.

``train_client`` (one client's local training) is the piece other integrations reuse;
``run_federation`` is what ``recipes/fed_glue.py`` calls.
"""

from .client import LocalTrainer, LocalTrainingArguments, embedded_model_path, get_trainer, train_client
from .config import ClientArguments, DataArguments, FedArgumentParser, FederationArguments, ModelArguments
from .data import TaskData, TextSplit, load_task
from .loop import FederationResult, client_seed, run_federation, sample_clients
from .partition import DirichletPartitioner, HighQualityPartitioner, IidPartitioner, Partitioner, make_partitioner
from .ranks import allocate_ranks, parse_rank_spec, quality_upgrade
from .state import RunState

__all__ = [
    "ClientArguments",
    "DataArguments",
    "DirichletPartitioner",
    "FedArgumentParser",
    "FederationArguments",
    "FederationResult",
    "HighQualityPartitioner",
    "IidPartitioner",
    "LocalTrainer",
    "LocalTrainingArguments",
    "ModelArguments",
    "Partitioner",
    "RunState",
    "TaskData",
    "TextSplit",
    "allocate_ranks",
    "client_seed",
    "embedded_model_path",
    "get_trainer",
    "load_task",
    "make_partitioner",
    "parse_rank_spec",
    "quality_upgrade",
    "run_federation",
    "sample_clients",
    "train_client",
]
