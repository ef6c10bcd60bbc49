"""Round outputs of a Flower run: the global adapter per round in PEFT format, metrics, Hub push."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..adapters import LoraAdapter
from ..constants import ROUND_TAG_FORMAT

METRICS_NAME = "metrics.jsonl"


class RoundWriter:
    """Writes ``output_dir/round-NNNN/`` (the global adapter, PEFT format) and appends one line per
    round to ``output_dir/metrics.jsonl``; pushes each round to the Hub when ``hub_repo_id`` is set.

    Call it as ``writer(server_round, global_adapter, metrics)``; it fits
    ``HeteroLoraStrategy(on_aggregate=writer)`` or a ServerApp's ``evaluate_fn``.

    Args:
        output_dir (`str` or `Path`): where rounds are written.
        hub_repo_id (`str`, *optional*): push every round with ``hf_fedlora.hub.push_round``
            (imported only then).
        token (`str`, *optional*): Hub token (never logged).
        private (`bool`, *optional*): create the Hub repo private.
        card_info (`dict`, *optional*): extra facts for the model card.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        hub_repo_id: str | None = None,
        token: str | None = None,
        private: bool | None = None,
        card_info: Mapping[str, Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.hub_repo_id = hub_repo_id
        self.token = token
        self.private = private
        self.card_info = dict(card_info or {})
        self.history: list[dict[str, Any]] = []

    def round_dir(self, server_round: int) -> Path:
        """``output_dir/round-NNNN``."""
        return self.output_dir / ROUND_TAG_FORMAT.format(server_round)

    def __call__(self, server_round: int, adapter: LoraAdapter, metrics: Mapping[str, Any] | None = None) -> Path:
        """Save the round; returns its folder."""
        folder = adapter.save_pretrained(self.round_dir(server_round))
        row = {"round": server_round, **_plain(metrics or {})}
        self.history.append(row)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / METRICS_NAME, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
        if self.hub_repo_id:
            from ..hub import push_round

            push_round(
                folder,
                self.hub_repo_id,
                server_round,
                token=self.token,
                private=self.private,
                card_info=self.card_info or None,
                metrics_history=list(self.history),
            )
        return folder


def _plain(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metric values as JSON numbers (Flower records hold ints, floats and lists of them)."""
    out: dict[str, Any] = {}
    for key, value in dict(metrics).items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[str(key)] = value
    return out


__all__ = ["METRICS_NAME", "RoundWriter"]
