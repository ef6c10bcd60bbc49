"""The federated round loop: sample, train locally, aggregate, evaluate, checkpoint, push.

Under ``accelerate launch --num_processes K`` the sampled clients are dealt to the K processes,
each trains its clients one after another on its own copy of the base model, and writes each
trained adapter to ``output_dir/_exchange/round-NNNN/client-CCCC``. After a barrier the main
process runs the server's steps (screen, aggregate, evaluate, update ranks, write), and everybody
reads the new global adapter back from disk. Client training is seeded from ``(seed, round,
client)``, so the global adapter is the same (within float tolerance) for any K.

The library sets no process-wide state: how many threads torch uses is the caller's choice
(the recipes call :func:`set_torch_threads`: ``OMP_NUM_THREADS``, or the cores per process).

The same loop runs every task kind (:mod:`.kinds`): sequence classification (``recipes/fed_glue.py``)
and instruction tuning of a causal LM (``recipes/fed_instruct.py``, whose round 0 is the base model
evaluated before any training).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate.logging import get_logger

from ..adapters import LoraAdapter
from ..aggregation import aggregate_adapters
from ..constants import MODEL_CARD_NAME
from ..errors import AdapterError
from ..hub import build_model_card
from ..screening import screen_clients
from .config import ClientArguments, DataArguments, FederationArguments, ModelArguments, tracker_config
from .instruct_config import InstructDataArguments
from .plots import plot_history, summary_table
from .ranks import quality_upgrade
from .rounds import ClientRecord, DroppedClient, RoundRecord, atomic_write_text, read_records, round_dir
from .run import FederationRun, initial_state, setup_run
from .state import EXCHANGE_DIR, RunState, prepare_output_dir, remove_stale_temporaries

logger = get_logger(__name__)

PLOT_NAME = "metrics.png"


@dataclass
class FederationResult:
    """What :func:`run_federation` returns (on every process)."""

    output_dir: Path
    records: list[RoundRecord]
    final_adapter: Path

    @property
    def final_metrics(self) -> dict[str, float]:
        return (self.records[-1].eval or {}) if self.records else {}


def set_torch_threads() -> int:
    """Give torch ``OMP_NUM_THREADS`` threads when set (shared machines), else this machine's cores
    divided among the ``accelerate launch`` processes; returns the count. The recipes call it after
    parsing (a config's ``env:`` block may set ``OMP_NUM_THREADS``)."""
    import torch
    from accelerate import PartialState

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        count = int(threads)
    else:
        count = max(1, (os.cpu_count() or 1) // PartialState().num_processes)
    torch.set_num_threads(count)
    return count


def client_seed(seed: int, round_index: int, client_id: int) -> int:
    """The seed of one client's local training in one round (independent of the process)."""
    return int(np.random.SeedSequence([seed, round_index, client_id]).generate_state(1)[0])


def sample_clients(seed: int, round_index: int, num_clients: int, clients_per_round: int) -> list[int]:
    """The sorted client ids sampled (without replacement) in ``round_index``."""
    rng = np.random.default_rng([seed, round_index, 7919])
    return sorted(int(c) for c in rng.choice(num_clients, size=clients_per_round, replace=False))


def _train_my_clients(
    run: FederationRun, rnd: int, previous: LoraAdapter, state: RunState, exchange: Path
) -> None:
    """Train this process's share of the round's clients; each adapter goes to ``exchange``."""
    from tqdm.auto import tqdm

    fed, acc = run.fed_args, run.accelerator
    sampled = sample_clients(fed.seed, rnd, fed.num_clients, fed.clients_per_round)
    probe_all = run.scoring_round(rnd) and fed.quality_scoring == "all"
    mine = (list(range(fed.num_clients)) if probe_all else sampled)[acc.process_index :: acc.num_processes]
    scoring = run.task.validation.select(range(min(fed.quality_eval_samples, len(run.task.validation))))
    steps = sum(run.client_args.num_local_steps(len(run.shards[c])) for c in mine)
    with tqdm(
        total=steps, desc=f"round {rnd} local training", leave=False, disable=not acc.is_main_process
    ) as bar:
        for cid in mine:
            seed, rank = client_seed(fed.seed, rnd, cid), state.ranks[cid]
            view = run.trainer.client_view(previous, rank, method=run.send_back, seed=seed)
            adapter, result = run.trainer.train(
                view,
                rank,
                run.shards[cid],
                run.client_args,
                seed,
                max_seq_length=run.data_args.max_seq_length,
                progress=bar,
            )
            info = ClientRecord(
                client=cid,
                rank=rank,
                **result.as_dict(),
                bytes_down=view.num_bytes(),
                bytes_up=adapter.num_bytes(),
            )
            if run.scoring_round(rnd):
                info.quality_score = run.evaluate(adapter, scoring)["score"]
            if cid not in sampled:  # probed for its score only; not part of this round's aggregate
                probe = {"client": cid, "quality_score": info.quality_score}
                atomic_write_text(exchange / f"score-{cid:04d}.json", json.dumps(probe))
                continue
            adapter.provenance.update(round=rnd, client=info.to_dict())
            adapter.save_pretrained(exchange / f"client-{cid:04d}")


# -- the server's steps (main process) ------------------------------------------------------------


def _screen(
    run: FederationRun, exchange: Path, sampled: list[int], previous: LoraAdapter
) -> tuple[list[LoraAdapter], list[DroppedClient]]:
    """The round's usable client adapters, and who was dropped and why (``--on_bad_client``).

    Clients are checked against the previous global adapter, never against one another, so a
    hostile first client cannot make the honest ones look incompatible."""
    fed = run.fed_args
    accepted, verdicts = screen_clients(
        [exchange / f"client-{c:04d}" for c in sampled],
        reference=previous,
        max_update_norm=fed.max_update_norm,
        max_norm_ratio=fed.max_norm_ratio,
        clip_update_norm=fed.clip_update_norm,
    )
    dropped = [DroppedClient(sampled[v.index], v.reason) for v in verdicts if not v.accepted]
    clipped = [sampled[v.index] for v in verdicts if v.clipped]
    if dropped and fed.on_bad_client == "fail":
        raise AdapterError(
            f"{len(dropped)} client update(s) rejected and `on_bad_client` is 'fail': "
            + "; ".join(f"client {d.client}: {d.reason}" for d in dropped)
        )
    for item in dropped:
        logger.warning(f"dropping client {item.client} from this round: {item.reason}")
    if clipped:
        logger.info(f"clipped the updates of clients {clipped} to norm {fed.clip_update_norm}")
    return accepted, dropped


def _aggregate(run: FederationRun, clients: list[LoraAdapter], previous: LoraAdapter) -> LoraAdapter:
    """The new global adapter: the rule's merge of the accepted clients, kept at the run's largest
    rank unless the rule's rank grows with the clients (stacking)."""
    if not clients:
        return previous  # every update was rejected: the global adapter stays as it was
    target_rank = None if run.strategy.rank_grows_with_clients else run.max_rank
    return aggregate_adapters(clients, strategy=run.strategy, target_rank=target_rank, previous=previous)


def _update_ranks(
    run: FederationRun, rnd: int, state: RunState, infos: list[ClientRecord], exchange: Path
) -> None:
    """``quality_upgrade``: collect the round's scores; after ``upgrade_after_round``, upgrade the best clients."""
    fed = run.fed_args
    if not run.scoring_round(rnd):
        return
    state.scores.update({str(i.client): i.quality_score for i in infos})
    for probe in sorted(exchange.glob("score-*.json")):
        entry = json.loads(probe.read_text(encoding="utf-8"))
        state.scores[str(entry["client"])] = entry["quality_score"]
    if rnd == fed.upgrade_after_round:
        scores = {int(k): v for k, v in state.scores.items()}
        state.ranks = quality_upgrade(
            state.ranks, scores, high_rank=fed.high_rank, fraction=fed.upgrade_fraction
        )


def _write_round(
    run: FederationRun, record: RoundRecord, state: RunState, exchange: Path, round_start: float
) -> None:
    """Push (if asked), append the JSONL line, save ``state.json``: the round is complete. Then
    keep or delete the clients' adapters and log to the trackers."""
    out = run.out
    if run.writer.hub_repo_id:
        record.hub_push = run.writer.push(record)
    record.seconds["wall"] = round(time.perf_counter() - round_start, 3)
    run.writer.append(record)
    state.completed_round = record.round
    state.save(out)
    if run.fed_args.keep_client_adapters:
        kept = out / "clients" / round_dir(out, record.round).name
        shutil.rmtree(kept, ignore_errors=True)
        kept.parent.mkdir(parents=True, exist_ok=True)
        os.replace(exchange, kept)
    shutil.rmtree(exchange, ignore_errors=True)
    run.accelerator.log(
        {f"eval/{k}": v for k, v in record.eval.items()}
        | {"train/mean_loss": record.mean_loss, "comm/cumulative_mb": state.cumulative_bytes / 1e6},
        step=record.round,
    )


def _server_round(
    run: FederationRun, rnd: int, previous: LoraAdapter, state: RunState, exchange: Path, seconds: dict
) -> RoundRecord:
    """Main process: screen, aggregate (and save ``round-NNNN/``), evaluate, update ranks, write."""
    round_start = seconds.pop("_start")
    start = time.perf_counter()
    sampled = sample_clients(run.fed_args.seed, rnd, run.fed_args.num_clients, run.fed_args.clients_per_round)
    clients, dropped = _screen(run, exchange, sampled, previous)
    merged = _aggregate(run, clients, previous)
    merged.provenance.update(
        round=rnd, sampled_clients=sampled, dropped_clients=[d.to_dict() for d in dropped]
    )
    run.writer.save_adapter(rnd, merged)
    seconds["aggregate"] = round(time.perf_counter() - start, 3)

    start = time.perf_counter()
    evaluation = run.evaluate(merged, run.task.validation)
    seconds["eval"] = round(time.perf_counter() - start, 3)
    infos = [ClientRecord.from_dict(c.provenance["client"]) for c in clients]
    traffic = sum(i.bytes_up + i.bytes_down for i in infos)
    state.cumulative_bytes += traffic
    _update_ranks(run, rnd, state, infos, exchange)
    record = RoundRecord(
        round=rnd,
        clients=infos,
        dropped=dropped,
        eval=evaluation,
        eval_metric=run.metric_name,
        global_rank=merged.max_rank,
        bytes_round=traffic,
        cumulative_bytes=state.cumulative_bytes,
        seconds=seconds,
        strategy=run.strategy.name,
        adapter=round_dir(run.out, rnd).name,
    )
    _write_round(run, record, state, exchange, round_start)
    return record


def _finish(run: FederationRun, records: list[RoundRecord], completed_round: int) -> None:
    """Main process, after the last round: the summary table, the plot and the output folder's model card."""
    out = run.out
    shutil.rmtree(out / EXCHANGE_DIR, ignore_errors=True)
    summary = summary_table(records)
    run.accelerator.print(summary)
    plot = plot_history(records, out / PLOT_NAME, metric=run.metric_name)
    card_info = {**run.writer.card_info, "summary": summary, **({"plot": PLOT_NAME} if plot else {})}
    final = LoraAdapter.from_pretrained(round_dir(out, completed_round))
    card = build_model_card(None, round_index=completed_round, config=final.config, card_info=card_info)
    (out / MODEL_CARD_NAME).write_text(card, encoding="utf-8")


def run_federation(
    model_args: ModelArguments,
    data_args: DataArguments | InstructDataArguments,
    client_args: ClientArguments,
    fed_args: FederationArguments,
) -> FederationResult:
    """Run (or resume) a simulated federation and write its outputs to ``fed_args.output_dir``.

    Outputs: ``round-0000/`` (initial adapter), ``round-NNNN/`` (global adapter after each round,
    PEFT format), ``metrics.jsonl`` (one :class:`~hf_fedlora.federation.RoundRecord` line per
    round, and one for round 0 when the task kind evaluates the base model), ``state.json`` (for
    ``--resume``), ``metrics.png``, ``README.md`` (model card) and tracker logs under
    ``fed_glue/`` (``fed_instruct/`` for instruction data).

    The task kind follows ``data_args``: :class:`~hf_fedlora.federation.DataArguments` runs
    sequence classification, :class:`~hf_fedlora.federation.instruct_config.InstructDataArguments`
    instruction tuning of a causal LM.

    Returns:
        A :class:`FederationResult` with the records of all complete rounds.

    Raises:
        FileExistsError: ``output_dir`` holds a run and neither ``resume`` nor ``overwrite_output_dir`` is set.
        ValueError: invalid options, or resuming with options that differ from the saved run.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = Accelerator(log_with=fed_args.report_to or None, project_dir=fed_args.output_dir)
    is_main = accelerator.is_main_process
    saved = prepare_output_dir(Path(fed_args.output_dir), fed_args, accelerator)
    run = setup_run(model_args, data_args, client_args, fed_args, accelerator)
    out = run.out
    state = initial_state(run, saved)
    if is_main:
        if saved is not None:
            logger.info(f"resuming '{out}' after round {state.completed_round}", main_process_only=True)
        shutil.rmtree(out / EXCHANGE_DIR, ignore_errors=True)
        stale = remove_stale_temporaries(out)
        if stale:
            logger.info(f"removed temporaries of an interrupted run: {stale}", main_process_only=True)
        run.writer.resume(state.completed_round)
        accelerator.init_trackers(run.project, config=tracker_config(*run.groups))
        if saved is None and run.writer.records:  # the base model's round 0
            accelerator.log({f"eval/{k}": v for k, v in run.writer.records[0].eval.items()}, step=0)
    accelerator.wait_for_everyone()

    rounds_bar = tqdm(
        range(state.completed_round + 1, fed_args.rounds + 1),
        desc="rounds",
        disable=not is_main,
        initial=state.completed_round,
        total=fed_args.rounds,
    )
    for rnd in rounds_bar:
        seconds = {"_start": time.perf_counter()}
        previous = LoraAdapter.from_pretrained(round_dir(out, rnd - 1))
        exchange = out / EXCHANGE_DIR / f"round-{rnd:04d}"
        _train_my_clients(run, rnd, previous, state, exchange)
        accelerator.wait_for_everyone()
        seconds["train"] = round(time.perf_counter() - seconds["_start"], 3)
        if is_main:
            record = _server_round(run, rnd, previous, state, exchange, seconds)
            rounds_bar.set_postfix({run.metric_name: f"{record.eval[run.metric_name]:.4f}"})
        accelerator.wait_for_everyone()
        state = RunState.load(out) or state

    records = read_records(out, state.completed_round)
    if is_main:
        _finish(run, records, state.completed_round)
    accelerator.end_training()
    accelerator.wait_for_everyone()
    return FederationResult(out, records, round_dir(out, state.completed_round))


__all__ = ["FederationResult", "client_seed", "run_federation", "sample_clients", "set_torch_threads"]
