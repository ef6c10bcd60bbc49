"""ClientApp: train this client's rank-r LoRA view of the global adapter on its SST-2 shard.

A client's rank is its own budget: ``lora-rank`` in its node config (``flower-supernode
--node-config "partition-id=0 num-partitions=4 lora-rank=8"``), else ``client-ranks[partition-id]``
from the run config.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from task import lora_config, lora_model, load_split, model_path, run_config, train  # isort: skip

app = ClientApp()


@app.train()
def train_step(msg: Message, context: Context) -> Message:
    from peft import set_peft_model_state_dict
    from transformers import AutoTokenizer

    from hf_fedlora import LoraAdapter
    from hf_fedlora.flower import client_view, train_reply

    config = run_config(context.run_config)
    partition = int(context.node_config.get("partition-id", 0))
    num_partitions = int(context.node_config.get("num-partitions", 1))
    ranks = [int(r) for r in str(config["client-ranks"]).split(",")]
    rank = int(context.node_config.get("lora-rank", ranks[partition % len(ranks)]))
    alpha = 2.0 * rank

    view = client_view(msg, rank=rank, lora_alpha=alpha)
    model = lora_model(config, lora_config(config, rank, alpha))
    set_peft_model_state_dict(model, view.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(model_path(config))
    data = load_split(
        config, "train", partition, num_partitions, limit=int(config["train-examples-per-client"])
    )
    loss = train(model, tokenizer, data, config)
    adapter = LoraAdapter.from_peft_model(model)
    return train_reply(
        msg, adapter, num_examples=len(data), metrics={"train-loss": loss, "rank": float(rank)}
    )
