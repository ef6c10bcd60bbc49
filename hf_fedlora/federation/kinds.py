"""What a task kind brings to a federation run: its data, the clients' shards, the local trainer and
the evaluator (:class:`TaskSetup`). The round loop is the same for every kind; only these differ.

- Sequence classification (``recipes/fed_glue.py``): :func:`classification_setup` here, scored with
  a GLUE metric; round 0 (the untrained initial adapter) is not evaluated.
- Instruction tuning of a causal LM (``recipes/fed_instruct.py``):
  :func:`~hf_fedlora.federation.instruct_run.instruct_setup`, scored by the validation loss; round
  0 (the base model) is evaluated and recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..adapters import LoraAdapter
from ..metrics import load_glue_metric
from .client import PRIMARY_METRIC, LocalTrainer
from .config import ClientArguments, DataArguments, FederationArguments, ModelArguments
from .data import TASKS, load_task
from .partition import make_partitioner

GLUE_TASKS = tuple(t for t, spec in TASKS.items() if spec.hub_id == "nyu-mll/glue")


class Evaluator(Protocol):
    """Scores a global adapter on a split; ``evaluate`` returns the metrics with ``score`` (higher is better).

    Attributes:
        metric_name: the metric shown in the progress bar, the plot and the records' ``eval_metric``
            (a key of what ``evaluate`` returns).
        evaluates_base: ``evaluate(None, split)`` scores the base model, and the run records it as round 0.
    """

    metric_name: str
    evaluates_base: bool

    def evaluate(self, adapter: LoraAdapter | None, split: Any) -> dict[str, float]: ...


@dataclass
class TaskSetup:
    """A task kind's part of one run.

    Attributes:
        task: the loaded data (``train`` and ``validation`` splits with ``len`` and ``select``).
        shards: each client's training rows, by client id.
        trainer: the process's :class:`~hf_fedlora.federation.client.LocalTrainer` (base model loaded once).
        evaluator: how the server scores a global adapter (:class:`Evaluator`).
        card_info: the model card's facts about the task: ``base_model``, ``task``, ``eval_metric``,
            ``num_labels``, ``dataset``.
        script: the recipe that runs this kind (for the reproduce command).
        project: the experiment trackers' project name.
    """

    task: Any
    shards: list[Any]
    trainer: LocalTrainer
    evaluator: Evaluator
    card_info: dict[str, Any]
    script: str
    project: str


@dataclass
class ClassificationEvaluator:
    """A GLUE metric of the trainer's predictions, with ``score`` the task's primary metric."""

    trainer: LocalTrainer
    metric: Any
    metric_name: str
    batch_size: int
    max_length: int
    evaluates_base: bool = False  # the classifier head is part of the adapter: no base model to score

    def evaluate(self, adapter: LoraAdapter | None, split: Any) -> dict[str, float]:
        if adapter is None:
            raise ValueError("a classification run evaluates an adapter (its head is part of it), not None.")
        return self.trainer.evaluate(adapter, split, self.metric, self.batch_size, self.max_length)


def classification_setup(
    model_args: ModelArguments,
    data_args: DataArguments,
    client_args: ClientArguments,
    fed_args: FederationArguments,
    accelerator: Any,
) -> TaskSetup:
    """Load the classification task, split it among the clients and load the base model once."""
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
    metric_name = PRIMARY_METRIC.get(task.metric, "accuracy")
    evaluator = ClassificationEvaluator(
        trainer,
        load_glue_metric(task.metric, keep_in_memory=True),
        metric_name,
        client_args.per_device_eval_batch_size,
        data_args.max_seq_length,
    )
    card_info = {
        "base_model": model_args.model_name_or_path or "sentence-transformers/all-MiniLM-L6-v2",
        "task": task.name,
        "eval_metric": metric_name,
        "num_labels": task.num_labels,
        "dataset": data_args.data_dir or ("nyu-mll/glue" if task.name in GLUE_TASKS else task.name),
    }
    shards = [task.train.select(p) for p in parts]
    return TaskSetup(task, shards, trainer, evaluator, card_info, "recipes/fed_glue.py", "fed_glue")


__all__ = ["ClassificationEvaluator", "Evaluator", "TaskSetup", "classification_setup"]
