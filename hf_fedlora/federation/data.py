"""Load a text-classification task as plain text + label arrays, from the Hub or local files.

GLUE tasks come from ``nyu-mll/glue`` on the Hub, or from ``data_dir`` in the GLUE TSV layout
(``data_dir/SST-2/train.tsv``...). ``ag_news`` comes from ``fancyzhx/ag_news`` or a folder with
headerless ``train.tsv``/``test.tsv``. ``custom`` reads any TSV/CSV/JSON file pair with named text
and label columns. Tokenisation happens per batch at training time, so nothing here is model-specific.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TaskSpec:
    """Where a known task's data lives and how its columns are named.

    ``file_*`` describe the GLUE TSV layout, ``hub_*`` the Hub dataset. ``label_names`` maps string
    labels in files to ids in the Hub's order; ``None`` means labels are already integers (or
    scores, for ``is_regression``).
    """

    name: str
    folder: str
    file_text: tuple[str, ...]
    file_label: str
    hub_id: str
    hub_config: str | None
    hub_text: tuple[str, ...]
    eval_file: str = "dev.tsv"
    hub_eval_split: str = "validation"
    label_names: tuple[str, ...] | None = None
    num_labels: int = 2
    is_regression: bool = False
    file_columns: tuple[str, ...] | None = None  # for files without a header row
    metric: str | None = None  # metric config name (default: the task name)


_GLUE = "nyu-mll/glue"
_NLI = ("entailment", "not_entailment")
TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", "SST-2", ("sentence",), "label", _GLUE, "sst2", ("sentence",)),
    "cola": TaskSpec(
        "cola",
        "CoLA",
        ("sentence",),
        "label",
        _GLUE,
        "cola",
        ("sentence",),
        file_columns=("source", "label", "original_label", "sentence"),
    ),
    "mrpc": TaskSpec(
        "mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", _GLUE, "mrpc", ("sentence1", "sentence2")
    ),
    "rte": TaskSpec(
        "rte",
        "RTE",
        ("sentence1", "sentence2"),
        "label",
        _GLUE,
        "rte",
        ("sentence1", "sentence2"),
        label_names=_NLI,
    ),
    "wnli": TaskSpec(
        "wnli", "WNLI", ("sentence1", "sentence2"), "label", _GLUE, "wnli", ("sentence1", "sentence2")
    ),
    "qnli": TaskSpec(
        "qnli",
        "QNLI",
        ("question", "sentence"),
        "label",
        _GLUE,
        "qnli",
        ("question", "sentence"),
        label_names=_NLI,
    ),
    "qqp": TaskSpec(
        "qqp", "QQP", ("question1", "question2"), "is_duplicate", _GLUE, "qqp", ("question1", "question2")
    ),
    "stsb": TaskSpec(
        "stsb",
        "STS-B",
        ("sentence1", "sentence2"),
        "score",
        _GLUE,
        "stsb",
        ("sentence1", "sentence2"),
        num_labels=1,
        is_regression=True,
    ),
    "mnli": TaskSpec(
        "mnli",
        "MNLI",
        ("sentence1", "sentence2"),
        "gold_label",
        _GLUE,
        "mnli",
        ("premise", "hypothesis"),
        eval_file="dev_matched.tsv",
        hub_eval_split="validation_matched",
        label_names=("entailment", "neutral", "contradiction"),
        num_labels=3,
    ),
    "ag_news": TaskSpec(
        "ag_news",
        "",
        ("text",),
        "label",
        "fancyzhx/ag_news",
        None,
        ("text",),
        eval_file="test.tsv",
        hub_eval_split="test",
        label_names=("World", "Sports", "Business", "Sci/Tech"),
        num_labels=4,
        file_columns=("text", "label"),
        metric="multiclass",
    ),
}


@dataclass
class TextSplit:
    """Texts (and optional second texts) with their labels (int ids, or float scores)."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: Sequence[int]) -> TextSplit:
        """The examples at ``indices``, in that order."""
        idx = [int(i) for i in indices]
        pairs = [self.text_pairs[i] for i in idx] if self.text_pairs is not None else None
        return TextSplit([self.texts[i] for i in idx], pairs, self.labels[idx])


@dataclass
class TaskData:
    """A loaded task: training and evaluation splits plus what the model head and metric need."""

    name: str
    train: TextSplit
    validation: TextSplit
    num_labels: int
    is_regression: bool
    metric: str
    label_names: list[str] | None = None


def _read_table(path: Path, header: bool, columns: Sequence[str] | None) -> Any:
    """Read a TSV/CSV/JSON(L) file with ``datasets`` and return a pandas frame of strings."""
    from datasets import load_dataset

    if not path.is_file():
        raise FileNotFoundError(f"data file '{path}' does not exist; check `data_dir` / `train_file`.")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        frame = load_dataset("json", data_files=str(path), split="train").to_pandas()
        return frame.astype({c: str for c in frame.columns if frame[c].dtype == object})
    options: dict[str, Any] = {"delimiter": "\t" if suffix == ".tsv" else ","}
    if suffix == ".tsv":
        options["quoting"] = 3  # csv.QUOTE_NONE: sentences contain quote characters
    if not header:
        options.update(header=None, column_names=list(columns or ()))
    frame = load_dataset(
        "csv", data_files=str(path), split="train", encoding="utf-8-sig", keep_default_na=False, **options
    ).to_pandas()
    return frame


def _labels(values: Sequence[Any], spec: TaskSpec, where: str) -> np.ndarray:
    if spec.is_regression:
        return np.asarray([float(v) for v in values], dtype=np.float32)
    if spec.label_names is not None:
        ids = {name: i for i, name in enumerate(spec.label_names)}
        try:
            return np.asarray(
                [ids[str(v).strip()] if str(v).strip() in ids else int(v) for v in values], dtype=np.int64
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{where}: label {exc} is not one of {list(spec.label_names)}.") from exc
    labels = np.asarray([int(float(v)) for v in values], dtype=np.int64)
    if labels.min() < 0 or labels.max() >= spec.num_labels:
        raise ValueError(
            f"{where}: labels must be in [0, {spec.num_labels}), found {labels.min()}..{labels.max()}."
        )
    return labels


def _split_from_frame(frame: Any, spec: TaskSpec, text: Sequence[str], label: str, where: str) -> TextSplit:
    missing = [c for c in (*text, label) if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: columns {missing} not found; the file has {list(frame.columns)}.")
    texts = [str(t) for t in frame[text[0]]]
    pairs = [str(t) for t in frame[text[1]]] if len(text) > 1 else None
    return TextSplit(texts, pairs, _labels(list(frame[label]), spec, where))


def _custom_spec(data_args: Any) -> TaskSpec:
    from datasets import load_dataset  # noqa: F401  (fail early if missing)

    text = tuple(c.strip() for c in data_args.text_columns.split(",") if c.strip())
    if not 1 <= len(text) <= 2:
        raise ValueError(f"`text_columns` must name one or two columns, got {data_args.text_columns!r}.")
    columns = tuple(c.strip() for c in data_args.column_names.split(",")) if data_args.column_names else None
    return TaskSpec(
        "custom", "", text, data_args.label_column, "", None, text, file_columns=columns, metric="multiclass"
    )


def _infer_labels(spec: TaskSpec, train_values: Sequence[Any]) -> TaskSpec:
    """For ``custom`` files: integer labels as they are, other strings mapped in sorted order."""
    try:
        numbers = np.asarray([float(v) for v in train_values])
    except ValueError:
        names = tuple(sorted({str(v).strip() for v in train_values}))
        return replace(spec, label_names=names, num_labels=len(names))
    if np.all(numbers == np.round(numbers)):
        return replace(spec, num_labels=int(numbers.max()) + 1)
    return replace(spec, is_regression=True, num_labels=1, metric="stsb")


def _load_files(spec: TaskSpec, train_path: Path, eval_path: Path) -> tuple[TextSplit, TextSplit, TaskSpec]:
    header = spec.file_columns is None
    train_frame = _read_table(train_path, header, spec.file_columns)
    eval_frame = _read_table(eval_path, header, spec.file_columns)
    if spec.name == "custom":
        if spec.file_label not in train_frame.columns:
            raise ValueError(
                f"'{train_path}': no label column {spec.file_label!r}; it has {list(train_frame.columns)}."
            )
        spec = _infer_labels(spec, list(train_frame[spec.file_label]))
    train = _split_from_frame(train_frame, spec, spec.file_text, spec.file_label, f"'{train_path}'")
    evaluation = _split_from_frame(eval_frame, spec, spec.file_text, spec.file_label, f"'{eval_path}'")
    return train, evaluation, spec


def _load_hub(spec: TaskSpec) -> tuple[TextSplit, TextSplit]:
    from datasets import load_dataset

    dataset = load_dataset(spec.hub_id, spec.hub_config) if spec.hub_config else load_dataset(spec.hub_id)
    splits = []
    for split in ("train", spec.hub_eval_split):
        frame = dataset[split].to_pandas()
        hub_spec = replace(spec, label_names=None)  # the Hub stores integer ids already
        splits.append(_split_from_frame(frame, hub_spec, spec.hub_text, "label", f"{spec.hub_id}[{split}]"))
    return splits[0], splits[1]


def load_task(data_args: Any, seed: int = 0) -> TaskData:
    """Load the task ``data_args`` describes (see ``DataArguments``).

    ``max_train_samples`` keeps a seeded random subset of the training split;
    ``max_eval_samples`` keeps the first examples of the evaluation split.

    Raises:
        ValueError: unknown task (listing the known ones), missing columns, unexpected labels.
        FileNotFoundError: a data file is missing.
    """
    task = data_args.task.lower().replace("-", "")
    if task == "custom":
        spec = _custom_spec(data_args)
        train, evaluation, spec = _load_files(
            spec, Path(data_args.train_file), Path(data_args.validation_file)
        )
    elif task in TASKS:
        spec = TASKS[task]
        if data_args.data_dir:
            folder = Path(data_args.data_dir)
            if spec.folder and (folder / spec.folder).is_dir():
                folder = folder / spec.folder
            if not (folder / "train.tsv").is_file():
                raise FileNotFoundError(
                    f"no 'train.tsv' for task {task!r} in '{folder}'; `data_dir` should be the GLUE folder "
                    f"(holding '{spec.folder or task}/') or the task's own folder."
                )
            train, evaluation, spec = _load_files(spec, folder / "train.tsv", folder / spec.eval_file)
        else:
            train, evaluation = _load_hub(spec)
    else:
        raise ValueError(f"unknown `task` {data_args.task!r}; choose one of {sorted(TASKS) + ['custom']}.")
    if data_args.max_train_samples and data_args.max_train_samples < len(train):
        keep = np.sort(np.random.default_rng(seed).permutation(len(train))[: data_args.max_train_samples])
        train = train.select(keep)
    if data_args.max_eval_samples and data_args.max_eval_samples < len(evaluation):
        evaluation = evaluation.select(range(data_args.max_eval_samples))
    return TaskData(
        name=spec.name,
        train=train,
        validation=evaluation,
        num_labels=spec.num_labels,
        is_regression=spec.is_regression,
        metric=spec.metric or spec.name,
        label_names=list(spec.label_names) if spec.label_names else None,
    )


def default_data_dir() -> str | None:
    """``HF_FEDLORA_DATA_DIR`` if set (lets scripts point every task at one local folder)."""
    return os.environ.get("HF_FEDLORA_DATA_DIR")


__all__ = ["TASKS", "TaskData", "TaskSpec", "TextSplit", "load_task"]
