"""A federation's rounds on disk: the typed record of a round, ``metrics.jsonl``, and the one
:class:`RoundWriter` that the recipe's loop and a Flower ``ServerApp`` both use.

A round's outputs are ``output_dir/round-NNNN/`` (the global adapter, PEFT format) and one JSON
line in ``output_dir/metrics.jsonl``. :class:`RoundRecord` is that line, typed (like Flower's
``Result``); :func:`append_record` is the only code that writes a line and :func:`read_records`
the only code that reads them back. With a Hub repo set, the writer pushes every round with
``hf_fedlora.hub.push_round``; a failed push is logged and recorded in the round's line, never
raised, and the round stays on disk.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .. import hub
from ..adapters import LoraAdapter
from ..constants import ROUND_TAG_FORMAT

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"


def round_dir(output_dir: str | os.PathLike, round_index: int) -> Path:
    """``output_dir/round-NNNN``: the global adapter after ``round_index`` (0: the initial one)."""
    return Path(output_dir) / ROUND_TAG_FORMAT.format(round_index)


@dataclass
class ClientRecord:
    """One client's local training in a round (an entry of :attr:`RoundRecord.clients`).

    Attributes:
        client: the client id. rank: its LoRA rank this round.
        loss, last_loss: mean and last training loss. num_steps, num_examples: optimiser steps, shard size.
        train_seconds: local training time. bytes_down, bytes_up: the adapter sizes received and sent.
        quality_score: the local adapter's validation score (``quality_upgrade`` scoring rounds only).
        clipped: when ``clip_update_norm`` scaled the update down: ``{"update_norm": its norm
            before, "factor": the scale applied}`` (the norm after is ``update_norm * factor``).
    """

    client: int
    rank: int
    loss: float
    last_loss: float
    num_steps: int
    num_examples: int
    train_seconds: float
    bytes_down: int
    bytes_up: int
    quality_score: float | None = None
    clipped: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("quality_score", "clipped"):
            if data[name] is None:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClientRecord:
        return cls(**data)


@dataclass
class DroppedClient:
    """A client update the server left out of a round, and why (an entry of :attr:`RoundRecord.dropped`)."""

    client: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"client": self.client, "reason": self.reason}


@dataclass
class RoundRecord:
    """One round's line of ``metrics.jsonl``. The JSON keys are the attribute names.

    The recipe fills every attribute (``hub_push`` only when pushing). Attributes left ``None``
    are not written, so a Flower ``ServerApp`` records ``round`` plus its flat ``metrics``.

    Attributes:
        round: the round, from 1.
        clients: the clients aggregated this round (:class:`ClientRecord`).
        dropped: updates left out by the server's screening (:class:`DroppedClient`).
        eval: the global adapter's evaluation, with ``score`` the primary metric.
        eval_metric: the name of the metric ``score`` holds.
        global_rank: the global adapter's largest rank.
        bytes_round, cumulative_bytes: adapter bytes sent up and down this round and so far.
        seconds: ``train``, ``aggregate``, ``eval`` and ``wall`` times of the round.
        strategy: the aggregation rule. adapter: the round's folder name (``round-NNNN``).
        hub_push: ``{"ok": True, "commit": ..., "skipped": ...}`` or ``{"ok": False, "error": ...}``.
        metrics: other numbers, written as top-level keys (Flower's ``MetricRecord`` values).
    """

    round: int
    clients: list[ClientRecord] | None = None
    dropped: list[DroppedClient] | None = None
    eval: dict[str, float] | None = None
    eval_metric: str | None = None
    global_rank: int | None = None
    bytes_round: int | None = None
    cumulative_bytes: int | None = None
    seconds: dict[str, float] | None = None
    strategy: str | None = None
    adapter: str | None = None
    hub_push: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = sorted(set(self.metrics).intersection(_FIELDS))
        if clash:
            raise ValueError(f"`metrics` may not use the record's own keys {clash}.")

    @property
    def mean_loss(self) -> float:
        """The clients' mean training loss (NaN when no client was aggregated)."""
        return float(np.mean([c.loss for c in self.clients])) if self.clients else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the line (``None`` attributes left out, ``metrics`` flattened)."""
        data: dict[str, Any] = dict(self.metrics)
        for name in _FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if name in ("clients", "dropped"):
                value = [item.to_dict() for item in value]
            data[name] = value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundRecord:
        """The record of a line; keys that are not attributes go to ``metrics``."""
        known = {k: v for k, v in data.items() if k in _FIELDS}
        if known.get("clients") is not None:
            known["clients"] = [ClientRecord.from_dict(c) for c in known["clients"]]
        if known.get("dropped") is not None:
            known["dropped"] = [DroppedClient(**d) for d in known["dropped"]]
        return cls(**known, metrics={k: v for k, v in data.items() if k not in _FIELDS})

    def history_row(self) -> dict[str, Any]:
        """The round's row of the Hub model card's metrics table."""
        row: dict[str, Any] = {"round": self.round}
        row.update({f"eval_{k}": v for k, v in (self.eval or {}).items() if k != "score"})
        if self.clients is not None:
            row["mean_loss"] = self.mean_loss
        if self.cumulative_bytes is not None:
            row["cumulative_mb"] = self.cumulative_bytes / 1e6
        return {**row, **self.metrics}


_FIELDS = tuple(f.name for f in fields(RoundRecord) if f.name != "metrics")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _line(record: RoundRecord) -> str:
    return json.dumps(record.to_dict(), sort_keys=True) + "\n"


def append_record(output_dir: str | os.PathLike, record: RoundRecord) -> None:
    """Append one round's line to ``metrics.jsonl`` (flushed and synced)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(output_dir) / METRICS_NAME, "a", encoding="utf-8") as handle:
        handle.write(_line(record))
        handle.flush()
        os.fsync(handle.fileno())


def read_records(output_dir: str | os.PathLike, up_to_round: int | None = None) -> list[RoundRecord]:
    """The records of ``metrics.jsonl`` (optionally only rounds <= ``up_to_round``); a torn last line is skipped."""
    path = Path(output_dir) / METRICS_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict) or not isinstance(data.get("round", 0), int):
            continue  # not a round's line (resuming refuses such a file: ``state.check_records``)
        if up_to_round is None or data.get("round", 0) <= up_to_round:
            records.append(RoundRecord.from_dict(data))
    return records


def truncate_records(output_dir: str | os.PathLike, up_to_round: int) -> list[RoundRecord]:
    """Rewrite ``metrics.jsonl`` keeping only rounds <= ``up_to_round``; returns the kept records."""
    records = read_records(output_dir, up_to_round)
    atomic_write_text(Path(output_dir) / METRICS_NAME, "".join(_line(r) for r in records))
    return records


def _plain(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metric values as JSON values (non-finite floats become ``null``)."""
    return {
        str(k): None if isinstance(v, float) and not math.isfinite(v) else v for k, v in dict(metrics).items()
    }


class RoundWriter:
    """Writes a federation's rounds: ``output_dir/round-NNNN/``, a ``metrics.jsonl`` line each,
    and, with ``hub_repo_id`` set, a Hub push each (one commit and a ``round-NNNN`` tag).

    Call it as ``writer(server_round, global_adapter, metrics)``; it fits
    ``HeteroLoraStrategy(on_aggregate=writer)`` or a ServerApp's ``evaluate_fn``. The recipe's
    loop uses its steps (:meth:`save_adapter`, :meth:`push`, :meth:`append`) in that order.

    A failed push is logged and recorded in the round's line (``hub_push``, token redacted),
    never raised: the round stays on disk, and ``hf-fedlora push`` can upload it later.

    Args:
        output_dir (`str` or `Path`): where rounds are written.
        hub_repo_id (`str`, *optional*): push every round with ``hf_fedlora.hub.push_round``.
        token (`str`, *optional*): Hub token (never logged or written).
        private (`bool`, *optional*): create the Hub repo private.
        card_info (`dict`, *optional*): facts for the pushed model card (``build_model_card``'s ``card_info``).
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
        self.records: list[RoundRecord] = []

    def round_dir(self, round_index: int) -> Path:
        """``output_dir/round-NNNN``."""
        return round_dir(self.output_dir, round_index)

    def resume(self, completed_round: int) -> list[RoundRecord]:
        """Drop the lines of rounds after ``completed_round`` and take the others as the history."""
        self.records = truncate_records(self.output_dir, completed_round)
        return list(self.records)

    def save_adapter(self, round_index: int, adapter: LoraAdapter) -> Path:
        """Write the round's global adapter (atomically); returns its folder."""
        return adapter.save_pretrained(self.round_dir(round_index))

    def push(self, record: RoundRecord) -> dict[str, Any]:
        """Push the round's folder with the model card and metrics so far; returns ``record.hub_push``."""
        folder = self.round_dir(record.round)
        try:
            history = [r.history_row() for r in (*self.records, record)]
            commit = hub.push_round(
                folder,
                self.hub_repo_id,
                record.round,
                token=self.token,
                private=self.private,
                card_info=self.card_info or None,
                metrics_history=history,
            )
            return {"ok": True, "commit": commit, "skipped": commit is None}
        except Exception as exc:  # a network or auth failure must not lose the local round
            message = f"{type(exc).__name__}: {exc}"
            if self.token:
                message = message.replace(self.token, "***")
            logger.error(
                "pushing round %s to '%s' failed (%s); the round is saved in '%s' and training continues. "
                "Push it later with `hf-fedlora push`.",
                record.round,
                self.hub_repo_id,
                message,
                folder,
            )
            return {"ok": False, "error": message}

    def append(self, record: RoundRecord) -> None:
        """Append the round's line (the round is complete on disk after this) and keep it in the history."""
        append_record(self.output_dir, record)
        self.records.append(record)

    def write(self, record: RoundRecord, adapter: LoraAdapter | None = None) -> Path:
        """Save ``adapter`` (if given) as the round's folder, push it (if a repo is set), append the line."""
        folder = (
            self.save_adapter(record.round, adapter) if adapter is not None else self.round_dir(record.round)
        )
        if self.hub_repo_id:
            record.hub_push = self.push(record)
        self.append(record)
        return folder

    def __call__(
        self, server_round: int, adapter: LoraAdapter, metrics: Mapping[str, Any] | None = None
    ) -> Path:
        """Write a round from a Flower hook: ``{"round": server_round, **metrics}`` is its line."""
        return self.write(RoundRecord(server_round, metrics=_plain(metrics or {})), adapter)


__all__ = [
    "METRICS_NAME",
    "ClientRecord",
    "DroppedClient",
    "RoundRecord",
    "RoundWriter",
    "append_record",
    "atomic_write_text",
    "read_records",
    "round_dir",
    "truncate_records",
]
