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
from ..constants import MODEL_CARD_NAME
from ..hub import build_model_card
from .config import ClientArguments, DataArguments, FederationArguments, ModelArguments, tracker_config
from .guard import OutputDirLock, check_output_dir, mark_operator_error
from .instruct_config import InstructDataArguments
from .plots import plot_history, summary_table
from .rounds import ClientRecord, RoundRecord, atomic_write_text, read_records, round_dir
from .run import FederationRun, initial_state, setup_run
from .server import RoundCollector, client_folder, server_round
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


def set_torch_threads(count: int = 0) -> int:
    """Give torch ``count`` threads (the recipes' ``--threads``); 0: ``OMP_NUM_THREADS`` when set
    (shared machines; ``accelerate launch`` sets it to 1 unless given ``--num_cpu_threads_per_process``),
    else this machine's cores divided among the ``accelerate launch`` processes; returns the count.
    The recipes call it after parsing (a config's ``env:`` block may set ``OMP_NUM_THREADS``)."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if count > 0:
        pass
    elif threads.isdigit() and int(threads) > 0:
        count = int(threads)
    else:
        # the launcher's WORLD_SIZE, not accelerate's PartialState: made here, before the run's
        # Accelerator, it would fix the process group's settings (a CPU group needs cpu=True)
        count = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("WORLD_SIZE") or 1)))
    torch.set_num_threads(count)
    return count


def _cpu_group() -> bool:
    """Whether this is one of several launched processes on a machine without CUDA. Accelerate forms
    their (gloo) group only when told ``cpu=True``; otherwise each would run alone as the main
    process. (``accelerate launch`` starts several processes on one machine through torchrun, which
    does not pass on a config's ``use_cpu``.)"""
    import torch

    return int(os.environ.get("WORLD_SIZE") or 1) > 1 and not torch.cuda.is_available()


def client_seed(seed: int, round_index: int, client_id: int) -> int:
    """The seed of one client's local training in one round (independent of the process)."""
    return int(np.random.SeedSequence([seed, round_index, client_id]).generate_state(1)[0])


def sample_clients(seed: int, round_index: int, num_clients: int, clients_per_round: int) -> list[int]:
    """The sorted client ids sampled (without replacement) in ``round_index``."""
    rng = np.random.default_rng([seed, round_index, 7919])
    return sorted(int(c) for c in rng.choice(num_clients, size=clients_per_round, replace=False))


def _train_my_clients(
    run: FederationRun, rnd: int, previous: LoraAdapter, state: RunState, collector: RoundCollector
) -> None:
    """Train this process's share of the round's clients. The main process hands each to the
    collector as it finishes (and writes it to ``_exchange/`` only with ``save_client_adapters``);
    the other processes write theirs to ``_exchange/`` for the main process to read after the barrier."""
    from tqdm.auto import tqdm

    fed, acc, exchange = run.fed_args, run.accelerator, collector.exchange
    sampled = collector.sampled
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
            if fed.save_client_adapters or not acc.is_main_process:
                adapter.save_pretrained(client_folder(exchange, cid))
            if acc.is_main_process:  # in memory, except a saved one kept for whole-round screening
                saved = fed.save_client_adapters and not collector.streaming
                collector.add(cid, client_folder(exchange, cid) if saved else adapter)


def _finish(run: FederationRun, records: list[RoundRecord], completed_round: int) -> None:
    """Main process, after the last round: the summary table, the plot and the output folder's model card."""
    out = run.out
    shutil.rmtree(out / EXCHANGE_DIR, ignore_errors=True)
    summary = summary_table(records)
    run.accelerator.print(summary)
    initial = LoraAdapter.from_pretrained(round_dir(out, 0)).provenance.get("eval")
    plot = plot_history(
        records, out / PLOT_NAME, metric=run.metric_name, strategy=run.strategy.name, baseline=initial
    )
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
        NotADirectoryError: ``output_dir`` is a file.
        ValueError: invalid options, or resuming with options that differ from the saved run
            (:class:`~hf_fedlora.federation.state.CorruptRunError`: its ``state.json`` or
            ``metrics.jsonl`` cannot be read back).
        RunLockedError: another live process is writing ``output_dir`` (its ``.lock``).
    """
    from accelerate import Accelerator

    out = Path(fed_args.output_dir)
    lock = None
    try:
        check_output_dir(out)
        accelerator = Accelerator(
            cpu=_cpu_group(), log_with=fed_args.report_to or None, project_dir=fed_args.output_dir
        )
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            lock = OutputDirLock(out).acquire()
        saved = prepare_output_dir(out, fed_args, accelerator)
        run = setup_run(model_args, data_args, client_args, fed_args, accelerator)
        state = initial_state(run, saved)
    except BaseException as exc:
        if lock is not None:
            lock.release()
        mark_operator_error(exc)  # a mistake in the options, the data files or the output folder
        raise
    try:
        return _run_rounds(run, state, resumed=saved is not None)
    except KeyboardInterrupt:  # SIGINT, or SIGTERM through the recipes' handler: leave no temporaries
        if accelerator.is_main_process:
            shutil.rmtree(out / EXCHANGE_DIR, ignore_errors=True)
            remove_stale_temporaries(out)
        raise
    finally:
        if lock is not None:
            lock.release()


def _run_rounds(run: FederationRun, state: RunState, resumed: bool) -> FederationResult:
    """The rounds after ``state.completed_round`` up to ``rounds``, then the summary, plot and card."""
    from tqdm.auto import tqdm

    accelerator, fed_args, out = run.accelerator, run.fed_args, run.out
    is_main = accelerator.is_main_process
    if is_main:
        if resumed:
            logger.info(f"resuming '{out}' after round {state.completed_round}", main_process_only=True)
        shutil.rmtree(out / EXCHANGE_DIR, ignore_errors=True)
        stale = remove_stale_temporaries(out)
        if stale:
            logger.info(f"removed temporaries of an interrupted run: {stale}", main_process_only=True)
        run.writer.resume(state.completed_round)
        accelerator.init_trackers(run.project, config=tracker_config(*run.groups))
        if not resumed and run.writer.records:  # the base model's round 0
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
        sampled = sample_clients(fed_args.seed, rnd, fed_args.num_clients, fed_args.clients_per_round)
        collector = RoundCollector(run, previous, sampled, out / EXCHANGE_DIR / f"round-{rnd:04d}")
        _train_my_clients(run, rnd, previous, state, collector)
        accelerator.wait_for_everyone()
        seconds["train"] = round(time.perf_counter() - seconds["_start"], 3)
        if is_main:
            record = server_round(run, rnd, collector, state, seconds)
            rounds_bar.set_postfix({run.metric_name: f"{record.eval[run.metric_name]:.4f}"})
        accelerator.wait_for_everyone()
        state = RunState.load(out) or state

    records = read_records(out, state.completed_round)
    if is_main:
        _finish(run, records, state.completed_round)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also ends the process group
    return FederationResult(out, records, round_dir(out, state.completed_round))


__all__ = ["FederationResult", "client_seed", "run_federation", "sample_clients", "set_torch_threads"]
