"""The model card (``README.md``) pushed with every round: Hub metadata, the federation, a table
of metrics per round, and how to load a given round."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..constants import ROUND_TAG_FORMAT
from .errors import is_repo_id

TAGS = ("lora", "federated-learning", "hf-fedlora")

_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def rank_distribution(provenance: Mapping[str, Any]) -> dict[int, int] | None:
    """``{rank: number of clients}`` from a global adapter's provenance (each client's largest rank)."""
    clients = provenance.get("clients")
    if not isinstance(clients, list) or not clients:
        return None
    ranks = [max(c["ranks"]) for c in clients if isinstance(c, dict) and c.get("ranks")]
    return dict(sorted(Counter(ranks).items())) if ranks else None


def _format_ranks(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"r={r}: {n} client{'s' if n != 1 else ''}" for r, n in value.items())
    if isinstance(value, (list, tuple)):
        return _format_ranks(dict(sorted(Counter(value).items())))
    return str(value)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def metrics_table(history: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table with one row per round and one column per metric seen in any round."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k != "round" and k not in columns]
    lines = ["| round | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in sorted(history, key=lambda r: r.get("round", 0)):
        lines.append(f"| {row.get('round', '')} | " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _metadata(base_model: str | None, strategy: str | None, dataset: str | None, link: bool) -> str:
    """The YAML front matter, built with ``huggingface_hub.ModelCardData`` (keys in a fixed order)."""
    data = ModelCardData(
        library_name="peft",
        base_model=base_model
        if link and is_repo_id(base_model)
        else None,  # the Hub rejects local paths here
        tags=[*TAGS, *([strategy] if strategy else [])],
        datasets=[dataset] if link and is_repo_id(dataset) else None,
    )
    return "---\n" + data.to_yaml(original_order=["library_name", "base_model", "tags", "datasets"]) + "\n---"


def _rows(
    info: Mapping[str, Any], config: Any, base_model: Any, strategy: Any, num_clients: Any, ranks: Any
) -> list[tuple[str, str]]:
    """The "Federation" table: one ``(fact, value)`` per fact known."""
    rows = [("base model", f"`{base_model}`" if base_model else "not recorded")]
    if info.get("task") or info.get("dataset"):
        rows.append(("task / data", " / ".join(str(info[k]) for k in ("task", "dataset") if info.get(k))))
    if strategy:
        rows.append(("aggregation strategy", f"`{strategy}`"))
    if num_clients:
        per_round = info.get("clients_per_round")
        rows.append(
            ("clients", f"{num_clients}" + (f" ({per_round} sampled per round)" if per_round else ""))
        )
    if ranks:
        rows.append(("client LoRA ranks", _format_ranks(ranks)))
    for key, fact in (
        ("rounds", "rounds"),
        ("partition", "data partition"),
        ("seed", "seed"),
        ("eval_metric", "eval metric"),
    ):
        if info.get(key) is not None:
            rows.append((fact, _cell(info[key])))
    if config is not None:
        targets = config.target_modules
        targets = ", ".join(sorted(targets)) if isinstance(targets, (set, list, tuple)) else str(targets)
        rows.append(
            ("global adapter", f"r={config.r}, lora_alpha={config.lora_alpha}, target modules: {targets}")
        )
    return rows


def _loading(
    repo_id: str | None, tag: str | None, auto_class: str, base_model: Any, num_labels: Any
) -> list[str]:
    """The "Load a round" section: with PEFT alone, then with hf-fedlora."""
    base_arg = f'"{base_model}"' if base_model else '"<base model>"'
    if num_labels is not None:
        base_arg += f", num_labels={num_labels}"
    if repo_id is not None:
        revision = f', revision="{tag}"' if tag else ""
        where, listing = (
            f'"{repo_id}"{revision}',
            ["from hf_fedlora.hub import list_rounds", "", f'rounds = list_rounds("{repo_id}")'],
        )
    else:  # a run's output folder: the rounds are its sub-folders
        where, listing = f'"{tag or "<adapter folder>"}"', [""]
    return [
        "## Load a round",
        "",
        "```python",
        f"from transformers import {auto_class}",
        "from peft import PeftModel",
        "",
        f"base = {auto_class}.from_pretrained({base_arg})",
        f"model = PeftModel.from_pretrained(base, {where})",
        "```",
        "",
        "With hf-fedlora ("
        + ("list the rounds, " if repo_id is not None else "")
        + "read an adapter, or send a client its rank-r view):",
        "",
        "```python",
        "from hf_fedlora import LoraAdapter",
        *listing,
        f"adapter = LoraAdapter.from_pretrained({where})",
        "client_view = adapter.to_rank(4, lora_alpha=8)",
        "```",
        "",
    ]


def build_model_card(
    repo_id: str | None,
    *,
    round_index: int | None = None,
    config: Any = None,
    provenance: Mapping[str, Any] | None = None,
    card_info: Mapping[str, Any] | None = None,
    metrics_history: Sequence[Mapping[str, Any]] | None = None,
    link_hub_repos: bool = True,
) -> str:
    """Write the ``README.md`` of a round, of a single adapter (``round_index=None``) or of a run's
    output folder (``repo_id=None``: the loading example reads the local ``round-NNNN`` folder).

    Args:
        repo_id: the Hub repo, used in the title and the loading examples; ``None`` for a local folder.
        round_index: the federation round this revision (or, locally, the newest folder) holds.
        config: the adapter's ``peft.LoraConfig`` (rank, alpha, target modules, base model, task).
        provenance: the adapter's ``fedlora_provenance.json`` (strategy, clients, their ranks).
        card_info: facts that override the provenance: ``base_model``, ``strategy``,
            ``num_clients``, ``clients_per_round``, ``rank_distribution`` (str, ``{rank: count}``
            or a list of ranks), ``task``, ``dataset``, ``rounds``, ``partition``, ``seed``,
            ``eval_metric``; ``num_labels`` (passed in the loading example); ``command`` (shown
            as the way to reproduce the run); ``summary`` (preformatted text, shown as is) and
            ``plot`` (a relative image path, shown under the summary).
        metrics_history: one dict per round, e.g. ``{"round": 1, "eval_accuracy": 0.8}``.
        link_hub_repos: put ``base_model`` and ``datasets`` in the metadata. The Hub refuses a card
            whose ``base_model`` is not a model it hosts; the push then retries without them.

    Returns:
        The card text: YAML metadata (``library_name: peft``, ``base_model``, tags ``lora``,
        ``federated-learning``, ``hf-fedlora`` and the strategy), then Markdown. The text depends
        only on its inputs (no timestamps), so pushing the same round twice changes nothing.
    """
    info = dict(card_info or {})
    prov = dict(provenance or {})
    base_model = info.get("base_model") or getattr(config, "base_model_name_or_path", None)
    strategy = info.get("strategy") or prov.get("strategy")
    num_clients = info.get("num_clients") or prov.get("num_clients")
    ranks = info.get("rank_distribution") or rank_distribution(prov)
    task_type = getattr(config, "task_type", None)
    task_type = getattr(task_type, "value", task_type)
    auto_class = _AUTO_CLASSES.get(str(task_type), "AutoModel")
    if repo_id is not None:
        title = repo_id.split("/")[-1]
    else:
        title = f"Federated LoRA on {info.get('task') or 'a task'}" + (
            f" ({strategy} aggregation)" if strategy else ""
        )

    tag = ROUND_TAG_FORMAT.format(round_index) if round_index is not None else None
    parts = [
        _metadata(base_model, strategy, info.get("dataset"), link_hub_repos),
        "",
        f"# {title}",
        "",
        (
            "The global LoRA adapter of a federated fine-tuning run made with hf-fedlora: clients train "
            "PEFT LoRA adapters of different ranks on their own data, and a server merges them into this "
            "adapter every round."
        ),
    ]
    if tag and repo_id is not None:
        parts += [
            "",
            (
                f"This revision is **round {round_index}** (tag `{tag}`). Every round is one commit tagged "
                "`round-NNNN`; `main` holds the latest round."
            ),
        ]
    elif tag:
        parts += [
            "",
            f"Every round's global adapter is a PEFT folder `round-NNNN` here; the last is `{tag}`.",
        ]
    parts += ["", "## Federation", "", "| | |", "|---|---|"]
    parts += [f"| {k} | {v} |" for k, v in _rows(info, config, base_model, strategy, num_clients, ranks)]
    if metrics_history:
        parts += ["", "## Metrics per round", "", metrics_table(metrics_history)]
    if info.get("summary") or info.get("plot"):
        parts += ["", "## Results"]
        if info.get("summary"):
            parts += ["", "```text", str(info["summary"]).rstrip("\n"), "```"]
        if info.get("plot"):
            parts += ["", f"![{info.get('eval_metric') or 'metric'} by round]({info['plot']})"]
    parts += ["", *_loading(repo_id, tag, auto_class, base_model, info.get("num_labels"))]
    if info.get("command"):
        parts += ["## Reproduce", "", "```bash", str(info["command"]), "```", ""]
    return ModelCard("\n".join(parts)).content


__all__ = ["TAGS", "build_model_card", "metrics_table", "rank_distribution"]
