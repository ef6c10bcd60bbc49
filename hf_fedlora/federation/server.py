"""The server's side of a round (main process): collect the clients, screen, aggregate, evaluate,
update ranks, write.

:class:`RoundCollector` takes each trained client as it finishes. When no screening bound needs the
whole round (``max_norm_ratio``, relative to the round's median norm, is unset) it screens the
client alone against the previous global adapter (``max_update_norm``, ``clip_update_norm``) and
folds it into a :class:`~hf_fedlora.StreamingAggregator` at once, so the round never holds more
than the running sums and one client. With ``max_norm_ratio`` it keeps the clients (in memory, or
as their ``_exchange/`` folders) and screens them together after the last one, as
:func:`~hf_fedlora.screening.screen_clients` needs the round's norms first. Both give the same
global adapter (up to float32 summation order). Clients trained by the other ``accelerate``
processes arrive as ``_exchange/round-NNNN/client-CCCC`` folders after the barrier.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from accelerate.logging import get_logger

from ..adapters import LoraAdapter
from ..aggregation import aggregate_adapters
from ..errors import AdapterError
from ..screening import ClientVerdict, screen_clients
from ..streaming import StreamingAggregator
from .guard import interrupts_held
from .ranks import quality_upgrade
from .rounds import ClientRecord, DroppedClient, RoundRecord, round_dir
from .run import FederationRun
from .state import RunState

logger = get_logger(__name__)


def client_folder(exchange: Path, cid: int) -> Path:
    """Where a client's trained adapter is exchanged: ``_exchange/round-NNNN/client-CCCC``."""
    return exchange / f"client-{cid:04d}"


class RoundCollector:
    """The round's trained clients, folded in as they come (or kept for whole-round screening)."""

    def __init__(self, run: FederationRun, previous: LoraAdapter, sampled: list[int], exchange: Path):
        fed = run.fed_args
        self.run, self.previous, self.sampled, self.exchange = run, previous, sampled, exchange
        self.streaming = fed.max_norm_ratio is None
        target_rank = None if run.strategy.rank_grows_with_clients else run.max_rank
        self.aggregator = (
            StreamingAggregator(strategy=run.strategy, target_rank=target_rank, previous=previous)
            if self.streaming
            else None
        )
        self.kept: dict[int, LoraAdapter | Path] = {}
        self.infos: dict[int, ClientRecord] = {}
        self.dropped: list[DroppedClient] = []

    def add(self, cid: int, adapter: LoraAdapter | Path) -> None:
        """One trained client (an adapter in memory, or its exchanged folder)."""
        if not self.streaming:
            self.kept[cid] = adapter
            return
        fed = self.run.fed_args
        accepted, (verdict,) = screen_clients(
            [adapter],
            reference=self.previous,
            max_update_norm=fed.max_update_norm,
            clip_update_norm=fed.clip_update_norm,
        )
        if not verdict.accepted:
            self._drop(cid, verdict.reason)
            return
        try:
            self.aggregator.add(accepted[0])
        except AdapterError as exc:  # refused: the running state is unchanged
            self._drop(cid, f"{type(exc).__name__}: {exc}")
            return
        self._accept(cid, accepted[0], verdict)

    def add_remaining(self) -> None:
        """After the barrier: the clients the other processes trained, from their folders, in id order."""
        for cid in self.sampled:
            if cid not in self.infos and cid not in self.kept and cid not in {d.client for d in self.dropped}:
                self.add(cid, client_folder(self.exchange, cid))

    def _drop(self, cid: int, reason: str | None) -> None:
        self.dropped.append(DroppedClient(cid, reason or "rejected"))

    def _accept(self, cid: int, adapter: LoraAdapter, verdict: ClientVerdict) -> None:
        info = ClientRecord.from_dict(adapter.provenance["client"])
        if verdict.clipped and verdict.update_norm:
            info.clipped = {
                "update_norm": verdict.update_norm,
                "factor": self.run.fed_args.clip_update_norm / verdict.update_norm,
            }
        self.infos[cid] = info

    def merge(self) -> tuple[LoraAdapter, list[ClientRecord], list[DroppedClient]]:
        """The new global adapter (the previous one when every client was rejected), the accepted
        clients' records and the dropped clients, in client id order."""
        if not self.streaming:
            self._screen_round()
        dropped = sorted(self.dropped, key=lambda d: d.client)
        if dropped and self.run.fed_args.on_bad_client == "fail":
            raise AdapterError(
                f"{len(dropped)} client update(s) rejected and `on_bad_client` is 'fail': "
                + "; ".join(f"client {d.client}: {d.reason}" for d in dropped)
            )
        for item in dropped:
            logger.warning(f"dropping client {item.client} from this round: {item.reason}")
        clipped = sorted(c for c, i in self.infos.items() if i.clipped)
        if clipped:
            logger.info(
                f"clipped the updates of clients {clipped} to norm {self.run.fed_args.clip_update_norm}"
            )
        infos = [self.infos[c] for c in sorted(self.infos)]
        if not infos:
            return self.previous, infos, dropped
        if self.streaming:
            return self.aggregator.result(), infos, dropped
        return self._aggregate([self._adapters[c] for c in sorted(self.infos)]), infos, dropped

    def _screen_round(self) -> None:
        """``max_norm_ratio``: screen the whole round at once, against the previous global adapter
        (never against one another, so a hostile first client cannot make the honest ones look
        incompatible)."""
        fed, order = self.run.fed_args, [c for c in self.sampled if c in self.kept]
        accepted, verdicts = screen_clients(
            [self.kept[c] for c in order],
            reference=self.previous,
            max_update_norm=fed.max_update_norm,
            max_norm_ratio=fed.max_norm_ratio,
            clip_update_norm=fed.clip_update_norm,
        )
        self._adapters = {}
        chosen = iter(accepted)
        for verdict in verdicts:
            cid = order[verdict.index]
            if not verdict.accepted:
                self._drop(cid, verdict.reason)
                continue
            self._adapters[cid] = next(chosen)
            self._accept(cid, self._adapters[cid], verdict)

    def _aggregate(self, clients: list[LoraAdapter]) -> LoraAdapter:
        """The rule's merge of the screened clients, kept at the run's largest rank unless the rule's
        rank grows with the clients (stacking)."""
        target_rank = None if self.run.strategy.rank_grows_with_clients else self.run.max_rank
        return aggregate_adapters(
            clients, strategy=self.run.strategy, target_rank=target_rank, previous=self.previous
        )


def _update_ranks(
    run: FederationRun, rnd: int, state: RunState, infos: list[ClientRecord], exchange: Path
) -> None:
    """``quality_upgrade``: collect the round's scores; after ``upgrade_after_round``, upgrade the best clients."""
    fed = run.fed_args
    if not run.scoring_round(rnd):
        return
    state.scores.update({str(i.client): i.quality_score for i in infos})
    for probe in sorted(exchange.glob("score-*.json")):
        entry = json.loads(probe.read_text(encoding="utf-8"))
        state.scores[str(entry["client"])] = entry["quality_score"]
    if rnd == fed.upgrade_after_round:
        scores = {int(k): v for k, v in state.scores.items()}
        state.ranks = quality_upgrade(
            state.ranks, scores, high_rank=fed.high_rank, fraction=fed.upgrade_fraction
        )


def _write_round(
    run: FederationRun, record: RoundRecord, state: RunState, exchange: Path, round_start: float
) -> None:
    """Push (if asked), keep the clients' adapters (if asked), append the JSONL line, save
    ``state.json``: the round is complete. Then delete the exchange folder and log to the trackers."""
    out = run.out
    if run.writer.hub_repo_id:
        record.hub_push = run.writer.push(record)
    record.seconds["wall"] = round(time.perf_counter() - round_start, 3)
    # the kept clients, the JSONL line and state.json: all or none (an interrupt removes _exchange/)
    with interrupts_held():
        if run.fed_args.keep_client_adapters and exchange.is_dir():
            kept = out / "clients" / round_dir(out, record.round).name
            shutil.rmtree(kept, ignore_errors=True)
            kept.parent.mkdir(parents=True, exist_ok=True)
            os.replace(exchange, kept)
        run.writer.append(record)
        state.completed_round = record.round
        state.save(out)
    shutil.rmtree(exchange, ignore_errors=True)
    run.accelerator.log(
        {f"eval/{k}": v for k, v in record.eval.items()}
        | {"train/mean_loss": record.mean_loss, "comm/cumulative_mb": state.cumulative_bytes / 1e6},
        step=record.round,
    )


def server_round(
    run: FederationRun, rnd: int, collector: RoundCollector, state: RunState, seconds: dict[str, Any]
) -> RoundRecord:
    """Main process: the remaining clients in, merge (and save ``round-NNNN/``), evaluate, update ranks, write."""
    round_start = seconds.pop("_start")
    start = time.perf_counter()
    collector.add_remaining()
    merged, infos, dropped = collector.merge()
    merged.provenance.update(
        round=rnd, sampled_clients=collector.sampled, dropped_clients=[d.to_dict() for d in dropped]
    )
    run.writer.save_adapter(rnd, merged)
    seconds["aggregate"] = round(time.perf_counter() - start, 3)

    start = time.perf_counter()
    evaluation = run.evaluate(merged, run.task.validation)
    seconds["eval"] = round(time.perf_counter() - start, 3)
    traffic = sum(i.bytes_up + i.bytes_down for i in infos)
    state.cumulative_bytes += traffic
    _update_ranks(run, rnd, state, infos, collector.exchange)
    record = RoundRecord(
        round=rnd,
        clients=infos,
        dropped=dropped,
        eval=evaluation,
        eval_metric=run.metric_name,
        global_rank=merged.max_rank,
        bytes_round=traffic,
        cumulative_bytes=state.cumulative_bytes,
        seconds=seconds,
        strategy=run.strategy.name,
        adapter=round_dir(run.out, rnd).name,
    )
    _write_round(run, record, state, collector.exchange, round_start)
    return record


__all__ = ["RoundCollector", "client_folder", "server_round"]
