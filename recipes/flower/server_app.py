"""ServerApp: merge heterogeneous-rank LoRA replies with hf_fedlora, evaluate, save every round.

Outputs in ``output-dir``: ``round-NNNN/`` (the global adapter, loads with
``peft.PeftModel.from_pretrained``), ``metrics.jsonl`` (one line per round: train metrics, the
evaluation on the validation rows, the nodes left out and why), and with ``hub-repo-id`` set, one
Hub commit and ``round-NNNN`` tag per round. The writer is the recipes'
``hf_fedlora.federation.RoundWriter``: a failed push is logged and recorded in the round's
``metrics.jsonl`` line (``hub_push``), and the run goes on. For ``task = "instruct"`` round 0 (the
base model) is evaluated and recorded too.

Lost nodes: a round waits ``round-timeout`` seconds for its replies (with ``straggler-timeout`` set,
at most that long once ``min-train-replies`` replies came), then goes on with those that came
(``min-train-replies`` at least, else it keeps the previous adapter); each missing node is logged
with its id and listed under ``dropped`` in the round's line. Each reply is checked and folded into
the running merge as it arrives (``HeteroLoraStrategy``), so the server holds one reply at a time.
"""

from __future__ import annotations

import math
import os
import time
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

import task  # isort: skip

app = ServerApp()


def _plain(metrics) -> dict:
    """Metric values as JSON values (non-finite floats become ``None``)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in dict(metrics).items()}


def wait_for_nodes(grid: Grid, count: int) -> None:
    """Block until ``count`` SuperNodes are connected (logged every 10 s)."""
    waited = 0
    while (connected := len(list(grid.get_node_ids()))) < count:
        if waited % 10 == 0:
            log(INFO, "waiting for %s SuperNodes before round 1: %s connected", count, connected)
        time.sleep(1)
        waited += 1


@app.main()
def main(grid: Grid, context: Context) -> None:
    from hf_fedlora.federation import DroppedClient, RoundRecord, RoundWriter
    from hf_fedlora.flower import HeteroLoraStrategy, adapter_to_records

    config = task.run_config(context.run_config)
    ranks = task.client_ranks(config)
    global_rank = max(ranks)
    data = task.load_data(config)
    trainer = task.trainer(config, data, lora_alpha=2.0 * global_rank)
    writer = RoundWriter(
        config["output-dir"],
        hub_repo_id=config["hub-repo-id"] or None,
        token=os.environ.get("HF_TOKEN"),
        card_info=task.card_info(config, data, trainer),
    )
    train_metrics: dict[int, dict] = {}
    strategy = HeteroLoraStrategy(
        aggregation=config["aggregation"],
        fraction_train=float(config["fraction-train"]),
        fraction_evaluate=0.0,  # the server evaluates the global adapter itself
        min_train_nodes=int(config["min-train-nodes"]),
        min_available_nodes=int(config["min-available-nodes"]),
        min_train_replies=int(config["min-train-replies"]),
        on_aggregate=lambda rnd, adapter, metrics: train_metrics.__setitem__(rnd, dict(metrics or {})),
    )
    started = time.perf_counter()

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            if not task.is_instruct(config):
                return None  # an untrained classification head scores chance
            metrics = {
                **task.evaluate(config, data, trainer, None),
                "wall-time-s": time.perf_counter() - started,
            }
            writer.append(RoundRecord(0, metrics=_plain(metrics)))  # the base model; its folder is round-0000
            return MetricRecord(metrics)
        adapter = strategy.global_adapter
        record = next((r for r in reversed(strategy.rounds) if r.server_round == server_round), None)
        metrics = dict(
            train_metrics.get(server_round) or {"clients-accepted": 0}
        )  # {}: kept the previous adapter
        if record is not None:
            metrics.setdefault("clients-rejected", len(record.rejected))
            metrics.setdefault("clients-lost", len(record.lost))
        metrics.update(task.evaluate(config, data, trainer, adapter))
        metrics["wall-time-s"] = time.perf_counter() - started
        dropped = (
            [DroppedClient(node, why) for node, why in (record.rejected + record.lost)] if record else []
        )
        writer.write(RoundRecord(server_round, dropped=dropped, metrics=_plain(metrics)), adapter)
        return MetricRecord(metrics)

    # The initial global adapter: the recipes' seeded initialisation at the largest rank, stored at scale 1.
    initial = trainer.initial_adapter(global_rank, seed=int(config["seed"])).to_rank(global_rank, global_rank)
    writer.save_adapter(0, initial)
    wait_for_nodes(grid, int(config["wait-for-nodes"]) or len(ranks))
    arrays, adapter_config = adapter_to_records(initial)
    result = strategy.start(
        grid,
        initial_arrays=arrays,
        train_config=ConfigRecord(dict(adapter_config)),
        num_rounds=int(config["num-server-rounds"]),
        timeout=float(config["round-timeout"]),
        straggler_timeout=float(config["straggler-timeout"]) or None,
        evaluate_fn=evaluate_global,
    )
    final = result.evaluate_metrics_serverapp.get(int(config["num-server-rounds"]))
    print(f"final global adapter: {writer.round_dir(int(config['num-server-rounds']))} {dict(final or {})}")
