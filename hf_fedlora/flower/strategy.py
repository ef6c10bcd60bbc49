"""A Flower strategy for LoRA clients of different ranks.

Flower's stock strategies average arrays element-wise, so they fail as soon as two clients send
LoRA factors of different ranks ("operands could not be broadcast"). :class:`HeteroLoraStrategy`
keeps Flower's sampling, messaging and round loop (it is a ``FedAvg``), and replaces the two steps
that assume equal shapes: ``configure_train`` sends every client the rank-``r_k`` view of the
global adapter (``LoraAdapter.to_rank``), and ``aggregate_train`` merges the replies with
:func:`hf_fedlora.aggregate_adapters` and any registered rule (``"replication"`` by default,
Byun & Lee, NAACL 2025, https://arxiv.org/abs/2406.17477).

Rounds survive lost nodes: ``start`` collects replies with a
:class:`~hf_fedlora.flower.collect.ReplyCollector`, so a round whose nodes do not all answer within
``timeout`` seconds goes on with the replies that came (at least ``min_train_replies`` of them),
logs each missing node with its id, and the next round starts as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from ..adapters import LoraAdapter
from ..adapters.validate import check_compatible
from ..aggregation import aggregate_adapters
from ..constants import SendBackMethod, check_send_back
from ..errors import AdapterError
from ..strategies import Strategy, get_strategy
from .collect import ReplyCollector
from .records import NUM_EXAMPLES_KEY, RANK_KEY, adapter_from_records, adapter_to_records

SEND_BACK_KEY = "lora-send-back"
"""ConfigRecord key telling the client how to re-view the adapter at another rank ("truncate"/"svd")."""

RankAllocation = Mapping[int, int] | Callable[[int, int], "int | None"]


@dataclass
class RoundReplies:
    """What one round of :class:`HeteroLoraStrategy` received and produced (in :attr:`HeteroLoraStrategy.rounds`;
    the adapters only with ``keep_replies``). The round's ``metrics.jsonl`` line is a
    :class:`hf_fedlora.federation.RoundRecord`, written by a :class:`RoundWriter`.

    Attributes:
        server_round: the round, from 1.
        node_ids: the nodes whose replies were aggregated, in aggregation order.
        replies: their adapters, in the same order.
        num_examples: their example counts (``None`` where a reply gave none).
        previous: the global adapter the round started from.
        global_adapter: the aggregate (``None`` when the round kept the previous one).
        rejected: ``(node_id, reason)`` of every reply that was left out.
        lost: ``(node_id, reason)`` of every sampled node whose reply did not come (timeout, error
            reply such as "node unavailable").
    """

    server_round: int
    node_ids: list[int] = field(default_factory=list)
    replies: list[LoraAdapter] = field(default_factory=list)
    num_examples: list[int | None] = field(default_factory=list)
    previous: LoraAdapter | None = None
    global_adapter: LoraAdapter | None = None
    rejected: list[tuple[int, str]] = field(default_factory=list)
    lost: list[tuple[int, str]] = field(default_factory=list)


class HeteroLoraStrategy(FedAvg):
    """``FedAvg`` whose clients train LoRA adapters of different ranks.

    The global adapter lives on the strategy (:attr:`global_adapter`). Start it like any Flower
    strategy, passing the initial adapter's records: its ``ConfigRecord`` fields go in
    ``train_config`` (they are only read before the first aggregation)::

        arrays, adapter_config = adapter_to_records(initial_adapter)
        strategy.start(grid, initial_arrays=arrays, train_config=ConfigRecord({**adapter_config, "lr": 1e-3}))

    A client's rank comes, in this order, from ``rank_allocation`` (the server decides), from the
    rank the client reported in its last reply (its own budget), else the client gets the full
    global adapter and takes its own view (see :func:`hf_fedlora.flower.client_view`).

    Replies that cannot be merged (missing fields, shapes that contradict the rank or the model,
    NaN/Inf) are logged with the node id and left out; the round goes on with the others. So are
    nodes that do not reply within ``start``'s ``timeout`` (seconds per round) or whose reply is an
    error (a SuperNode that died: the SuperLink answers "node unavailable" once its heartbeats stop).
    With fewer than ``min_train_replies`` usable replies a round keeps the previous global adapter.

    Args:
        aggregation (`str` or `Strategy`, *optional*, defaults to ``"replication"``):
            the rule, a name from ``hf_fedlora.list_strategies()`` or a ``Strategy``.
        target_rank (`int`, *optional*): output rank passed to ``aggregate_adapters``.
        send_back (`str`, *optional*): how clients get their view, ``"truncate"`` or ``"svd"``;
            default: the rule's ``send_back``.
        rank_allocation (mapping or callable, *optional*): ``{node_id: rank}``, or
            ``f(node_id, server_round) -> rank | None``; ``None`` leaves the choice to the client.
        alpha_ratio (`float`, *optional*, defaults to 2.0): views are sent with
            ``lora_alpha = alpha_ratio * rank``; a client with another alpha re-views locally.
        keep_replies (`bool`, *optional*, defaults to `False`): keep every round's accepted replies
            in :attr:`rounds` (memory grows with clients x rounds; for tests and audits).
        on_aggregate (callable, *optional*): ``f(server_round, global_adapter, metrics)`` called after
            each aggregation, e.g. a :class:`hf_fedlora.flower.RoundWriter`.
        min_train_replies (`int`, *optional*, defaults to 1): usable replies a round needs to
            aggregate; with fewer it keeps the previous global adapter (and the run goes on).
        **kwargs: ``FedAvg``'s arguments (``fraction_train``, ``min_train_nodes``, ``min_available_nodes``
            (nodes that must be connected before a round samples), ...).
    """

    def __init__(
        self,
        *,
        aggregation: str | Strategy = "replication",
        target_rank: int | None = None,
        send_back: SendBackMethod | None = None,
        rank_allocation: RankAllocation | None = None,
        alpha_ratio: float = 2.0,
        keep_replies: bool = False,
        on_aggregate: Callable[[int, LoraAdapter, MetricRecord | None], None] | None = None,
        min_train_replies: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.aggregation = get_strategy(aggregation)
        self.target_rank = target_rank
        self.send_back = check_send_back(send_back or self.aggregation.send_back)
        if not alpha_ratio > 0:
            raise AdapterError(f"`alpha_ratio` must be positive, got {alpha_ratio!r}.")
        self.rank_allocation = rank_allocation
        self.alpha_ratio = float(alpha_ratio)
        if (
            isinstance(min_train_replies, bool)
            or not isinstance(min_train_replies, int)
            or min_train_replies < 1
        ):
            raise AdapterError(f"`min_train_replies` must be a positive int, got {min_train_replies!r}.")
        self.min_train_replies = min_train_replies
        self.collector: ReplyCollector | None = None
        self.keep_replies = keep_replies
        self.on_aggregate = on_aggregate
        self.global_adapter: LoraAdapter | None = None
        self.client_ranks: dict[int, int] = {}
        self.rounds: list[RoundReplies] = []
        self._global_arrays: ArrayRecord | None = None

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        log(INFO, "\t└──> LoRA: aggregation '%s', send back '%s'", self.aggregation.name, self.send_back)

    def start(
        self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600, **kwargs
    ):
        """Flower's ``Strategy.start``, collecting each round's replies with a :class:`ReplyCollector`.

        Args:
            timeout: seconds a round waits for its replies; nodes that have not replied by then are
                logged as lost and the round goes on without them.
            **kwargs: ``train_config``, ``evaluate_config``, ``evaluate_fn`` (see ``FedAvg.start``).
        """
        self.collector = grid if isinstance(grid, ReplyCollector) else ReplyCollector(grid)
        return super().start(self.collector, initial_arrays, num_rounds=num_rounds, timeout=timeout, **kwargs)

    def _rank_for(self, node_id: int, server_round: int) -> int | None:
        allocation = self.rank_allocation
        if isinstance(allocation, Mapping):
            rank = allocation.get(node_id)
        elif allocation is not None:
            rank = allocation(node_id, server_round)
        else:
            rank = None
        return rank if rank is not None else self.client_ranks.get(node_id)

    def _current_global(self, arrays: ArrayRecord, config: ConfigRecord) -> LoraAdapter:
        if self.global_adapter is None or arrays is not self._global_arrays:
            self.global_adapter = adapter_from_records(arrays, config, label="initial global adapter")
            self._global_arrays = arrays
        return self.global_adapter

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send each the global adapter at its rank, with ``config`` merged in."""
        if self.fraction_train == 0.0:
            return []
        global_adapter = self._current_global(arrays, config)
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, available = sample_nodes(
            grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes)
        )
        log(INFO, "configure_train: Sampled %s nodes (out of %s)", len(node_ids), len(available))
        views: dict[int | None, tuple[ArrayRecord, ConfigRecord]] = {}
        messages = []
        for node_id in node_ids:
            rank = self._rank_for(node_id, server_round)
            if rank not in views:
                view = (
                    global_adapter
                    if rank is None
                    else global_adapter.to_rank(rank, self.alpha_ratio * rank, method=self.send_back)
                )
                views[rank] = adapter_to_records(view)
            view_arrays, view_config = views[rank]
            node_config = ConfigRecord({k: v for k, v in config.items()})
            node_config.update(view_config)
            node_config.pop(NUM_EXAMPLES_KEY, None)
            node_config[SEND_BACK_KEY] = self.send_back
            node_config["server-round"] = server_round
            content = RecordDict({self.arrayrecord_key: view_arrays, self.configrecord_key: node_config})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        return messages

    def _accept(self, msg: Message, record: RoundReplies, previous: LoraAdapter) -> LoraAdapter | None:
        node_id = msg.metadata.src_node_id
        label = f"round {record.server_round}, reply from node {node_id}"
        try:
            content = msg.content
            if len(content.array_records) != 1 or len(content.config_records) < 1:
                raise AdapterError(
                    f"{label}: expected one ArrayRecord and a ConfigRecord with the adapter's `lora-*` fields, got "
                    f"{len(content.array_records)} ArrayRecord(s) and {len(content.config_records)} ConfigRecord(s)."
                )
            arrays = next(iter(content.array_records.values()))
            config = content.config_records.get(self.configrecord_key) or next(
                iter(content.config_records.values())
            )
            adapter = adapter_from_records(arrays, config, label=label)
            check_compatible([previous, adapter], check_base_model=False)
        except AdapterError as exc:
            log(WARNING, "aggregate_train: rejected %s. Leaving it out of this round.", exc)
            record.rejected.append((node_id, str(exc)))
            return None
        count = adapter.num_examples
        for metrics in content.metric_records.values():
            value = metrics.get(self.weighted_by_key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                count = int(value)
        adapter.num_examples = count
        self.client_ranks[node_id] = int(config[RANK_KEY])
        return adapter

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Merge the valid replies' adapters with the configured rule; leave out and log the others."""
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        previous = self.global_adapter
        if previous is None:
            raise RuntimeError("aggregate_train called before configure_train: no global adapter yet.")
        record = RoundReplies(server_round, previous=previous)
        if self.collector is not None:
            record.lost = sorted(self.collector.take_missing().items())
        for node, reason in record.lost:
            log(
                WARNING, "aggregate_train: round %s goes on without node %s (%s).", server_round, node, reason
            )
        accepted: list[tuple[int, LoraAdapter, RecordDict]] = []
        for msg in sorted(valid, key=lambda m: m.metadata.src_node_id):
            adapter = self._accept(msg, record, previous)
            if adapter is not None:
                accepted.append((msg.metadata.src_node_id, adapter, msg.content))
        if len(accepted) < self.min_train_replies:
            log(
                WARNING,
                "aggregate_train: %s usable repl%s in round %s (fewer than min_train_replies=%s). "
                "Keeping the previous global adapter.",
                len(accepted),
                "y" if len(accepted) == 1 else "ies",
                server_round,
                self.min_train_replies,
            )
            self.rounds.append(RoundReplies(server_round, rejected=record.rejected, lost=record.lost))
            return None, None
        record.node_ids = [node for node, _, _ in accepted]
        record.replies = [adapter for _, adapter, _ in accepted]
        record.num_examples = [adapter.num_examples for adapter in record.replies]
        counts = record.num_examples if all(c is not None for c in record.num_examples) else None
        self.global_adapter = aggregate_adapters(
            record.replies,
            strategy=self.aggregation,
            target_rank=self.target_rank,
            previous=previous,
            num_examples=counts,
            check_base_model=False,
        )
        record.global_adapter = self.global_adapter
        self._global_arrays, _ = adapter_to_records(self.global_adapter)
        self.rounds.append(
            record
            if self.keep_replies
            else RoundReplies(server_round, record.node_ids, rejected=record.rejected, lost=record.lost)
        )
        metrics = self._train_metrics([content for _, _, content in accepted], len(record.rejected))
        metrics["clients-lost"] = len(record.lost)
        if counts is not None:
            metrics[self.weighted_by_key] = int(sum(counts))
        if self.on_aggregate is not None:
            self.on_aggregate(server_round, self.global_adapter, metrics)
        return self._global_arrays, metrics

    def _train_metrics(self, contents: list[RecordDict], num_rejected: int) -> MetricRecord:
        metrics = MetricRecord()
        try:
            metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        except Exception as exc:  # noqa: BLE001 - user metrics must not stop the round
            log(WARNING, "aggregate_train: could not aggregate the clients' metrics (%s).", exc)
        metrics["clients-accepted"] = len(contents)
        metrics["clients-rejected"] = num_rejected
        return metrics


__all__ = ["SEND_BACK_KEY", "HeteroLoraStrategy", "RoundReplies"]
