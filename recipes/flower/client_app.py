"""ClientApp: train this client's rank-r LoRA view of the global adapter on its shard.

Training is the library's, as in the recipes: ``hf_fedlora.federation.train_client`` on the
process's ``LocalTrainer`` (sequence classification) or ``CausalLMTrainer`` (``task = "instruct"``).

A client's rank is its own budget: ``lora-rank`` in its node config (``flower-supernode
--node-config "partition-id=0 num-partitions=4 lora-rank=8"``), else ``client-ranks[partition-id]``
from the run config. ``data-dir`` (and, for instruct, ``train-file``) in the node config point the
node at its own data. ``status-dir`` in the node config names a folder where the ClientApp writes
``round-NNNN.received`` when a round's message reaches it, ``round-NNNN.training`` when it starts
training and ``round-NNNN.replied`` when it returns its reply (JSON: node id, round, stage, time), for
monitoring and for tests that must act mid-round.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import task  # isort: skip

app = ClientApp()


def write_status(node: dict, context: Context, server_round: int, stage: str, **extra) -> None:
    """``status-dir/round-NNNN.<stage>`` (written whole, then renamed), when the node config sets one."""
    folder = str(node.get("status-dir", "") or "")
    if not folder:
        return
    info = {
        "node_id": int(context.node_id),
        "round": server_round,
        "stage": stage,
        "time": time.time(),
        **extra,
    }
    path = Path(folder) / f"round-{server_round:04d}.{stage}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


@app.train()
def train_step(msg: Message, context: Context) -> Message:
    node = dict(context.node_config)
    server_round = int(msg.content["config"].get("server-round", 0))
    write_status(node, context, server_round, "received")  # before the heavy imports
    from hf_fedlora.federation import client_seed, train_client
    from hf_fedlora.flower import client_view, train_reply
    from hf_fedlora.flower.strategy import SEND_BACK_KEY

    config = task.run_config(context.run_config)
    partition = int(node.get("partition-id", 0))
    num_partitions = int(node.get("num-partitions", 1))
    ranks = task.client_ranks(config)
    rank = int(node.get("lora-rank", ranks[partition % len(ranks)]))
    alpha = 2.0 * rank  # the alpha of the views HeteroLoraStrategy sends (alpha_ratio 2)

    view = client_view(msg, rank=rank, lora_alpha=alpha)
    write_status(node, context, server_round, "training", partition=partition, rank=rank)
    data = task.load_data(config, node, num_partitions)
    shard = task.client_shard(config, data, partition, num_partitions)
    adapter, metrics = train_client(
        None,
        view,
        rank,
        alpha,
        shard,
        task.client_arguments(config, alpha),
        client_seed(int(config["seed"]), server_round, partition),
        max_seq_length=task.max_length(config),
        send_back=str(msg.content["config"].get(SEND_BACK_KEY, "truncate")),
        trainer=task.trainer(config, data, alpha),
    )
    reply = train_reply(
        msg,
        adapter,
        num_examples=len(shard),
        metrics={
            "train-loss": metrics["loss"],
            "train-seconds": metrics["train_seconds"],
            "rank": float(rank),
        },
    )
    write_status(node, context, server_round, "replied", partition=partition, rank=rank)
    return reply
