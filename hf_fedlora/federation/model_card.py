"""The README model card written into a federation's output folder."""

from __future__ import annotations

from typing import Any, Sequence

from .plots import summary_table


def render_model_card(info: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    """Markdown with Hub metadata (front matter), the run's setup and its per-round results.

    Args:
        info: ``base_model``, ``task``, ``strategy``, ``num_clients``, ``clients_per_round``,
            ``rounds``, ``partition``, ``ranks``, ``seed``, ``eval_metric`` and ``command``.
        records: the ``metrics.jsonl`` records.
    """
    last = records[-1] if records else {}
    final = last.get("eval", {})
    metric = info.get("eval_metric", "score")
    base = info.get("base_model") or "unknown"
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}" if "/" in base and not base.startswith(("/", ".")) else "# base_model: local folder",
        "tags:",
        "- hf_fedlora",
        "- federated-learning",
        "- lora",
        f"- {info.get('strategy', 'replication')}",
        "---",
        "",
        f"# Federated LoRA on {info.get('task')} ({info.get('strategy')} aggregation)",
        "",
        f"A global LoRA adapter trained by a simulated federation with heterogeneous client ranks, using "
        f"[hf_fedlora](https://github.com/hf-fedlora/hf_fedlora). Base model: `{base}`.",
        "",
        "## Setup",
        "",
        "| option | value |",
        "|---|---|",
        *(f"| {k} | `{info[k]}` |" for k in
          ("task", "strategy", "num_clients", "clients_per_round", "rounds", "partition", "ranks", "seed") if k in info),
        "",
        "## Results",
        "",
        f"Final {metric} after round {last.get('round', 0)}: **{final.get('score', float('nan')):.4f}**.",
        "",
        "```",
        summary_table(records),
        "```",
        "",
        "![metric by round and by traffic](metrics.png)",
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForSequenceClassification",
        "",
        f'base = AutoModelForSequenceClassification.from_pretrained("{base}", num_labels={info.get("num_labels", 2)})',
        f'model = PeftModel.from_pretrained(base, "round-{last.get("round", 0):04d}")  # or a Hub repo with revision=',
        "```",
        "",
        "Reproduce:",
        "",
        "```bash",
        str(info.get("command", "accelerate launch recipes/fed_glue.py --config <config.yaml>")),
        "```",
        "",
    ]
    return "\n".join(lines)


__all__ = ["render_model_card"]
