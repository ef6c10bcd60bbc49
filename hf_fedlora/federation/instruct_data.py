"""Instruction data for causal-LM federations: Alpaca-form JSONL, prompts, response-only labels.

Rows are ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` may be empty or absent).
A prompt is built with the tokenizer's chat template when it has one (user message: instruction,
then the input after a blank line; assistant message: the output), else with the plain Alpaca
template. Labels are ``-100`` on the prompt tokens, so the loss covers the response tokens only
(the output and the end-of-turn tokens after it).

An :class:`InstructSplit` behaves like :class:`~hf_fedlora.federation.data.TextSplit` (``len``,
``select``, ``labels``); its ``labels`` are task-type ids (the instruction's leading word), which
is what the partitioners split on: :class:`TaskTypePartitioner` gives each client mostly one task type.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .partition import Partitioner, label_groups, make_partitioner

IGNORE_INDEX = -100
"""The label of tokens the loss skips (PyTorch's ``cross_entropy`` default)."""

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_WORD = re.compile(r"[^\W\d_]+")


def task_type(instruction: str) -> str:
    """The instruction's leading word, lower-cased (a leading "please" is skipped); ``"other"`` if it has none.

    For most Alpaca instructions this is the verb ("write", "generate", "classify"...); questions
    give their first word ("what", "how").
    """
    words = _WORD.findall(instruction[:200])
    if words and words[0].lower() == "please":
        words = words[1:]
    return words[0].lower() if words else "other"


@dataclass
class InstructSplit:
    """Instruction rows, one list per field (like :class:`TextSplit`: ``len``, ``select``, ``labels``)."""

    instructions: list[str]
    inputs: list[str]
    outputs: list[str]

    def __len__(self) -> int:
        return len(self.instructions)

    def select(self, indices: Sequence[int]) -> InstructSplit:
        """The rows at ``indices``, in that order."""
        idx = [int(i) for i in indices]
        return InstructSplit(
            [self.instructions[i] for i in idx], [self.inputs[i] for i in idx], [self.outputs[i] for i in idx]
        )

    @property
    def task_types(self) -> list[str]:
        """Each row's :func:`task_type`."""
        return [task_type(text) for text in self.instructions]

    @property
    def labels(self) -> np.ndarray:
        """Task-type ids (0 is this split's most frequent type; ties by name): what partitioners split on."""
        types = self.task_types
        counts = Counter(types)
        ids = {name: i for i, name in enumerate(sorted(counts, key=lambda n: (-counts[n], n)))}
        return np.asarray([ids[t] for t in types], dtype=np.int64)


@dataclass
class InstructData:
    """A loaded instruction task: training and validation splits (mirrors ``TaskData``)."""

    name: str
    train: InstructSplit
    validation: InstructSplit
    metric: str = "perplexity"


def load_instruct_file(path: str | Path) -> InstructSplit:
    """Read Alpaca-form JSONL: one object per line with ``instruction``, ``output`` and optional ``input``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line is not a JSON object, lacks a field, or holds a non-string or empty
            ``instruction``/``output`` (the message names the file, the line and the field); the file has no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"instruction file '{path}' does not exist; check `train_file` / `validation_file`."
        )
    fields: dict[str, list[str]] = {"instruction": [], "input": [], "output": []}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"'{path}', line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{where}: not valid JSON ({exc.msg}); expected one JSON object per line."
                ) from exc
            if not isinstance(row, dict):
                raise ValueError(
                    f"{where}: expected a JSON object with `instruction`, `input`, `output`, got {type(row).__name__}."
                )
            for name in fields:
                value = row.get(name, "" if name == "input" else None)
                if value is None:
                    raise ValueError(f"{where}: field `{name}` is missing; the row has {sorted(row)}.")
                if not isinstance(value, str):
                    raise ValueError(f"{where}: field `{name}` must be a string, got {type(value).__name__}.")
                if name != "input" and not value.strip():
                    raise ValueError(f"{where}: field `{name}` is empty.")
                fields[name].append(value)
    if not fields["instruction"]:
        raise ValueError(f"'{path}' holds no rows.")
    return InstructSplit(fields["instruction"], fields["input"], fields["output"])


def load_instruct_task(
    train_file: str | Path,
    validation_file: str | Path,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
) -> InstructData:
    """Both files, with ``load_task``'s subsetting: a seeded random subset of the training rows
    (kept in file order) and the first ``max_eval_samples`` validation rows."""
    train, validation = load_instruct_file(train_file), load_instruct_file(validation_file)
    if max_train_samples and max_train_samples < len(train):
        train = train.select(np.sort(np.random.default_rng(seed).permutation(len(train))[:max_train_samples]))
    if max_eval_samples and max_eval_samples < len(validation):
        validation = validation.select(range(max_eval_samples))
    return InstructData(name=Path(train_file).stem, train=train, validation=validation)


def user_message(instruction: str, input: str = "") -> str:
    """The user turn: the instruction, then the input (if any) after a blank line."""
    return f"{instruction.strip()}\n\n{input.strip()}" if input.strip() else instruction.strip()


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer: Any, instruction: str, input: str = "") -> str:
    """The text the model sees before its answer (chat template with the generation prompt, or Alpaca's)."""
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": user_message(instruction, input)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    template = ALPACA_PROMPT if input.strip() else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=instruction.strip(), input=input.strip())


def build_texts(tokenizer: Any, instruction: str, input: str, output: str) -> tuple[str, str]:
    """``(prompt, response)``: the response is the rest of the rendered conversation (the output and
    the template's end-of-turn text), or the output plus the EOS token without a chat template."""
    prompt = build_prompt(tokenizer, instruction, input)
    if has_chat_template(tokenizer):
        messages = [
            {"role": "user", "content": user_message(instruction, input)},
            {"role": "assistant", "content": output},
        ]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
    return prompt, output + (tokenizer.eos_token or "")


def tokenize_example(
    tokenizer: Any, instruction: str, input: str, output: str, max_seq_length: int
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (``-100`` on the prompt) of one row, at most ``max_seq_length`` tokens.

    Prompt and response are tokenised separately, so the label mask is exact. If both do not fit,
    the response keeps at least a quarter of the length (all of it if shorter), the prompt is cut
    from the left (its end, the assistant header, stays), then the response is cut at the end.
    """
    if max_seq_length < 2:
        raise ValueError(f"`max_seq_length` must be at least 2, got {max_seq_length}.")
    prompt, response = build_texts(tokenizer, instruction, input, output)
    prompt_ids = tokenizer(prompt, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) + len(response_ids) > max_seq_length:
        keep = min(len(response_ids), max(max_seq_length - len(prompt_ids), max_seq_length // 4, 1))
        prompt_ids = prompt_ids[len(prompt_ids) - (max_seq_length - keep) :] if max_seq_length > keep else []
        response_ids = response_ids[:keep]
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


class InstructCollator:
    """Right-pads tokenised rows into ``input_ids``, ``attention_mask`` and ``labels`` tensors.

    Args:
        pad_token_id (`int`): the padding id (the tokenizer's pad token, else its EOS).
        pad_to_multiple_of (`int`, *optional*): round the padded length up to a multiple of this.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(feature["labels"], dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_rows(
    tokenizer: Any, split: InstructSplit, indices: Sequence[int], max_seq_length: int
) -> dict[str, Any]:
    """A padded batch of the rows at ``indices`` (tokenised and collated)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    features = [
        tokenize_example(tokenizer, split.instructions[i], split.inputs[i], split.outputs[i], max_seq_length)
        for i in indices
    ]
    return InstructCollator(pad)(features)


class TaskTypePartitioner(Partitioner):
    """Non-IID by task type: most clients hold one task type only, the others a few rare types.

    Task types with at least ``min_type_share`` of a client's fair share (``n / num_partitions``
    rows) are "common"; the rest form one pool of rare types. Clients are shared out among the
    common types and the pool in proportion to their rows (Sainte-Lague; a common type left without
    a client joins the pool). A common type's rows are split evenly among its clients; the pool is
    sorted by type and cut into runs, so each of its clients holds a few types. Which client gets
    which shard is seeded. Shard sizes follow the types' sizes (they are not equal).

    ``labels`` are any per-row group ids (:attr:`InstructSplit.labels`).

    Args:
        min_type_share (`float`, *optional*, defaults to 0.5): smallest common type, as a fraction
            of ``n / num_partitions``.
    """

    def __init__(self, num_partitions: int, seed: int = 0, min_type_share: float = 0.5):
        super().__init__(num_partitions, seed)
        if not min_type_share > 0:
            raise ValueError(f"`min_type_share` must be positive, got {min_type_share!r}.")
        self.min_type_share = float(min_type_share)

    def _split(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        groups = label_groups(labels)
        sizes = np.bincount(groups)
        types = sorted(np.flatnonzero(sizes), key=lambda g: (-sizes[g], g))
        fair = len(groups) / self.num_partitions
        common = [g for g in types if sizes[g] >= self.min_type_share * fair][: self.num_partitions]
        while True:
            rare = [g for g in types if g not in common]
            buckets = [np.flatnonzero(groups == g) for g in common]
            pool = (
                np.concatenate([rng.permutation(np.flatnonzero(groups == g)) for g in rare]) if rare else None
            )
            bucket_sizes = [len(b) for b in buckets] + ([len(pool)] if pool is not None else [])
            seats = _sainte_lague(bucket_sizes, self.num_partitions)
            if all(seats[: len(common)]):
                break
            common = [g for g, s in zip(common, seats) if s]
        parts: list[np.ndarray] = []
        for bucket, count in zip(buckets, seats):
            parts += np.array_split(rng.permutation(bucket), count)
        if pool is not None and seats[-1]:
            parts += np.array_split(pool, seats[-1])  # runs of the type-sorted pool
        elif pool is not None:  # too few rare rows for a client of their own: dealt to everyone
            parts = [np.concatenate([p, pool[i :: len(parts)]]) for i, p in enumerate(parts)]
        return [parts[i] for i in rng.permutation(len(parts))]


def _sainte_lague(sizes: Sequence[int], seats: int) -> list[int]:
    """Seats per bucket in proportion to ``sizes`` (highest ``size / (2 * seats + 1)`` first; never
    more seats than rows)."""
    counts = [0] * len(sizes)
    for _ in range(seats):
        eligible = [i for i in range(len(sizes)) if counts[i] < sizes[i]]
        best = max(eligible, key=lambda i: (sizes[i] / (2 * counts[i] + 1), -i))
        counts[best] += 1
    return counts


INSTRUCT_PARTITIONS = ("iid", "dirichlet", "task_type")


def make_instruct_partitioner(
    name: str,
    num_partitions: int,
    *,
    seed: int = 0,
    dirichlet_alpha: float = 0.5,
    min_type_share: float = 0.5,
) -> Partitioner:
    """``task_type`` (:class:`TaskTypePartitioner`), or ``iid`` / ``dirichlet`` (on task types) from
    :func:`make_partitioner`.

    Raises:
        ValueError: unknown name (listing the valid ones).
    """
    if name == "task_type":
        return TaskTypePartitioner(num_partitions, seed=seed, min_type_share=min_type_share)
    if name in ("iid", "dirichlet"):
        return make_partitioner(name, num_partitions, seed=seed, dirichlet_alpha=dirichlet_alpha)
    raise ValueError(
        f"`partition` must be one of {list(INSTRUCT_PARTITIONS)} for instruction data, got {name!r}."
    )


__all__ = [
    "ALPACA_PROMPT",
    "IGNORE_INDEX",
    "INSTRUCT_PARTITIONS",
    "InstructCollator",
    "InstructData",
    "InstructSplit",
    "TaskTypePartitioner",
    "build_prompt",
    "build_texts",
    "encode_rows",
    "load_instruct_file",
    "load_instruct_task",
    "make_instruct_partitioner",
    "task_type",
    "tokenize_example",
    "user_message",
]
