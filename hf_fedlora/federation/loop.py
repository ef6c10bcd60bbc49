"""The federated round loop: sample, train locally, aggregate, evaluate, checkpoint, push.

Under ``accelerate launch --num_processes K`` the sampled clients are dealt to the K processes,
each trains its clients one after another on its own copy of the base model, and writes each
trained adapter to ``output_dir/_exchange/round-NNNN/client-CCCC``. After a barrier the main
process aggregates, writes ``round-NNNN/`` and the round's JSONL line, and everybody reads the new
global adapter back from disk. Client training is seeded from ``(seed, round, client)``, so the
global adapter is the same (within float tolerance) for any K.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapters import LoraAdapter
from ..aggregation import aggregate_adapters
from ..constants import MODEL_CARD_NAME
from ..metrics import load_glue_metric
from ..strategies import get_strategy
from .client import LocalTrainer, LocalTrainingArguments, PRIMARY_METRIC
from .config import ClientArguments, DataArguments, FederationArguments, ModelArguments
from .data import TASKS, load_task
from .model_card import render_model_card
from .partition import make_partitioner
from .plots import plot_history, summary_table
from .ranks import allocate_ranks, parse_rank_spec, quality_upgrade
from .state import EXCHANGE_DIR, RunState, append_record, read_records, round_dir, truncate_records

PLOT_NAME = "metrics.png"
GLUE_TASKS = tuple(t for t, spec in TASKS.items() if spec.hub_id == "nyu-mll/glue")


@dataclass
class FederationResult:
    """What :func:`run_federation` returns (on every process)."""

    output_dir: Path
    records: list[dict[str, Any]]
    final_adapter: Path

    @property
    def final_metrics(self) -> dict[str, float]:
        return self.records[-1]["eval"] if self.records else {}


def client_seed(seed: int, round_index: int, client_id: int) -> int:
    """The seed of one client's local training in one round (independent of the process)."""
    return int(np.random.SeedSequence([seed, round_index, client_id]).generate_state(1)[0])


def sample_clients(seed: int, round_index: int, num_clients: int, clients_per_round: int) -> list[int]:
    """The sorted client ids sampled (without replacement) in ``round_index``."""
    rng = np.random.default_rng([seed, round_index, 7919])
    return sorted(int(c) for c in rng.choice(num_clients, size=clients_per_round, replace=False))


def _fingerprint(model_args, data_args, client_args, fed_args) -> dict[str, Any]:
    keep = ("rounds", "output_dir", "resume", "overwrite_output_dir", "report_to", "push_to_hub", "hub_model_id",
            "hub_private", "hub_token")
    fed = {k: v for k, v in asdict(fed_args).items() if k not in keep}
    return json.loads(json.dumps({**asdict(model_args), **asdict(data_args), **asdict(client_args), **fed}))


def _prepare_output(out: Path, fed_args: FederationArguments, accelerator: Any) -> RunState | None:
    """Check the output folder (every process), clear it if asked (main), and return a saved state."""
    state = RunState.load(out)
    if state is not None and not fed_args.resume and not fed_args.overwrite_output_dir:
        raise FileExistsError(
            f"'{out}' already holds a run (round {state.completed_round} complete); pass `--resume` to continue "
            "it, `--overwrite_output_dir` to start over, or choose another `--output_dir`."
        )
    if fed_args.resume and state is not None:
        return state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and out.exists() and fed_args.overwrite_output_dir:
        shutil.rmtree(out)
    accelerator.wait_for_everyone()
    return None


def _push(fed_args: FederationArguments, folder: Path, round_index: int, card: dict, records: list) -> dict:
    """Push a round with ``hf_fedlora.hub.push_round``; failures are reported, never raised."""
    from accelerate.logging import get_logger

    try:
        from ..hub import push_round

        history = [
            {"round": r["round"], **{f"eval_{k}": v for k, v in r["eval"].items() if k != "score"},
             "mean_loss": float(np.mean([c["loss"] for c in r["clients"]])), "cumulative_mb": r["cumulative_bytes"] / 1e6}
            for r in records
        ]
        info = {k: card[k] for k in ("base_model", "strategy", "num_clients", "clients_per_round", "task", "dataset")}
        commit = push_round(
            folder, fed_args.hub_model_id, round_index, token=fed_args.hub_token, private=fed_args.hub_private,
            card_info={**info, "rank_distribution": card["ranks"]}, metrics_history=history,
        )
        return {"ok": True, "commit": commit, "skipped": commit is None}
    except Exception as exc:  # a network or auth failure must not lose the local round
        message = f"{type(exc).__name__}: {exc}"
        if fed_args.hub_token:
            message = message.replace(fed_args.hub_token, "***")
        get_logger(__name__).error(
            f"pushing round {round_index} to '{fed_args.hub_model_id}' failed ({message}); the round is saved in "
            f"'{folder}' and training continues. Push it later with `hf-fedlora push`."
        )
        return {"ok": False, "error": message}


def _tracker_config(*args: Any) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for group in args:
        for key, value in asdict(group).items():
            if key == "hub_token":
                continue
            flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def run_federation(
    model_args: ModelArguments,
    data_args: DataArguments,
    client_args: ClientArguments,
    fed_args: FederationArguments,
) -> FederationResult:
    """Run (or resume) a simulated federation and write its outputs to ``fed_args.output_dir``.

    Outputs: ``round-0000/`` (initial adapter), ``round-NNNN/`` (global adapter after each round,
    PEFT format), ``metrics.jsonl`` (one line per round), ``state.json`` (for ``--resume``),
    ``metrics.png``, ``README.md`` (model card) and tracker logs under ``runs/``.

    Returns:
        A :class:`FederationResult` with the records of all complete rounds.

    Raises:
        FileExistsError: ``output_dir`` holds a run and neither ``resume`` nor ``overwrite_output_dir`` is set.
        ValueError: invalid options, or resuming with options that differ from the saved run.
    """
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from tqdm.auto import tqdm

    accelerator = Accelerator(log_with=fed_args.report_to or None, project_dir=fed_args.output_dir)
    logger = get_logger(__name__)
    is_main, rank_id, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    out = Path(fed_args.output_dir)
    saved = _prepare_output(out, fed_args, accelerator)

    with accelerator.main_process_first():
        task = load_task(data_args, seed=fed_args.seed)
    parts = make_partitioner(
        fed_args.partition, fed_args.num_clients, seed=fed_args.seed,
        dirichlet_alpha=fed_args.dirichlet_alpha, high_quality_fraction=fed_args.high_quality_fraction,
    )(task.train.labels)
    shards = [task.train.select(p) for p in parts]
    trainer = LocalTrainer(
        model_args.model_name_or_path, task.num_labels, target_modules=client_args.target_modules,
        lora_alpha=client_args.lora_alpha, lora_dropout=client_args.lora_dropout, use_rslora=client_args.use_rslora,
        is_regression=task.is_regression, config_overrides=model_args.config_overrides(),
        trust_remote_code=model_args.trust_remote_code, label_names=task.label_names,
    )
    local_args = LocalTrainingArguments.from_args(client_args, data_args.max_seq_length)
    strategy = get_strategy(fed_args.strategy)
    send_back = fed_args.send_back or strategy.send_back
    metric = load_glue_metric(task.metric, keep_in_memory=True)
    metric_name = PRIMARY_METRIC.get(task.metric, "accuracy")
    max_rank = fed_args.high_rank if fed_args.quality_upgrade else parse_rank_spec(fed_args.ranks).max_rank
    target_rank = None if strategy.name == "stacking" else max_rank
    fingerprint = _fingerprint(model_args, data_args, client_args, fed_args)

    if saved is not None:
        saved.check_resumable(fingerprint, out)
        state = saved
        logger.info(f"resuming '{out}' after round {state.completed_round}", main_process_only=True)
    else:
        ranks = (
            [fed_args.low_rank] * fed_args.num_clients if fed_args.quality_upgrade
            else allocate_ranks(fed_args.ranks, fed_args.num_clients, seed=fed_args.seed)
        )
        state = RunState(ranks=ranks, fingerprint=fingerprint)
        if is_main:
            initial = trainer.initial_adapter(max_rank, seed=fed_args.seed)
            initial.provenance = {"round": 0, "what": "initial adapter"}
            initial.save_pretrained(round_dir(out, 0))
            truncate_records(out, 0)
            state.save(out)
    if is_main:
        shutil.rmtree(out / EXCHANGE_DIR, ignore_errors=True)
        records = truncate_records(out, state.completed_round)
        accelerator.init_trackers("fed_glue", config=_tracker_config(model_args, data_args, client_args, fed_args))
    accelerator.wait_for_everyone()

    card = {
        "base_model": trainer.model_name_or_path if model_args.model_name_or_path else "sentence-transformers/all-MiniLM-L6-v2",
        "task": task.name, "strategy": strategy.name, "num_clients": fed_args.num_clients,
        "clients_per_round": fed_args.clients_per_round, "rounds": fed_args.rounds, "partition": fed_args.partition,
        "ranks": f"quality upgrade {fed_args.low_rank}->{fed_args.high_rank}" if fed_args.quality_upgrade else fed_args.ranks,
        "seed": fed_args.seed, "eval_metric": metric_name, "num_labels": task.num_labels,
        "dataset": data_args.data_dir or ("nyu-mll/glue" if task.name in GLUE_TASKS else task.name),
        "command": "accelerate launch " + " ".join(["recipes/fed_glue.py", *sys.argv[1:]]),
    }
    scoring = task.validation.select(range(min(fed_args.quality_eval_samples, len(task.validation))))
    rounds_bar = tqdm(
        range(state.completed_round + 1, fed_args.rounds + 1), desc="rounds", disable=not is_main,
        initial=state.completed_round, total=fed_args.rounds,
    )
    for rnd in rounds_bar:
        round_start = time.perf_counter()
        previous = LoraAdapter.from_pretrained(round_dir(out, rnd - 1))
        sampled = sample_clients(fed_args.seed, rnd, fed_args.num_clients, fed_args.clients_per_round)
        mine = sampled[rank_id::world]
        exchange = out / EXCHANGE_DIR / f"round-{rnd:04d}"
        steps = sum(local_args.num_steps(len(shards[c])) for c in mine)
        with tqdm(total=steps, desc=f"round {rnd} local training", leave=False, disable=not is_main) as bar:
            for cid in mine:
                seed, rank = client_seed(fed_args.seed, rnd, cid), state.ranks[cid]
                view = trainer.client_view(previous, rank, method=send_back, seed=seed)
                adapter, result = trainer.train(view, rank, shards[cid], local_args, seed, progress=bar)
                info = {"client": cid, "rank": rank, **result.as_dict(),
                        "bytes_down": view.num_bytes(), "bytes_up": adapter.num_bytes()}
                if fed_args.quality_upgrade and rnd <= fed_args.upgrade_after_round:
                    info["quality_score"] = trainer.evaluate(
                        adapter, scoring, metric, client_args.per_device_eval_batch_size, data_args.max_seq_length
                    )["score"]
                adapter.provenance.update(round=rnd, client=info)
                adapter.save_pretrained(exchange / f"client-{cid:04d}")
        accelerator.wait_for_everyone()
        train_seconds = time.perf_counter() - round_start

        if is_main:
            start = time.perf_counter()
            clients = [LoraAdapter.from_pretrained(exchange / f"client-{c:04d}") for c in sampled]
            merged = aggregate_adapters(clients, strategy=strategy, target_rank=target_rank, previous=previous)
            merged.provenance.update(round=rnd, sampled_clients=sampled)
            merged.save_pretrained(round_dir(out, rnd))
            aggregate_seconds = time.perf_counter() - start

            start = time.perf_counter()
            evaluation = trainer.evaluate(
                merged, task.validation, metric, client_args.per_device_eval_batch_size, data_args.max_seq_length
            )
            eval_seconds = time.perf_counter() - start
            infos = [c.provenance["client"] for c in clients]
            traffic = sum(i["bytes_up"] + i["bytes_down"] for i in infos)
            state.cumulative_bytes += traffic
            if fed_args.quality_upgrade and rnd <= fed_args.upgrade_after_round:
                state.scores.update({str(i["client"]): i["quality_score"] for i in infos})
                if rnd == fed_args.upgrade_after_round:
                    state.ranks = quality_upgrade(
                        state.ranks, {int(k): v for k, v in state.scores.items()},
                        high_rank=fed_args.high_rank, fraction=fed_args.upgrade_fraction,
                    )
            record = {
                "round": rnd, "clients": infos, "eval": evaluation, "eval_metric": metric_name,
                "global_rank": merged.max_rank, "bytes_round": traffic, "cumulative_bytes": state.cumulative_bytes,
                "seconds": {"train": round(train_seconds, 3), "aggregate": round(aggregate_seconds, 3),
                            "eval": round(eval_seconds, 3), "wall": None},
                "strategy": strategy.name, "adapter": round_dir(out, rnd).name,
            }
            if fed_args.push_to_hub:
                record["hub_push"] = _push(fed_args, round_dir(out, rnd), rnd, card, [*records, record])
            record["seconds"]["wall"] = round(time.perf_counter() - round_start, 3)
            append_record(out, record)
            records.append(record)
            state.completed_round = rnd
            state.save(out)
            shutil.rmtree(exchange, ignore_errors=True)
            accelerator.log({f"eval/{k}": v for k, v in evaluation.items()}
                            | {"train/mean_loss": float(np.mean([i["loss"] for i in infos])),
                               "comm/cumulative_mb": state.cumulative_bytes / 1e6}, step=rnd)
            rounds_bar.set_postfix({metric_name: f"{evaluation['score']:.4f}"})
        accelerator.wait_for_everyone()
        state = RunState.load(out) or state

    records = read_records(out, state.completed_round)
    if is_main:
        shutil.rmtree(out / EXCHANGE_DIR, ignore_errors=True)
        accelerator.print(summary_table(records))
        plot_history(records, out / PLOT_NAME)
        (out / MODEL_CARD_NAME).write_text(render_model_card(card, records), encoding="utf-8")
    accelerator.end_training()
    accelerator.wait_for_everyone()
    return FederationResult(out, records, round_dir(out, state.completed_round))


__all__ = ["FederationResult", "client_seed", "run_federation", "sample_clients"]
