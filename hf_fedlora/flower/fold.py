"""One round of :class:`~hf_fedlora.flower.HeteroLoraStrategy`: each reply checked and folded into a
:class:`hf_fedlora.StreamingAggregator` as it arrives, then let go.

A reply is accepted only if everything a client controls checks out before anything is allocated
from it: its example count (a positive integer, in a ``MetricRecord`` under the strategy's
``weighted_by_key`` or in its ``lora-num-examples`` field), its ``lora-r`` and array shapes against
the layers of the round's global adapter, each array's declared size against its bytes, then the
checks of ``StreamingAggregator.add`` (finite, compatible with the global adapter). A refused reply
becomes an ``AdapterError`` naming the round, the node and the field, is logged and recorded in
:attr:`RoundReplies.rejected`, and leaves the running state unchanged: the round goes on without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore import log

from ..adapters import LoraAdapter
from ..errors import AdapterError, AdapterFormatError
from ..strategies import Strategy
from ..streaming import StreamingAggregator
from .records import NUM_EXAMPLES_KEY, adapter_from_records

MAX_EXAMPLES = 2**53
"""The largest example count a reply may report (the largest integer a float64 holds exactly)."""


@dataclass
class RoundReplies:
    """What one round of :class:`HeteroLoraStrategy` received and produced (in :attr:`HeteroLoraStrategy.rounds`;
    the adapters only with ``keep_replies``). The round's ``metrics.jsonl`` line is a
    :class:`hf_fedlora.federation.RoundRecord`, written by a :class:`RoundWriter`.

    Attributes:
        server_round: the round, from 1.
        node_ids: the nodes whose replies were aggregated, in aggregation (arrival) order.
        replies: their adapters, in the same order (only with ``keep_replies``).
        num_examples: their example counts.
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


def records_of(content: RecordDict, kind: type) -> dict:
    """``content``'s records of one kind, by name. (Not ``content.array_records`` and its siblings:
    those views hold a reference cycle back to the message, which then outlives its last use until
    Python's cyclic garbage collector runs; a server folding replies as they come must let each go.)"""
    return {name: record for name, record in content.items() if isinstance(record, kind)}


def example_count(content: RecordDict, config, weighted_by_key: str, label: str) -> int:
    """A reply's example count: the last ``MetricRecord``'s ``weighted_by_key``, else the adapter's
    ``lora-num-examples``; a positive integer (an integral float is accepted) up to ``MAX_EXAMPLES``.

    Raises:
        AdapterFormatError: naming ``label`` and the field: no count, or one that is not a positive
            integer (NaN, inf, 0, negative, fractional, a bool, a list, a string).
    """
    value, where = None, None
    if NUM_EXAMPLES_KEY in config:
        value, where = config[NUM_EXAMPLES_KEY], f"ConfigRecord field `{NUM_EXAMPLES_KEY}`"
    for name, metrics in records_of(content, MetricRecord).items():
        if weighted_by_key in metrics:
            value, where = metrics[weighted_by_key], f"MetricRecord '{name}' field `{weighted_by_key}`"
    if where is None:
        raise AdapterFormatError(
            f"{label}: no example count (`{weighted_by_key}` in a MetricRecord, or `{NUM_EXAMPLES_KEY}` in "
            "its ConfigRecord); replies are weighted by their examples. Build replies with "
            "`hf_fedlora.flower.train_reply`."
        )
    number = value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_EXAMPLES:
        big = isinstance(value, int) and value.bit_length() > 256  # repr() refuses > 4,300 digits
        shown = f"an integer of {value.bit_length()} bits" if big else f"{value!r:.40}"
        why = "; a client that trained on no examples adds nothing" if number == 0 else ""
        raise AdapterFormatError(
            f"{label}: {where} is {shown}; an example count must be a positive integer (at most "
            f"{MAX_EXAMPLES:,}){why}. Left out of this round."
        )
    return number


class RoundFold:
    """The running merge of one round: ``fold`` each reply as it comes, ``result`` once.

    Args:
        server_round: the round.
        previous: the global adapter the round's clients trained from (the compatibility and shape
            reference; the ``previous`` of rules that use it).
        aggregation, target_rank: the rule and its output rank.
        configrecord_key, weighted_by_key: the strategy's record keys.
        keep_replies: keep the accepted adapters in :attr:`record` (tests and audits).
    """

    def __init__(
        self,
        server_round: int,
        previous: LoraAdapter,
        aggregation: Strategy,
        target_rank: int | None,
        *,
        configrecord_key: str = "config",
        weighted_by_key: str = "num-examples",
        keep_replies: bool = False,
    ) -> None:
        self.record = RoundReplies(server_round, previous=previous)
        self.aggregation, self.target_rank = aggregation, target_rank
        self.configrecord_key, self.weighted_by_key = configrecord_key, weighted_by_key
        self.keep_replies = keep_replies
        self.metrics: list[RecordDict] = []  # each accepted reply's MetricRecords, for Flower's aggregation
        self.ranks: dict[int, int] = {}  # node -> the rank of the adapter it sent
        self._seen: set[int] = set()
        self._aggregator: StreamingAggregator | None = None

    @property
    def num_accepted(self) -> int:
        return len(self.record.node_ids)

    def _records(self, content: RecordDict, label: str):
        array_records, config_records = records_of(content, ArrayRecord), records_of(content, ConfigRecord)
        if len(array_records) != 1 or len(config_records) < 1:
            raise AdapterFormatError(
                f"{label}: expected one ArrayRecord and a ConfigRecord with the adapter's `lora-*` fields, got "
                f"{len(array_records)} ArrayRecord(s) and {len(config_records)} ConfigRecord(s)."
            )
        arrays = next(iter(array_records.values()))
        config = config_records.get(self.configrecord_key) or next(iter(config_records.values()))
        return arrays, config

    def fold(self, msg: Message) -> bool:
        """Check one reply and fold it in; log and record it as rejected if it cannot be merged.

        Returns:
            Whether the reply was accepted.
        """
        node_id = msg.metadata.src_node_id
        label = f"round {self.record.server_round}, reply from node {node_id}"
        try:
            if node_id in self._seen:
                raise AdapterFormatError(f"{label}: a second reply from this node in the round.")
            self._seen.add(node_id)
            content = msg.content
            arrays, config = self._records(content, label)
            count = example_count(content, config, self.weighted_by_key, label)
            previous = self.record.previous
            adapter = adapter_from_records(arrays, config, label=label, reference=previous)
            if self._aggregator is None:
                self._aggregator = StreamingAggregator(
                    self.aggregation, target_rank=self.target_rank, previous=previous, check_base_model=False
                )
            self._aggregator.add(adapter, num_examples=count)
        except AdapterError as exc:
            log(WARNING, "aggregate_train: rejected %s. Leaving it out of this round.", exc)
            self.record.rejected.append((node_id, str(exc)))
            return False
        self.record.node_ids.append(node_id)
        self.record.num_examples.append(count)
        if self.keep_replies:
            self.record.replies.append(adapter)
        self.metrics.append(RecordDict(records_of(content, MetricRecord)))
        self.ranks[node_id] = adapter.max_rank
        return True

    def result(self) -> LoraAdapter:
        """The round's global adapter (``StreamingAggregator.result``); call once, with a reply accepted."""
        if self._aggregator is None:
            raise AdapterError("no reply was accepted in this round.")
        return self._aggregator.result()


__all__ = ["MAX_EXAMPLES", "RoundFold", "RoundReplies", "example_count", "records_of"]
