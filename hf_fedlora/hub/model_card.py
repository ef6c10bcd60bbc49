"""The model card (``README.md``) pushed with every round: Hub metadata, the federation, a table
of metrics per round, and how to load a given round."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ..constants import ROUND_TAG_FORMAT

TAGS = ("lora", "federated-learning", "hf-fedlora")

_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_REPO_ID = re.compile(r"^[\w][\w.-]*(/[\w][\w.-]*)?$")


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
    lines = ["---", "library_name: peft"]
    if link and base_model and _REPO_ID.match(base_model):  # the Hub rejects local paths here
        lines.append(f"base_model: {base_model}")
    lines.append("tags:")
    lines += [f"- {t}" for t in (*TAGS, *([strategy] if strategy else []))]
    if link and dataset and _REPO_ID.match(dataset):
        lines += ["datasets:", f"- {dataset}"]
    lines.append("---")
    return "\n".join(lines)


def build_model_card(
    repo_id: str,
    *,
    round_index: int | None = None,
    config: Any = None,
    provenance: Mapping[str, Any] | None = None,
    card_info: Mapping[str, Any] | None = None,
    metrics_history: Sequence[Mapping[str, Any]] | None = None,
    link_hub_repos: bool = True,
) -> str:
    """Write the ``README.md`` of a round (or of a single adapter when ``round_index`` is None).

    Args:
        repo_id: the Hub repo, used in the loading examples.
        round_index: the federation round this revision holds.
        config: the adapter's ``peft.LoraConfig`` (rank, alpha, target modules, base model, task).
        provenance: the adapter's ``fedlora_provenance.json`` (strategy, clients, their ranks).
        card_info: facts that override the provenance: ``base_model``, ``strategy``,
            ``num_clients``, ``clients_per_round``, ``rank_distribution`` (str, ``{rank: count}``
            or a list of ranks), ``task``, ``dataset``.
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
    name = repo_id.split("/")[-1]

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
    if config is not None:
        targets = config.target_modules
        targets = ", ".join(sorted(targets)) if isinstance(targets, (set, list, tuple)) else str(targets)
        rows.append(
            ("global adapter", f"r={config.r}, lora_alpha={config.lora_alpha}, target modules: {targets}")
        )

    tag = ROUND_TAG_FORMAT.format(round_index) if round_index is not None else None
    revision = f', revision="{tag}"' if tag else ""
    parts = [
        _metadata(base_model, strategy, info.get("dataset"), link_hub_repos),
        "",
        f"# {name}",
        "",
        (
            "The global LoRA adapter of a federated fine-tuning run made with hf-fedlora: clients train "
            "PEFT LoRA adapters of different ranks on their own data, and a server merges them into this "
            "adapter every round."
        ),
    ]
    if tag:
        parts += [
            "",
            (
                f"This revision is **round {round_index}** (tag `{tag}`). Every round is one commit tagged "
                "`round-NNNN`; `main` holds the latest round."
            ),
        ]
    parts += ["", "## Federation", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if metrics_history:
        parts += ["", "## Metrics per round", "", metrics_table(metrics_history)]
    base_arg = f'"{base_model}"' if base_model else '"<base model>"'
    parts += [
        "",
        "## Load a round",
        "",
        "```python",
        f"from transformers import {auto_class}",
        "from peft import PeftModel",
        "",
        f"base = {auto_class}.from_pretrained({base_arg})",
        f'model = PeftModel.from_pretrained(base, "{repo_id}"{revision})',
        "```",
        "",
        "With hf-fedlora (list the rounds, read an adapter, or send a client its rank-r view):",
        "",
        "```python",
        "from hf_fedlora import LoraAdapter",
        "from hf_fedlora.hub import list_rounds",
        "",
        f'rounds = list_rounds("{repo_id}")',
        f'adapter = LoraAdapter.from_pretrained("{repo_id}"{revision})',
        "client_view = adapter.to_rank(4, lora_alpha=8)",
        "```",
        "",
    ]
    return "\n".join(parts)


__all__ = ["TAGS", "build_model_card", "metrics_table", "rank_distribution"]
