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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapters import LoraAdapter
from ..aggregation import aggregate_adapters
from ..errors import AdapterError
from ..screening import screen_clients
from ..constants import MODEL_CARD_NAME
from ..metrics import load_glue_metric
from ..strategies import get_strategy
from .client import LocalTrainer, LocalTrainingArguments, PRIMARY_METRIC
from .config import ClientArguments, DataArguments, FederationArguments, ModelArguments
from .data import TASKS, load_task
from .model_card import render_model_card
from .partition import make_partitioner
from .plots import plot_history, summary_table
from .publish import push_round_safely
from .ranks import allocate_ranks, parse_rank_spec, quality_upgrade
from .state import (
    EXCHANGE_DIR,
    RunState,
    append_record,
    atomic_write_text,
    read_records,
    remove_stale_temporaries,
    round_dir,
    truncate_records,
)

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


def _default_fingerprint(run: "_Run") -> dict[str, Any]:
    """Each option's default value, as :func:`_fingerprint` writes values (for runs saved before an
    option existed)."""
    from dataclasses import MISSING, fields

    defaults = {}
    for group in (run.model_args, run.data_args, run.client_args, run.fed_args):
        for f in fields(group):
            if f.default is not MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not MISSING:
                defaults[f.name] = f.default_factory()
    return json.loads(json.dumps(defaults, default=str))


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


def _command(*groups: Any) -> str:
    """A command line that reproduces the run: every option whose value differs from its default."""
    from dataclasses import MISSING, fields

    parts = ["accelerate launch recipes/fed_glue.py"]
    skip = {"hub_token", "resume", "overwrite_output_dir"}
    for group in groups:
        for f in fields(group):
            value = getattr(group, f.name)
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if f.name in skip or value == default:
                continue
            shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
            parts.append(f"--{f.name} {shown}" if " " not in shown or isinstance(value, list) else f"--{f.name} '{shown}'")
    return " \\\n    ".join(parts)


def _tracker_config(*args: Any) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for group in args:
        for key, value in asdict(group).items():
            if key == "hub_token":
                continue
            flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


@dataclass
class _Run:
    """What every round of one run shares: options, data shards, the trainer and the metric."""

    model_args: ModelArguments
    data_args: DataArguments
    client_args: ClientArguments
    fed_args: FederationArguments
    accelerator: Any
    out: Path
    task: Any
    shards: list
    trainer: LocalTrainer
    local_args: LocalTrainingArguments
    strategy: Any
    metric: Any
    max_rank: int

    @property
    def send_back(self) -> str:
        return self.fed_args.send_back or self.strategy.send_back

    @property
    def metric_name(self) -> str:
        return PRIMARY_METRIC.get(self.task.metric, "accuracy")

    def scoring_round(self, rnd: int) -> bool:
        return self.fed_args.quality_upgrade and rnd <= self.fed_args.upgrade_after_round

    def evaluate(self, adapter: LoraAdapter, split: Any) -> dict[str, float]:
        return self.trainer.evaluate(
            adapter, split, self.metric, self.client_args.per_device_eval_batch_size, self.data_args.max_seq_length
        )

    def card(self) -> dict[str, Any]:
        fed, task = self.fed_args, self.task
        return {
            "base_model": self.model_args.model_name_or_path or "sentence-transformers/all-MiniLM-L6-v2",
            "task": task.name, "strategy": self.strategy.name, "num_clients": fed.num_clients,
            "clients_per_round": fed.clients_per_round, "rounds": fed.rounds, "partition": fed.partition,
            "ranks": f"quality upgrade {fed.low_rank}->{fed.high_rank}" if fed.quality_upgrade else fed.ranks,
            "seed": fed.seed, "eval_metric": self.metric_name, "num_labels": task.num_labels,
            "dataset": self.data_args.data_dir or ("nyu-mll/glue" if task.name in GLUE_TASKS else task.name),
            "command": _command(self.model_args, self.data_args, self.client_args, fed),
        }


def _setup(model_args, data_args, client_args, fed_args, accelerator) -> _Run:
    with accelerator.main_process_first():
        task = load_task(data_args, seed=fed_args.seed)
    parts = make_partitioner(
        fed_args.partition, fed_args.num_clients, seed=fed_args.seed,
        dirichlet_alpha=fed_args.dirichlet_alpha, high_quality_fraction=fed_args.high_quality_fraction,
    )(task.train.labels)
    trainer = LocalTrainer(
        model_args.model_name_or_path, task.num_labels, target_modules=client_args.target_modules,
        lora_alpha=client_args.lora_alpha, lora_dropout=client_args.lora_dropout, use_rslora=client_args.use_rslora,
        is_regression=task.is_regression, config_overrides=model_args.config_overrides(),
        trust_remote_code=model_args.trust_remote_code, label_names=task.label_names, device=accelerator.device,
    )
    return _Run(
        model_args, data_args, client_args, fed_args, accelerator, Path(fed_args.output_dir), task,
        shards=[task.train.select(p) for p in parts],
        trainer=trainer,
        local_args=LocalTrainingArguments.from_args(client_args, data_args.max_seq_length),
        strategy=get_strategy(fed_args.strategy),
        metric=load_glue_metric(task.metric, keep_in_memory=True),
        max_rank=fed_args.high_rank if fed_args.quality_upgrade else parse_rank_spec(fed_args.ranks).max_rank,
    )


def _initial_state(run: _Run, saved: RunState | None) -> RunState:
    """The saved state (checked against the options), or a new one with ``round-0000/`` written."""
    fed = run.fed_args
    fingerprint = _fingerprint(run.model_args, run.data_args, run.client_args, fed)
    if saved is not None:
        saved.check_resumable(fingerprint, run.out, defaults=_default_fingerprint(run))
        return saved
    ranks = (
        [fed.low_rank] * fed.num_clients if fed.quality_upgrade else allocate_ranks(fed.ranks, fed.num_clients, seed=fed.seed)
    )
    state = RunState(ranks=ranks, fingerprint=fingerprint)
    if run.accelerator.is_main_process:
        initial = run.trainer.initial_adapter(run.max_rank, seed=fed.seed)
        initial.provenance = {"round": 0, "what": "initial adapter"}
        initial.save_pretrained(round_dir(run.out, 0))
        truncate_records(run.out, 0)
        state.save(run.out)
    return state


def _train_my_clients(run: _Run, rnd: int, previous: LoraAdapter, state: RunState, exchange: Path) -> None:
    """Train this process's share of the round's clients; each adapter goes to ``exchange``."""
    from tqdm.auto import tqdm

    fed, acc = run.fed_args, run.accelerator
    sampled = sample_clients(fed.seed, rnd, fed.num_clients, fed.clients_per_round)
    probe_all = run.scoring_round(rnd) and fed.quality_scoring == "all"
    mine = (list(range(fed.num_clients)) if probe_all else sampled)[acc.process_index :: acc.num_processes]
    scoring = run.task.validation.select(range(min(fed.quality_eval_samples, len(run.task.validation))))
    steps = sum(run.local_args.num_steps(len(run.shards[c])) for c in mine)
    with tqdm(total=steps, desc=f"round {rnd} local training", leave=False, disable=not acc.is_main_process) as bar:
        for cid in mine:
            seed, rank = client_seed(fed.seed, rnd, cid), state.ranks[cid]
            view = run.trainer.client_view(previous, rank, method=run.send_back, seed=seed)
            adapter, result = run.trainer.train(view, rank, run.shards[cid], run.local_args, seed, progress=bar)
            info = {"client": cid, "rank": rank, **result.as_dict(),
                    "bytes_down": view.num_bytes(), "bytes_up": adapter.num_bytes()}
            if run.scoring_round(rnd):
                info["quality_score"] = run.evaluate(adapter, scoring)["score"]
            if cid not in sampled:  # probed for its score only; not part of this round's aggregate
                atomic_write_text(exchange / f"score-{cid:04d}.json", json.dumps({"client": cid, "quality_score": info["quality_score"]}))
                continue
            adapter.provenance.update(round=rnd, client=info)
            adapter.save_pretrained(exchange / f"client-{cid:04d}")


def _screen(run: _Run, folders: list[Path], sampled: list[int]) -> tuple[list[LoraAdapter], list[dict[str, Any]]]:
    """The round's usable client adapters, and who was dropped and why (``--on_bad_client``)."""
    from accelerate.logging import get_logger

    fed = run.fed_args
    accepted, verdicts = screen_clients(
        folders, max_update_norm=fed.max_update_norm, max_norm_ratio=fed.max_norm_ratio,
        clip_update_norm=fed.clip_update_norm,
    )
    dropped = [{"client": sampled[v.index], "reason": v.reason} for v in verdicts if not v.accepted]
    clipped = [sampled[v.index] for v in verdicts if v.clipped]
    if dropped and fed.on_bad_client == "fail":
        raise AdapterError(
            f"{len(dropped)} client update(s) rejected and `on_bad_client` is 'fail': "
            + "; ".join(f"client {d['client']}: {d['reason']}" for d in dropped)
        )
    for item in dropped:
        get_logger(__name__).warning(f"dropping client {item['client']} from this round: {item['reason']}")
    if clipped:
        get_logger(__name__).info(f"clipped the updates of clients {clipped} to norm {fed.clip_update_norm}")
    return accepted, dropped


def _server_round(
    run: _Run, rnd: int, previous: LoraAdapter, state: RunState, exchange: Path, records: list, timing: dict
) -> dict[str, Any]:
    """Main process: aggregate, save, evaluate, update ranks, push, and write the round's record."""
    fed, out = run.fed_args, run.out
    round_start = timing.pop("_start")
    start = time.perf_counter()
    sampled = sample_clients(fed.seed, rnd, fed.num_clients, fed.clients_per_round)
    clients, dropped = _screen(run, [exchange / f"client-{c:04d}" for c in sampled], sampled)
    target_rank = None if run.strategy.name == "stacking" else run.max_rank
    if clients:
        merged = aggregate_adapters(clients, strategy=run.strategy, target_rank=target_rank, previous=previous)
    else:
        merged = previous  # every update was rejected: the global adapter stays as it was
    merged.provenance.update(round=rnd, sampled_clients=sampled, dropped_clients=dropped)
    merged.save_pretrained(round_dir(out, rnd))
    timing["aggregate"] = round(time.perf_counter() - start, 3)

    start = time.perf_counter()
    evaluation = run.evaluate(merged, run.task.validation)
    timing["eval"] = round(time.perf_counter() - start, 3)
    infos = [c.provenance["client"] for c in clients]
    traffic = sum(i["bytes_up"] + i["bytes_down"] for i in infos)
    state.cumulative_bytes += traffic
    if run.scoring_round(rnd):
        state.scores.update({str(i["client"]): i["quality_score"] for i in infos})
        for probe in sorted(exchange.glob("score-*.json")):
            entry = json.loads(probe.read_text(encoding="utf-8"))
            state.scores[str(entry["client"])] = entry["quality_score"]
        if rnd == fed.upgrade_after_round:
            scores = {int(k): v for k, v in state.scores.items()}
            state.ranks = quality_upgrade(state.ranks, scores, high_rank=fed.high_rank, fraction=fed.upgrade_fraction)
    record = {
        "round": rnd, "clients": infos, "dropped": dropped, "eval": evaluation, "eval_metric": run.metric_name,
        "global_rank": merged.max_rank, "bytes_round": traffic, "cumulative_bytes": state.cumulative_bytes,
        "seconds": timing, "strategy": run.strategy.name, "adapter": round_dir(out, rnd).name,
    }
    if fed.push_to_hub:
        record["hub_push"] = push_round_safely(fed, round_dir(out, rnd), rnd, run.card(), [*records, record])
    timing["wall"] = round(time.perf_counter() - round_start, 3)
    append_record(out, record)
    state.completed_round = rnd
    state.save(out)
    if fed.keep_client_adapters:
        kept = out / "clients" / round_dir(out, rnd).name
        shutil.rmtree(kept, ignore_errors=True)
        kept.parent.mkdir(parents=True, exist_ok=True)
        os.replace(exchange, kept)
    shutil.rmtree(exchange, ignore_errors=True)
    run.accelerator.log(
        {f"eval/{k}": v for k, v in evaluation.items()}
        | {"train/mean_loss": float(np.mean([i["loss"] for i in infos])), "comm/cumulative_mb": state.cumulative_bytes / 1e6},
        step=rnd,
    )
    return record


def run_federation(
    model_args: ModelArguments,
    data_args: DataArguments,
    client_args: ClientArguments,
    fed_args: FederationArguments,
) -> FederationResult:
    """Run (or resume) a simulated federation and write its outputs to ``fed_args.output_dir``.

    Outputs: ``round-0000/`` (initial adapter), ``round-NNNN/`` (global adapter after each round,
    PEFT format), ``metrics.jsonl`` (one line per round), ``state.json`` (for ``--resume``),
    ``metrics.png``, ``README.md`` (model card) and tracker logs under ``fed_glue/``.

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
    is_main = accelerator.is_main_process
    threads = os.environ.get("OMP_NUM_THREADS", "")  # an explicit limit (shared machines, benchmarks) wins
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    saved = _prepare_output(Path(fed_args.output_dir), fed_args, accelerator)
    run = _setup(model_args, data_args, client_args, fed_args, accelerator)
    out = run.out
    state = _initial_state(run, saved)
    records: list[dict[str, Any]] = []
    if is_main:
        if saved is not None:
            get_logger(__name__).info(f"resuming '{out}' after round {state.completed_round}", main_process_only=True)
        shutil.rmtree(out / EXCHANGE_DIR, ignore_errors=True)
        stale = remove_stale_temporaries(out)
        if stale:
            get_logger(__name__).info(f"removed temporaries of an interrupted run: {stale}", main_process_only=True)
        records = truncate_records(out, state.completed_round)
        accelerator.init_trackers("fed_glue", config=_tracker_config(model_args, data_args, client_args, fed_args))
    accelerator.wait_for_everyone()

    rounds_bar = tqdm(
        range(state.completed_round + 1, fed_args.rounds + 1), desc="rounds", disable=not is_main,
        initial=state.completed_round, total=fed_args.rounds,
    )
    for rnd in rounds_bar:
        timing = {"_start": time.perf_counter()}
        previous = LoraAdapter.from_pretrained(round_dir(out, rnd - 1))
        exchange = out / EXCHANGE_DIR / f"round-{rnd:04d}"
        _train_my_clients(run, rnd, previous, state, exchange)
        accelerator.wait_for_everyone()
        timing["train"] = round(time.perf_counter() - timing["_start"], 3)
        if is_main:
            record = _server_round(run, rnd, previous, state, exchange, records, timing)
            records.append(record)
            rounds_bar.set_postfix({run.metric_name: f"{record['eval']['score']:.4f}"})
        accelerator.wait_for_everyone()
        state = RunState.load(out) or state

    records = read_records(out, state.completed_round)
    if is_main:
        shutil.rmtree(out / EXCHANGE_DIR, ignore_errors=True)
        accelerator.print(summary_table(records))
        plot_history(records, out / PLOT_NAME)
        (out / MODEL_CARD_NAME).write_text(render_model_card(run.card(), records), encoding="utf-8")
    accelerator.end_training()
    accelerator.wait_for_everyone()
    return FederationResult(out, records, round_dir(out, state.completed_round))


__all__ = ["FederationResult", "client_seed", "run_federation", "sample_clients"]
