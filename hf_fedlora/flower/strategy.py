"""A Flower strategy for LoRA clients of different ranks.

Flower's stock strategies average arrays element-wise, so they fail as soon as two clients send
LoRA factors of different ranks ("operands could not be broadcast"). :class:`HeteroLoraStrategy`
keeps Flower's sampling, messaging and round loop (it is a ``FedAvg``), and replaces the two steps
that assume equal shapes: ``configure_train`` sends every client the rank-``r_k`` view of the
global adapter (``LoraAdapter.to_rank``), and the replies are merged with any registered rule
(``"replication"`` by default, Byun & Lee, NAACL 2025, https://arxiv.org/abs/2406.17477).

Replies are merged as they arrive: ``start`` collects them with a
:class:`~hf_fedlora.flower.collect.ReplyCollector` that pulls one reply at a time and hands it to
the strategy, which checks it and folds it into a :class:`hf_fedlora.StreamingAggregator`
(:class:`~hf_fedlora.flower.fold.RoundFold`) and lets it go; ``aggregate_train`` then only finishes
the merge. The server holds the running merge plus one reply, however many clients answer, and the
result equals :func:`hf_fedlora.aggregate_adapters` on the accepted replies. ``aggregate_train``
called directly with a list of replies (another driver, tests) folds them in node order.

Rounds survive lost nodes and hostile replies: a round whose nodes do not all answer within
``timeout`` seconds goes on with the replies that came (at least ``min_train_replies`` of them),
logs each missing node with its id, and the next round starts as usual; a reply that cannot be
merged is logged with its node and the field at fault, and left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from ..adapters import LoraAdapter
from ..constants import SendBackMethod, check_send_back
from ..errors import AdapterError
from ..strategies import Strategy, get_strategy
from .collect import ReplyCollector
from .fold import RoundFold, RoundReplies
from .records import NUM_EXAMPLES_KEY, adapter_from_records, adapter_to_records

SEND_BACK_KEY = "lora-send-back"
"""ConfigRecord key telling the client how to re-view the adapter at another rank ("truncate"/"svd")."""

RankAllocation = Mapping[int, int] | Callable[[int, int], "int | None"]


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
    arrays whose declared sizes do not match their bytes, a ``lora-r`` larger than the layers, NaN/Inf,
    an example count that is not a positive integer: see :mod:`hf_fedlora.flower.fold`) are logged
    with the node id and left out; the round goes on with the others. So are
    nodes that do not reply within ``start``'s ``timeout`` (seconds per round) or whose reply is an
    error (a SuperNode that died: the SuperLink answers "node unavailable" once its heartbeats stop).
    With fewer than ``min_train_replies`` usable replies a round keeps the previous global adapter.

    Args:
        aggregation (`str` or `Strategy`, *optional*, defaults to ``"replication"``):
            the rule, a name from ``hf_fedlora.list_strategies()`` or a ``Strategy``.
        target_rank (`int`, *optional*): output rank of the merge (``StreamingAggregator``'s).
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
        self._fold: RoundFold | None = None

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        log(INFO, "\t└──> LoRA: aggregation '%s', send back '%s'", self.aggregation.name, self.send_back)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        *,
        straggler_timeout: float | None = None,
        **kwargs,
    ):
        """Flower's ``Strategy.start``, collecting each round's replies with a :class:`ReplyCollector`
        that hands every train reply to :meth:`on_reply` as it is pulled (folded in, then let go).

        Args:
            timeout: seconds a round waits for its replies; nodes that have not replied by then are
                logged as lost and the round goes on without them.
            straggler_timeout: once ``min_train_replies`` replies have come, seconds the round still
                waits for the others (``None``: until ``timeout``).
            **kwargs: ``train_config``, ``evaluate_config``, ``evaluate_fn`` (see ``FedAvg.start``).
        """
        if isinstance(grid, ReplyCollector):
            self.collector = grid
            if straggler_timeout is not None:
                self.collector.straggler_timeout = straggler_timeout
        else:
            self.collector = ReplyCollector(grid, straggler_timeout=straggler_timeout)
        self.collector.quorum = self.min_train_replies
        self.collector.on_reply = self.on_reply
        return super().start(self.collector, initial_arrays, num_rounds=num_rounds, timeout=timeout, **kwargs)

    def _rank_for(self, node_id: int, server_round: int, largest_view: int) -> int | None:
        allocation = self.rank_allocation
        if isinstance(allocation, Mapping):
            rank = allocation.get(node_id)
        elif allocation is not None:
            rank = allocation(node_id, server_round)
        else:
            rank = None
        if rank is not None:
            return rank
        reported = self.client_ranks.get(node_id)  # the rank of its last reply: at most its layers'
        return None if reported is None else min(reported, largest_view)

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
        largest_view = min(
            min(b[0], math.prod(a[1:])) for a, b in map(global_adapter.factor_shapes, global_adapter.modules)
        )
        for node_id in node_ids:
            rank = self._rank_for(node_id, server_round, largest_view)
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
        self._fold = None
        self._open_round(server_round)  # replies are folded into it as they arrive
        return messages

    def _open_round(self, server_round: int) -> RoundFold:
        """The running merge of ``server_round`` (a new one if the open one is for another round)."""
        fold = self._fold
        if fold is None or fold.record.server_round != server_round:
            previous = self.global_adapter
            if previous is None:
                raise RuntimeError("aggregate_train called before configure_train: no global adapter yet.")
            fold = self._fold = RoundFold(
                server_round,
                previous,
                self.aggregation,
                self.target_rank,
                configrecord_key=self.configrecord_key,
                weighted_by_key=self.weighted_by_key,
                keep_replies=self.keep_replies,
            )
        return fold

    def on_reply(self, msg: Message) -> Message | None:
        """The :class:`ReplyCollector`'s hook: fold a train reply into the round's merge as soon as it
        is pulled, and let it go (returns ``None``); other replies are returned unchanged."""
        fold = self._fold
        if fold is None or msg.has_error() or msg.metadata.message_type != MessageType.TRAIN:
            return msg
        fold.fold(msg)
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Finish the round's merge: fold in the replies still in ``replies`` (all of them when called
        directly, in node order; none when ``start``'s collector folded them as they came), leave
        out and log the others, and return the global adapter's records and the round's metrics."""
        replies = list(replies)
        fold = self._open_round(server_round)
        self._fold = None
        record = fold.record
        errors = [m for m in replies if m.has_error()]
        for msg in sorted((m for m in replies if not m.has_error()), key=lambda m: m.metadata.src_node_id):
            fold.fold(msg)
        log(
            INFO,
            "aggregate_train: %s repl%s accepted, %s rejected, %s failures",
            fold.num_accepted,
            "y" if fold.num_accepted == 1 else "ies",
            len(record.rejected),
            len(errors),
        )
        if self.collector is not None:
            record.lost = sorted(self.collector.take_missing().items())
        for node, reason in record.lost:
            log(
                WARNING, "aggregate_train: round %s goes on without node %s (%s).", server_round, node, reason
            )
        self.client_ranks.update(fold.ranks)
        merged = None
        if fold.num_accepted >= self.min_train_replies:
            try:
                merged = fold.result()
            except AdapterError as exc:  # e.g. a merge that overflows: keep the previous adapter
                log(WARNING, "aggregate_train: round %s could not be merged (%s).", server_round, exc)
        if merged is None:
            log(
                WARNING,
                "aggregate_train: %s usable repl%s in round %s (min_train_replies=%s). "
                "Keeping the previous global adapter.",
                fold.num_accepted,
                "y" if fold.num_accepted == 1 else "ies",
                server_round,
                self.min_train_replies,
            )
            self.rounds.append(RoundReplies(server_round, rejected=record.rejected, lost=record.lost))
            return None, None
        self.global_adapter = record.global_adapter = merged
        self._global_arrays, _ = adapter_to_records(merged)
        self.rounds.append(
            record
            if self.keep_replies
            else RoundReplies(
                server_round,
                record.node_ids,
                num_examples=record.num_examples,
                rejected=record.rejected,
                lost=record.lost,
            )
        )
        metrics = self._train_metrics(fold.metrics, len(record.rejected))
        metrics["clients-lost"] = len(record.lost)
        metrics[self.weighted_by_key] = int(sum(record.num_examples))
        if self.on_aggregate is not None:
            self.on_aggregate(server_round, merged, metrics)
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
