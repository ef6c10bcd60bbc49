"""Simulated federations of heterogeneous-rank LoRA clients: data splits, rank allocation, local
training, the round loop, its records and writer, and its resumable state.

``run_federation`` is what ``recipes/fed_glue.py`` (sequence classification) and
``recipes/fed_instruct.py`` (instruction tuning of a causal LM, with the ``Instruct*`` /
``LanguageModelArguments`` option groups) call; ``train_client`` and ``CausalLMTrainer`` (one
client's local training) and ``RoundWriter`` (a round's folder, ``metrics.jsonl`` line and Hub
push) are the pieces other integrations, such as the Flower ``ServerApp``, reuse.
"""

from .causal_trainer import CausalLMTrainer, get_causal_trainer
from .client import LocalTrainer, embedded_model_path, get_trainer, train_client
from .config import ClientArguments, DataArguments, FedArgumentParser, FederationArguments, ModelArguments
from .data import TaskData, TextSplit, load_task
from .instruct_config import InstructClientArguments, InstructDataArguments, LanguageModelArguments
from .loop import FederationResult, client_seed, run_federation, sample_clients, set_torch_threads
from .partition import (
    DirichletPartitioner,
    HighQualityPartitioner,
    IidPartitioner,
    Partitioner,
    make_partitioner,
)
from .ranks import allocate_ranks, parse_rank_spec, quality_upgrade
from .rounds import ClientRecord, DroppedClient, RoundRecord, RoundWriter, read_records
from .state import RunState

__all__ = [
    "CausalLMTrainer",
    "ClientArguments",
    "ClientRecord",
    "DataArguments",
    "DirichletPartitioner",
    "DroppedClient",
    "FedArgumentParser",
    "FederationArguments",
    "FederationResult",
    "HighQualityPartitioner",
    "IidPartitioner",
    "InstructClientArguments",
    "InstructDataArguments",
    "LanguageModelArguments",
    "LocalTrainer",
    "ModelArguments",
    "Partitioner",
    "RoundRecord",
    "RoundWriter",
    "RunState",
    "TaskData",
    "TextSplit",
    "allocate_ranks",
    "client_seed",
    "embedded_model_path",
    "get_causal_trainer",
    "get_trainer",
    "load_task",
    "make_partitioner",
    "parse_rank_spec",
    "quality_upgrade",
    "read_records",
    "run_federation",
    "sample_clients",
    "set_torch_threads",
    "train_client",
]
