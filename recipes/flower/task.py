"""Run configuration, data, training and evaluation shared by the example's ServerApp and ClientApp.

Nothing here trains by itself: clients train with ``hf_fedlora.federation.train_client`` (the
recipes' local training) on a ``LocalTrainer`` (sequence classification) or a ``CausalLMTrainer``
(instruction tuning of a causal LM); the server evaluates with the same trainers. ``task`` in the
run config picks the task kind.

Run configuration comes from ``[tool.flwr.app.config]`` in ``pyproject.toml`` (``flwr run``), with
the same defaults here for ``simulate.py`` (``flwr.simulation.run_simulation`` has no run config;
it passes overrides in the ``FEDLORA_FLOWER_RUN_CONFIG`` environment variable, a JSON object).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

INSTRUCT = "instruct"
"""``task`` value of causal-LM instruction tuning (Alpaca-form JSONL, loss on the responses)."""

DEFAULTS: dict[str, Any] = {
    "task": "sst2",  # a GLUE task name, "ag_news", or "instruct" (causal-LM instruction tuning)
    "num-server-rounds": 4,
    "aggregation": "replication",  # any name from hf_fedlora.list_strategies()
    "client-ranks": "2,4,8,16",  # partition i gets rank ranks[i % len] unless its node config sets lora-rank
    "target-modules": "",  # empty: query,value (classification); q_proj,k_proj,v_proj,o_proj (instruct)
    "model": "",  # empty: the embedded all-MiniLM-L6-v2 (classification) or SmolLM2-135M-Instruct (instruct)
    "config-overrides": "",  # model config overrides, e.g. "num_hidden_layers=2" (a smaller model for tests)
    "dtype": "auto",  # instruct: base model dtype (auto: bf16 on a CUDA GPU that supports it, else float32)
    "data-dir": "",  # classification: the GLUE folder or the task's; instruct: folder of alpaca_libre_*.jsonl
    "train-file": "",  # instruct: training JSONL (default: data-dir/alpaca_libre_train.jsonl)
    "validation-file": "",  # instruct: evaluation JSONL (default: data-dir/alpaca_libre_test.jsonl)
    "train-examples-per-client": 320,
    "eval-examples": 872,
    "local-steps": 15,
    "batch-size": 16,
    "max-length": 0,  # 0: 64 tokens (classification), 256 (instruct)
    "lr": 3e-3,
    "lora-dropout": 0.0,
    "seed": 0,
    "partition": "iid",  # iid, dirichlet, high_quality (classification) / iid, dirichlet, task_type (instruct)
    "dirichlet-alpha": 0.5,  # dirichlet and high_quality: concentration of the label skew (small: skewed)
    "high-quality-fraction": 0.1,  # high_quality: share of partitions given class-balanced data
    "device": "",  # empty: cuda when available, else cpu
    "output-dir": "outputs/flower",  # relative: to the ServerApp's working directory (the SuperLink's)
    "hub-repo-id": "",  # set to push every round with hf_fedlora.hub.push_round (token: HF_TOKEN)
    "wait-for-nodes": 0,  # SuperNodes connected before round 1 starts; 0: as many as client-ranks
    "min-available-nodes": 1,  # SuperNodes connected before a later round samples
    "min-train-nodes": 1,  # nodes sampled per round at least
    "fraction-train": 1.0,  # share of the connected nodes sampled per round
    "round-timeout": 600.0,  # seconds a round waits for replies; missing nodes are logged and left out
    "straggler-timeout": 0.0,  # > 0: once min-train-replies replies came, seconds to wait for the rest; 0: off
    "min-train-replies": 1,  # usable replies a round needs to aggregate, else it keeps the previous adapter
}


def run_config(context_config: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults, then ``FEDLORA_FLOWER_RUN_CONFIG`` (JSON), then the Flower run config."""
    config = dict(DEFAULTS)
    config.update(json.loads(os.environ.get("FEDLORA_FLOWER_RUN_CONFIG", "{}")))
    config.update(dict(context_config))
    return config


def is_instruct(config: Mapping[str, Any]) -> bool:
    return str(config["task"]).lower() in (INSTRUCT, "causal-lm")


def client_ranks(config: Mapping[str, Any]) -> list[int]:
    return [int(r) for r in str(config["client-ranks"]).split(",") if r.strip()]


def max_length(config: Mapping[str, Any]) -> int:
    return int(config["max-length"]) or (256 if is_instruct(config) else 64)


def target_modules(config: Mapping[str, Any]) -> list[str]:
    if str(config["target-modules"]).strip():
        return [m.strip() for m in str(config["target-modules"]).split(",") if m.strip()]
    if is_instruct(config):
        from hf_fedlora.federation.causal_trainer import DEFAULT_TARGET_MODULES

        return list(DEFAULT_TARGET_MODULES)
    return ["query", "value"]


def config_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config-overrides`` ("key=value,key=value", values read as YAML scalars) as a dict."""
    import yaml

    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in str(config["config-overrides"]).split(","))):
        if "=" not in item:
            raise ValueError(f"run config `config-overrides`: entry {item!r} must look like key=value.")
        key, value = (s.strip() for s in item.split("=", 1))
        out[key] = yaml.safe_load(value)
    return out


def device(config: Mapping[str, Any]) -> str:
    import torch

    return str(config["device"]) or ("cuda" if torch.cuda.is_available() else "cpu")


# -- data ------------------------------------------------------------------------------------------


def checkout_data_root() -> Path | None:
    """``../shared/data`` next to the project checkout hf_fedlora runs from (editable installs), if any."""
    import hf_fedlora

    root = Path(hf_fedlora.__file__).resolve().parents[2] / "shared" / "data"
    return root if root.is_dir() else None


def data_dir(config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None) -> str | None:
    """The node config's ``data-dir``, else the run config's, else the checkout's data folder for the
    task, else ``None`` (classification then downloads the task from the Hub)."""
    for source in (node_config or {}, config):
        if str(source.get("data-dir", "") or ""):
            return str(source["data-dir"])
    root = checkout_data_root()
    if root is None:
        return None
    task = str(config["task"]).lower()
    sub = "instruct" if is_instruct(config) else ("ag_news" if task.replace("_", "") == "agnews" else "glue")
    return str(root / sub)


def instruct_files(
    config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None
) -> tuple[str, str]:
    folder = data_dir(config, node_config)
    files = []
    for key, name in (
        ("train-file", "alpaca_libre_train.jsonl"),
        ("validation-file", "alpaca_libre_test.jsonl"),
    ):
        path = str((node_config or {}).get(key, "") or config[key])
        if not path:
            if folder is None:
                raise FileNotFoundError(
                    f"task 'instruct' needs `{key}` (or `data-dir`) in the run or node config."
                )
            path = str(Path(folder) / name)
        files.append(path)
    return files[0], files[1]


def load_data(
    config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None, num_partitions: int = 1
):
    """The task's data (``TaskData``, or ``InstructData`` for instruct): a seeded subset of
    ``train-examples-per-client x num_partitions`` training rows and the first ``eval-examples``
    validation rows."""
    max_train = int(config["train-examples-per-client"]) * num_partitions
    max_eval = int(config["eval-examples"]) or None
    seed = int(config["seed"])
    if is_instruct(config):
        from hf_fedlora.federation.instruct_data import load_instruct_task

        train_file, validation_file = instruct_files(config, node_config)
        return load_instruct_task(
            train_file, validation_file, max_train_samples=max_train, max_eval_samples=max_eval, seed=seed
        )
    from hf_fedlora.federation import DataArguments, load_task

    data_args = DataArguments(
        task=str(config["task"]),
        data_dir=data_dir(config, node_config),
        max_train_samples=max_train,
        max_eval_samples=max_eval,
        max_seq_length=max_length(config),
    )
    return load_task(data_args, seed=seed)


def partitioner(config: Mapping[str, Any], num_partitions: int):
    """The recipes' split of the training rows among ``num_partitions`` clients, as ``partition``
    names it: ``hf_fedlora.federation.make_partitioner`` (``iid``, ``dirichlet`` label skew,
    ``high_quality``: the seed paper's split), or for ``instruct`` ``make_instruct_partitioner``
    (``iid``, ``dirichlet`` and ``task_type`` on the rows' task types). Every node computes the same
    split from the same rows and seed.

    Raises:
        ValueError: an unknown ``partition`` (naming the valid ones) or invalid parameters.
    """
    name, seed = str(config["partition"]), int(config["seed"])
    alpha = float(config["dirichlet-alpha"])
    if is_instruct(config):
        from hf_fedlora.federation.instruct_data import make_instruct_partitioner

        return make_instruct_partitioner(name, num_partitions, seed=seed, dirichlet_alpha=alpha)
    from hf_fedlora.federation import make_partitioner

    fraction = float(config["high-quality-fraction"])
    return make_partitioner(
        name, num_partitions, seed=seed, dirichlet_alpha=alpha, high_quality_fraction=fraction
    )


def client_shard(config: Mapping[str, Any], data, partition: int, num_partitions: int):
    """This client's rows: part ``partition`` of the run config's split (:func:`partitioner`) of the
    training rows into ``num_partitions``.

    Raises:
        ValueError: the split leaves this client without rows.
    """
    parts = partitioner(config, num_partitions)(data.train.labels)
    if not 0 <= partition < len(parts) or len(parts[partition]) == 0:
        raise ValueError(
            f"the `{config['partition']}` split of {len(data.train)} training rows into {num_partitions} "
            f"leaves partition {partition} without rows; use fewer partitions, more rows or another split."
        )
    return data.train.select(parts[partition])


# -- the library's trainers --------------------------------------------------------------------------


def trainer(config: Mapping[str, Any], data, lora_alpha: float):
    """The process's cached trainer (the base model is loaded once per process and settings)."""
    common: dict[str, Any] = {
        "target_modules": tuple(target_modules(config)),
        "lora_alpha": float(lora_alpha),
        "lora_dropout": float(config["lora-dropout"]),
        "config_overrides": config_overrides(config) or None,
        "device": device(config),
    }
    if is_instruct(config):
        from hf_fedlora.federation.causal_trainer import get_causal_trainer

        return get_causal_trainer(str(config["model"]) or None, dtype=str(config["dtype"]), **common)
    from hf_fedlora.federation import get_trainer

    labels = tuple(data.label_names) if data.label_names else None
    return get_trainer(
        str(config["model"]) or None,
        data.num_labels,
        is_regression=data.is_regression,
        label_names=labels,
        **common,
    )


def client_arguments(config: Mapping[str, Any], lora_alpha: float):
    """The recipes' ``ClientArguments`` for these settings."""
    from hf_fedlora.federation import ClientArguments

    return ClientArguments(
        local_steps=int(config["local-steps"]),
        per_device_train_batch_size=int(config["batch-size"]),
        learning_rate=float(config["lr"]),
        lora_alpha=float(lora_alpha),
        lora_dropout=float(config["lora-dropout"]),
        target_modules=target_modules(config),
    )


@cache
def _metric(name: str):
    from hf_fedlora.metrics import load_glue_metric

    return load_glue_metric(name, keep_in_memory=True)


def evaluate(config: Mapping[str, Any], data, local_trainer, adapter) -> dict[str, float]:
    """``eval-*`` metrics of ``adapter`` (``None``: the base model, instruct only) on the validation rows:
    the task's GLUE metric and ``eval-score`` (classification), or ``eval-loss``,
    ``eval-perplexity``, ``eval-num-tokens`` and ``eval-score = -loss`` (instruct)."""
    if is_instruct(config):
        values = local_trainer.evaluate(
            adapter, data.validation, batch_size=8, max_seq_length=max_length(config)
        )
    else:
        values = local_trainer.evaluate(
            adapter, data.validation, _metric(data.metric), batch_size=64, max_length=max_length(config)
        )
    return {f"eval-{k.replace('_', '-')}": float(v) for k, v in values.items()}


def card_info(config: Mapping[str, Any], data, local_trainer) -> dict[str, Any]:
    """The model card's facts about the run (``hf_fedlora.hub.build_model_card``'s ``card_info``)."""
    from hf_fedlora.federation.client import PRIMARY_METRIC

    return {
        "base_model": local_trainer.model_name_or_path,
        "task": data.name,
        "strategy": str(config["aggregation"]),
        "rounds": int(config["num-server-rounds"]),
        "rank_distribution": client_ranks(config),
        "seed": int(config["seed"]),
        "eval_metric": "perplexity" if is_instruct(config) else PRIMARY_METRIC.get(data.metric, "accuracy"),
        "dataset": data_dir(config) or data.name,
        "command": "flwr run . <connection> (Flower app recipes/flower)",
        **({} if is_instruct(config) else {"num_labels": data.num_labels}),
    }
