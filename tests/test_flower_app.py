"""recipes/flower's apps without Flower's processes: the ClientApp's train function on a message
built by HeteroLoraStrategy, for both tasks, trains through the library's trainers (one code path)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, RecordDict  # noqa: E402
from testing_utils import REPO_ROOT  # noqa: E402

from hf_fedlora import LoraAdapter  # noqa: E402
from hf_fedlora.flower import HeteroLoraStrategy, adapter_from_records, adapter_to_records  # noqa: E402

RECIPE = REPO_ROOT / "recipes" / "flower"
pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("flower_server_identity")]


@pytest.fixture
def apps(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(RECIPE))
    for name in ("task", "client_app"):
        sys.modules.pop(name, None)
    yield importlib.import_module("task"), importlib.import_module("client_app")
    for name in ("task", "client_app"):
        sys.modules.pop(name, None)


class _Grid:
    def get_node_ids(self):
        return [7]


def _train_once(task, client_app, run_config: dict, rank: int) -> tuple[LoraAdapter, LoraAdapter, dict]:
    """The server's initial adapter at rank 8, sent by the strategy to node 7 (rank ``rank``), trained."""
    config = task.run_config(run_config)
    data = task.load_data(config)
    trainer = task.trainer(config, data, lora_alpha=16.0)
    initial = trainer.initial_adapter(8, seed=0).to_rank(8, 8)
    arrays, adapter_config = adapter_to_records(initial)
    strategy = HeteroLoraStrategy(rank_allocation={7: rank}, min_available_nodes=1, min_train_nodes=1)
    (msg,) = strategy.configure_train(1, arrays, ConfigRecord(dict(adapter_config)), _Grid())
    node_config = {"partition-id": 1, "num-partitions": 2, "lora-rank": rank}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)
    reply = client_app.train_step(msg, context)
    trained = adapter_from_records(reply.content["arrays"], reply.content["config"])
    return initial, trained, dict(reply.content["metrics"])


def test_classification_client_trains_with_the_library_trainer(
    apps, tiny_model_dir, shared_data, monkeypatch
):
    task, client_app = apps
    from hf_fedlora.federation import client as client_module

    calls = []
    original = client_module.LocalTrainer.train
    monkeypatch.setattr(
        client_module.LocalTrainer,
        "train",
        lambda self, *a, **k: calls.append(type(self)) or original(self, *a, **k),
    )
    run_config = {
        "model": str(tiny_model_dir),
        "data-dir": str(shared_data / "glue"),
        "train-examples-per-client": 16,
        "eval-examples": 16,
        "local-steps": 2,
        "batch-size": 4,
        "max-length": 32,
    }
    initial, trained, metrics = _train_once(task, client_app, run_config, rank=4)
    assert calls == [
        client_module.LocalTrainer
    ]  # train_client -> LocalTrainer.train, no loop of the app's own
    assert set(trained.ranks.values()) == {4} and trained.config.lora_alpha == 8
    assert (
        metrics["num-examples"] == 16
        and metrics["rank"] == 4.0
        and torch.isfinite(torch.tensor(metrics["train-loss"]))
    )
    view = initial.to_rank(4, 8)
    assert any(not torch.equal(view.state_dict()[k], v) for k, v in trained.state_dict().items())
    config = task.run_config(run_config)
    data = task.load_data(config)
    scores = task.evaluate(config, data, task.trainer(config, data, 8.0), trained)
    assert set(scores) == {"eval-accuracy", "eval-score"}


def test_instruct_client_trains_the_causal_lm(apps, tiny_llama_dir, shared_data):
    task, client_app = apps
    from hf_fedlora.federation.causal_trainer import CausalLMTrainer

    run_config = {
        "task": "instruct",
        "model": str(tiny_llama_dir),
        "data-dir": str(shared_data / "instruct"),
        "train-examples-per-client": 8,
        "eval-examples": 8,
        "local-steps": 2,
        "batch-size": 4,
        "max-length": 64,
        "lr": 5e-3,
    }
    initial, trained, metrics = _train_once(task, client_app, run_config, rank=2)
    assert set(trained.ranks.values()) == {2} and "q_proj" in " ".join(trained.modules)
    assert trained.config.task_type == "CAUSAL_LM" and metrics["num-examples"] == 8
    config = task.run_config(run_config)
    data = task.load_data(config)
    local_trainer = task.trainer(config, data, 4.0)
    assert isinstance(local_trainer, CausalLMTrainer)
    base = task.evaluate(config, data, local_trainer, None)  # round 0: the base model
    after = task.evaluate(config, data, local_trainer, trained)
    assert set(base) == {"eval-loss", "eval-perplexity", "eval-score", "eval-num-tokens"}
    assert after["eval-num-tokens"] == base["eval-num-tokens"] and after["eval-loss"] != base["eval-loss"]


def test_run_config_keys_are_the_pyproject_keys(apps) -> None:
    """Every key the apps read has a default in pyproject.toml (flwr refuses overrides of unknown keys)."""
    import tomllib

    task, _ = apps
    project = tomllib.loads((RECIPE / "pyproject.toml").read_text())
    app_config = project["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == set(task.DEFAULTS)
    for key, value in app_config.items():
        assert value == task.DEFAULTS[key], key
    federations = project["tool"]["flwr"]["federations"]
    assert federations["local-deployment"] == {"address": "127.0.0.1:8000", "insecure": True}


def _label_spread(labels, parts) -> float:
    """How far apart the clients' shares of the most common label are (0: identical mixes)."""
    import numpy as np

    labels = np.asarray(labels)
    common = np.bincount(labels).argmax()
    shares = [float(np.mean(labels[p] == common)) for p in parts]
    return max(shares) - min(shares)


@pytest.mark.parametrize(
    "kind, split, extra",
    [
        ("sst2", "dirichlet", {"dirichlet-alpha": 0.1}),
        ("sst2", "high_quality", {"high-quality-fraction": 0.25, "dirichlet-alpha": 0.1}),
        ("instruct", "task_type", {}),
    ],
)
def test_non_iid_partitions_from_the_run_config(apps, shared_data, kind, split, extra) -> None:
    """`partition` in the run config splits the rows as the recipes do: disjoint shards covering every
    row, the same on every node, and label (or task-type) skewed where the IID split is not."""
    import numpy as np

    task, _ = apps
    base = {"task": kind, "train-examples-per-client": 40, "eval-examples": 8, "max-length": 32}
    base["data-dir"] = str(shared_data / ("instruct" if kind == "instruct" else "glue"))
    iid, skewed = task.run_config(base), task.run_config({**base, "partition": split, **extra})
    data = task.load_data(skewed, {}, 4)
    labels = np.asarray(data.train.labels)
    parts = task.partitioner(skewed, 4)(labels)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))  # disjoint, every row
    again = task.partitioner(task.run_config({**base, "partition": split, **extra}), 4)(labels)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # every node computes the same split
    assert _label_spread(labels, parts) > _label_spread(labels, task.partitioner(iid, 4)(labels)) + 0.1
    for i, part in enumerate(parts):
        shard, expected = task.client_shard(skewed, data, i, 4), data.train.select(part)
        rows = "texts" if hasattr(expected, "texts") else "instructions"
        assert len(shard) == len(part) and list(getattr(shard, rows)) == list(getattr(expected, rows))
    with pytest.raises(ValueError, match="`partition` must be one of"):
        task.partitioner(task.run_config({**base, "partition": "by_vibes"}), 4)
