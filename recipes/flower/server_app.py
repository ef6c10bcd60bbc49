"""ServerApp: merge heterogeneous-rank LoRA replies with hf_fedlora, evaluate, save every round.

Outputs in ``output-dir``: ``round-NNNN/`` (the global adapter, loads with
``peft.PeftModel.from_pretrained``), ``metrics.jsonl`` (train and SST-2 dev metrics per round), and
with ``hub-repo-id`` set, one Hub commit and ``round-NNNN`` tag per round. The writer is the recipe's
``hf_fedlora.federation.RoundWriter``: a failed push is logged and recorded in the round's
``metrics.jsonl`` line (``hub_push``), and the run goes on.
"""

from __future__ import annotations

import os
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from task import evaluate, lora_config, lora_model, load_split, model_path, run_config  # isort: skip

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from peft import set_peft_model_state_dict
    from transformers import AutoTokenizer

    from hf_fedlora import LoraAdapter
    from hf_fedlora.flower import HeteroLoraStrategy, RoundWriter, adapter_to_records

    config = run_config(context.run_config)
    ranks = [int(r) for r in str(config["client-ranks"]).split(",")]
    global_rank = max(ranks)
    writer = RoundWriter(
        config["output-dir"],
        hub_repo_id=config["hub-repo-id"] or None,
        token=os.environ.get("HF_TOKEN"),
        card_info={"base_model": model_path(config), "dataset": "SST-2", "strategy": config["aggregation"]},
    )
    last_train: dict[str, float] = {}
    strategy = HeteroLoraStrategy(
        aggregation=config["aggregation"],
        fraction_evaluate=0.0,  # the server evaluates the global adapter itself
        min_train_nodes=len(ranks),
        min_available_nodes=len(ranks),
        on_aggregate=lambda rnd, adapter, metrics: last_train.update(dict(metrics or {})),
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path(config))
    dev = load_split(config, "dev", limit=int(config["eval-examples"]))
    started = time.perf_counter()

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        adapter = strategy.global_adapter if server_round > 0 else initial
        model = lora_model(config, adapter.config)
        set_peft_model_state_dict(model, adapter.state_dict())
        metrics = evaluate(model, tokenizer, dev, config)
        metrics["wall-time-s"] = time.perf_counter() - started
        if server_round > 0:
            writer(server_round, adapter, {**last_train, **metrics})
        return MetricRecord(metrics)

    # The initial global adapter: PEFT's initialisation at the largest rank, stored at scale 1.
    peft_model = lora_model(config, lora_config(config, global_rank, global_rank))
    initial = LoraAdapter.from_peft_model(peft_model).to_rank(global_rank, global_rank)
    arrays, adapter_config = adapter_to_records(initial)
    result = strategy.start(
        grid,
        initial_arrays=arrays,
        train_config=ConfigRecord(dict(adapter_config)),
        num_rounds=int(config["num-server-rounds"]),
        evaluate_fn=evaluate_global,
    )
    final = result.evaluate_metrics_serverapp.get(int(config["num-server-rounds"]))
    print(f"final global adapter: {writer.round_dir(int(config['num-server-rounds']))} {dict(final or {})}")
