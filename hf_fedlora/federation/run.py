"""One federation run's shared pieces: the options, the task's data shards, the local trainer,
the metric and the round writer (:class:`FederationRun`), built once by :func:`setup_run`, and the
run state it starts from (:func:`initial_state`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import LoraAdapter
from ..metrics import load_glue_metric
from ..strategies import Strategy, get_strategy
from .client import PRIMARY_METRIC, LocalTrainer
from .config import (
    ClientArguments,
    DataArguments,
    FederationArguments,
    ModelArguments,
    option_defaults,
    reproduce_command,
    resume_fingerprint,
)
from .data import TASKS, TaskData, TextSplit, load_task
from .partition import make_partitioner
from .ranks import allocate_ranks, parse_rank_spec
from .rounds import RoundWriter
from .state import RunState

GLUE_TASKS = tuple(t for t, spec in TASKS.items() if spec.hub_id == "nyu-mll/glue")


@dataclass
class FederationRun:
    """What every round of one run shares: options, data shards, the trainer, the metric, the writer."""

    model_args: ModelArguments
    data_args: DataArguments
    client_args: ClientArguments
    fed_args: FederationArguments
    accelerator: Any
    out: Path
    task: TaskData
    shards: list[TextSplit]
    trainer: LocalTrainer
    strategy: Strategy
    metric: Any
    max_rank: int
    writer: RoundWriter

    @property
    def groups(self) -> tuple[Any, ...]:
        return (self.model_args, self.data_args, self.client_args, self.fed_args)

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
            adapter,
            split,
            self.metric,
            self.client_args.per_device_eval_batch_size,
            self.data_args.max_seq_length,
        )


def _card_info(
    model_args: ModelArguments,
    data_args: DataArguments,
    client_args: ClientArguments,
    fed_args: FederationArguments,
    task: TaskData,
    strategy: Strategy,
) -> dict[str, Any]:
    """The model card's facts about the run (``hf_fedlora.hub.build_model_card``'s ``card_info``)."""
    fed = fed_args
    return {
        "base_model": model_args.model_name_or_path or "sentence-transformers/all-MiniLM-L6-v2",
        "task": task.name,
        "strategy": strategy.name,
        "num_clients": fed.num_clients,
        "clients_per_round": fed.clients_per_round,
        "rounds": fed.rounds,
        "partition": fed.partition,
        "rank_distribution": f"quality upgrade {fed.low_rank}->{fed.high_rank}"
        if fed.quality_upgrade
        else fed.ranks,
        "seed": fed.seed,
        "eval_metric": PRIMARY_METRIC.get(task.metric, "accuracy"),
        "num_labels": task.num_labels,
        "dataset": data_args.data_dir or ("nyu-mll/glue" if task.name in GLUE_TASKS else task.name),
        "command": reproduce_command(model_args, data_args, client_args, fed_args),
    }


def setup_run(
    model_args: ModelArguments,
    data_args: DataArguments,
    client_args: ClientArguments,
    fed_args: FederationArguments,
    accelerator: Any,
) -> FederationRun:
    """Load the task, split it among the clients, load the base model once, and make the writer."""
    with accelerator.main_process_first():
        task = load_task(data_args, seed=fed_args.seed)
    parts = make_partitioner(
        fed_args.partition,
        fed_args.num_clients,
        seed=fed_args.seed,
        dirichlet_alpha=fed_args.dirichlet_alpha,
        high_quality_fraction=fed_args.high_quality_fraction,
    )(task.train.labels)
    trainer = LocalTrainer(
        model_args.model_name_or_path,
        task.num_labels,
        target_modules=client_args.target_modules,
        lora_alpha=client_args.lora_alpha,
        lora_dropout=client_args.lora_dropout,
        use_rslora=client_args.use_rslora,
        is_regression=task.is_regression,
        config_overrides=model_args.config_overrides(),
        trust_remote_code=model_args.trust_remote_code,
        label_names=task.label_names,
        device=accelerator.device,
    )
    strategy = get_strategy(fed_args.strategy)
    writer = RoundWriter(
        fed_args.output_dir,
        hub_repo_id=fed_args.hub_model_id if fed_args.push_to_hub else None,
        token=fed_args.hub_token,
        private=fed_args.hub_private,
        card_info=_card_info(model_args, data_args, client_args, fed_args, task, strategy),
    )
    return FederationRun(
        model_args,
        data_args,
        client_args,
        fed_args,
        accelerator,
        Path(fed_args.output_dir),
        task,
        shards=[task.train.select(p) for p in parts],
        trainer=trainer,
        strategy=strategy,
        metric=load_glue_metric(task.metric, keep_in_memory=True),
        max_rank=fed_args.high_rank if fed_args.quality_upgrade else parse_rank_spec(fed_args.ranks).max_rank,
        writer=writer,
    )


def initial_state(run: FederationRun, saved: RunState | None) -> RunState:
    """The saved state (checked against the options), or a new one with ``round-0000/`` written."""
    fed = run.fed_args
    fingerprint = resume_fingerprint(*run.groups)
    if saved is not None:
        saved.check_resumable(fingerprint, run.out, defaults=option_defaults(*run.groups))
        return saved
    ranks = (
        [fed.low_rank] * fed.num_clients
        if fed.quality_upgrade
        else allocate_ranks(fed.ranks, fed.num_clients, seed=fed.seed)
    )
    state = RunState(ranks=ranks, fingerprint=fingerprint)
    if run.accelerator.is_main_process:
        initial = run.trainer.initial_adapter(run.max_rank, seed=fed.seed)
        initial.provenance = {"round": 0, "what": "initial adapter"}
        run.writer.save_adapter(0, initial)
        run.writer.resume(0)
        state.save(run.out)
    return state


__all__ = ["FederationRun", "initial_state", "setup_run"]
