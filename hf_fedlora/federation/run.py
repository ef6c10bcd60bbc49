"""One federation run's shared pieces: the options, the task's data shards, the local trainer,
the evaluator and the round writer (:class:`FederationRun`), built once by :func:`setup_run`, and
the run state it starts from (:func:`initial_state`).

The task kind (classification or instruction tuning, :mod:`.kinds`) is chosen here, once, from the
data options' class; everything after works the same for both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import LoraAdapter
from ..strategies import Strategy, get_strategy
from .client import LocalTrainer
from .config import (
    ClientArguments,
    DataArguments,
    FederationArguments,
    ModelArguments,
    option_defaults,
    reproduce_command,
    resume_fingerprint,
    run_arguments,
)
from .instruct_config import InstructDataArguments
from .kinds import Evaluator, TaskSetup, classification_setup
from .ranks import allocate_ranks, parse_rank_spec
from .rounds import RoundRecord, RoundWriter, round_dir
from .state import RunState


@dataclass
class FederationRun:
    """What every round of one run shares: options, data shards, the trainer, the evaluator, the writer."""

    model_args: ModelArguments
    data_args: DataArguments | InstructDataArguments
    client_args: ClientArguments
    fed_args: FederationArguments
    accelerator: Any
    out: Path
    task: Any
    shards: list[Any]
    trainer: LocalTrainer
    strategy: Strategy
    evaluator: Evaluator
    max_rank: int
    writer: RoundWriter
    script: str = "recipes/fed_glue.py"
    project: str = "fed_glue"

    @property
    def groups(self) -> tuple[Any, ...]:
        return (self.model_args, self.data_args, self.client_args, self.fed_args)

    @property
    def send_back(self) -> str:
        return self.fed_args.send_back or self.strategy.send_back

    @property
    def metric_name(self) -> str:
        return self.evaluator.metric_name

    def scoring_round(self, rnd: int) -> bool:
        return self.fed_args.quality_upgrade and rnd <= self.fed_args.upgrade_after_round

    def evaluate(self, adapter: LoraAdapter | None, split: Any) -> dict[str, float]:
        """The evaluator's metrics of ``adapter`` on ``split`` (``None``: the base model, where the kind has one)."""
        return self.evaluator.evaluate(adapter, split)


def _card_info(groups: tuple[Any, ...], setup: TaskSetup, strategy: Strategy) -> dict[str, Any]:
    """The model card's facts about the run (``hf_fedlora.hub.build_model_card``'s ``card_info``)."""
    fed, facts = groups[3], setup.card_info
    return {
        "base_model": facts["base_model"],
        "task": facts["task"],
        "strategy": strategy.name,
        "num_clients": fed.num_clients,
        "clients_per_round": fed.clients_per_round,
        "rounds": fed.rounds,
        "partition": fed.partition,
        "rank_distribution": f"quality upgrade {fed.low_rank}->{fed.high_rank}"
        if fed.quality_upgrade
        else fed.ranks,
        "seed": fed.seed,
        "eval_metric": facts["eval_metric"],
        "num_labels": facts["num_labels"],
        "dataset": facts["dataset"],
        "command": reproduce_command(*groups, script=setup.script),
    }


def setup_run(
    model_args: ModelArguments,
    data_args: DataArguments | InstructDataArguments,
    client_args: ClientArguments,
    fed_args: FederationArguments,
    accelerator: Any,
) -> FederationRun:
    """Load the task, split it among the clients, load the base model once, and make the writer.

    Instruction data (:class:`~hf_fedlora.federation.instruct_config.InstructDataArguments`) makes a
    causal-LM run (:func:`~hf_fedlora.federation.instruct_run.instruct_setup`); any other data
    options a classification run (:func:`~hf_fedlora.federation.kinds.classification_setup`).
    """
    if isinstance(data_args, InstructDataArguments):
        from .instruct_run import instruct_setup as kind_setup
    else:
        kind_setup = classification_setup
    setup = kind_setup(model_args, data_args, client_args, fed_args, accelerator)
    strategy = get_strategy(fed_args.strategy)
    groups = (model_args, data_args, client_args, fed_args)
    writer = RoundWriter(
        fed_args.output_dir,
        hub_repo_id=fed_args.hub_model_id if fed_args.push_to_hub else None,
        token=fed_args.hub_token,
        private=fed_args.hub_private,
        card_info=_card_info(groups, setup, strategy),
    )
    return FederationRun(
        model_args,
        data_args,
        client_args,
        fed_args,
        accelerator,
        Path(fed_args.output_dir),
        setup.task,
        shards=setup.shards,
        trainer=setup.trainer,
        strategy=strategy,
        evaluator=setup.evaluator,
        max_rank=fed_args.high_rank if fed_args.quality_upgrade else parse_rank_spec(fed_args.ranks).max_rank,
        writer=writer,
        script=setup.script,
        project=setup.project,
    )


def _base_record(run: FederationRun) -> RoundRecord:
    """Round 0: the base model (before any training) evaluated on the validation split."""
    start = time.perf_counter()
    evaluation = run.evaluate(None, run.task.validation)
    seconds = round(time.perf_counter() - start, 3)
    return RoundRecord(
        round=0,
        eval=evaluation,
        eval_metric=run.metric_name,
        global_rank=run.max_rank,
        bytes_round=0,
        cumulative_bytes=0,
        seconds={"eval": seconds, "wall": seconds},
        strategy=run.strategy.name,
        adapter=round_dir(run.out, 0).name,
    )


def initial_state(run: FederationRun, saved: RunState | None) -> RunState:
    """The saved state (checked against the options), or a new one with ``round-0000/`` written and,
    when the evaluator scores the base model, its round-0 line in ``metrics.jsonl``."""
    fed = run.fed_args
    fingerprint = resume_fingerprint(*run.groups)
    if saved is not None:
        saved.check_resumable(fingerprint, run.out, defaults=option_defaults(*run.groups))
        saved.arguments = run_arguments(*run.groups)  # a raised `rounds` is kept for the next resume
        return saved
    ranks = (
        [fed.low_rank] * fed.num_clients
        if fed.quality_upgrade
        else allocate_ranks(fed.ranks, fed.num_clients, seed=fed.seed)
    )
    state = RunState(ranks=ranks, fingerprint=fingerprint, arguments=run_arguments(*run.groups))
    if run.accelerator.is_main_process:
        initial = run.trainer.initial_adapter(run.max_rank, seed=fed.seed)
        initial.provenance = {"round": 0, "what": "initial adapter"}
        if not run.evaluator.evaluates_base:  # the plot's round 0: the untrained global adapter
            initial.provenance["eval"] = run.evaluate(initial, run.task.validation)
        run.writer.save_adapter(0, initial)
        # a new run keeps no line, not even the round 0 of a run killed before it saved its state
        run.writer.resume(-1)
        if run.evaluator.evaluates_base:
            run.writer.append(_base_record(run))
        state.save(run.out)
    return state


__all__ = ["FederationRun", "initial_state", "setup_run"]
