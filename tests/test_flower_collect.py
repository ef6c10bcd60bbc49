"""ReplyCollector with a scripted grid: replies as they come, a timeout, lost nodes, error replies."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")

import hf_fedlora.flower.collect as collect_module  # noqa: E402
from hf_fedlora.flower import HeteroLoraStrategy, ReplyCollector  # noqa: E402


class _ScriptedGrid:
    """Node ``n`` answers ``delays[n]`` seconds after the push: a float, ``None`` (never) or ``"error"``."""

    def __init__(self, delays: dict[int, float | str | None]) -> None:
        self.delays = delays
        self.pushed_at = 0.0
        self.pulls = 0

    def get_node_ids(self):
        return list(self.delays)

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [f"m{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, message_ids):
        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        out = []
        for message_id in message_ids:
            delay = self.delays[int(message_id[1:])]
            if delay == "error":  # the SuperLink answers for a dead node; src is the SuperLink (0)
                error = SimpleNamespace(reason="Error: Node Unavailable")
                out.append(_reply(message_id, error))
            elif delay is not None and now >= delay:
                out.append(_reply(message_id, None))
        return out


def _reply(message_id: str, error) -> SimpleNamespace:
    return SimpleNamespace(
        metadata=SimpleNamespace(reply_to_message_id=message_id, src_node_id=0 if error else 1),
        error=error,
        has_error=lambda: error is not None,
    )


def _messages(nodes) -> list[SimpleNamespace]:
    return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in nodes]


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(collect_module, "log", lambda level, msg, *args: lines.append(msg % args))
    return lines


def _collect(collector: ReplyCollector, nodes, timeout: float) -> tuple[list, float]:
    start = time.monotonic()
    replies = collector.send_and_receive(_messages(nodes), timeout=timeout)
    return replies, time.monotonic() - start


def test_all_replies_return_as_soon_as_they_came(logged) -> None:
    collector = ReplyCollector(_ScriptedGrid({1: 0.0, 2: 0.05, 3: 0.1}), poll_interval=0.02)
    replies, took = _collect(collector, [1, 2, 3], timeout=30)
    assert len(replies) == 3 and took < 5 and collector.take_missing() == {} and not logged


def test_a_silent_node_is_lost_at_the_timeout_and_logged_with_its_id(logged) -> None:
    collector = ReplyCollector(_ScriptedGrid({1: 0.0, 2: None, 3: 0.05}), poll_interval=0.02)
    replies, took = _collect(collector, [1, 2, 3], timeout=0.6)
    assert 0.5 < took < 5
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m1", "m3"]
    missing = collector.take_missing()
    assert list(missing) == [2] and "timeout" in missing[2]
    assert collector.suspects == {2}
    assert any("node 2 lost" in line for line in logged), logged
    assert collector.take_missing() == {}  # taken once


def test_a_node_that_missed_a_deadline_does_not_hold_up_the_next_round(logged) -> None:
    grid = _ScriptedGrid({1: 0.0, 2: None, 3: 0.0})
    collector = ReplyCollector(grid, poll_interval=0.02)
    _collect(collector, [1, 2, 3], timeout=0.4)
    collector.take_missing()
    replies, took = _collect(collector, [1, 2, 3], timeout=30)  # node 2 is still silent
    assert len(replies) == 2 and took < 5
    assert "missed the previous deadline" in collector.take_missing()[2]


def test_a_suspect_that_answers_in_time_is_cleared() -> None:
    grid = _ScriptedGrid({1: 0.0, 2: None})
    collector = ReplyCollector(grid, poll_interval=0.02)
    _collect(collector, [1, 2], timeout=0.3)
    grid.delays = {1: 0.2, 2: 0.25}  # node 2 is back, slightly slower than node 1
    replies, _ = _collect(collector, [1, 2], timeout=30)
    assert len(replies) == 2 and collector.suspects == set() and collector.take_missing() == {}


def test_an_error_reply_is_recorded_under_the_node_it_was_sent_to(logged) -> None:
    collector = ReplyCollector(_ScriptedGrid({7: 0.0, 8: "error"}), poll_interval=0.02)
    replies, _ = _collect(collector, [7, 8], timeout=30)
    assert len(replies) == 2  # the error reply is returned too: FedAvg counts it as a failure
    missing = collector.take_missing()
    assert list(missing) == [8] and "Node Unavailable" in missing[8]


def test_no_messages_no_wait() -> None:
    grid = _ScriptedGrid({})
    assert ReplyCollector(grid).send_and_receive([], timeout=30) == [] and grid.pulls == 0


def test_strategy_records_lost_nodes_and_min_train_replies(monkeypatch) -> None:
    import hf_fedlora.flower.strategy as strategy_module

    monkeypatch.setattr(strategy_module, "log", lambda *args: None)
    strategy = HeteroLoraStrategy(min_train_replies=2)
    strategy.global_adapter = object()  # aggregate_train reads it before any reply
    strategy.collector = ReplyCollector(_ScriptedGrid({}))
    strategy.collector.missing = {5: "no reply within the 30 s timeout"}
    assert strategy.aggregate_train(3, []) == (None, None)
    (record,) = strategy.rounds
    assert record.server_round == 3 and record.global_adapter is None
    assert record.lost == [(5, "no reply within the 30 s timeout")]
    with pytest.raises(ValueError, match="min_train_replies"):
        HeteroLoraStrategy(min_train_replies=0)


def test_a_straggler_timeout_ends_the_round_soon_after_the_quorum(logged) -> None:
    grid = _ScriptedGrid({1: 0.0, 2: None, 3: 0.05})
    collector = ReplyCollector(grid, poll_interval=0.02, straggler_timeout=0.2, quorum=2)
    replies, took = _collect(collector, [1, 2, 3], timeout=30)
    assert len(replies) == 2 and 0.2 <= took < 5
    missing = collector.take_missing()
    assert list(missing) == [2] and "0.2 s straggler timeout after 2 of 3 replies" in missing[2]
    # below the quorum the round waits for `timeout`, as without a straggler timeout
    collector = ReplyCollector(
        _ScriptedGrid({1: 0.0, 2: None, 3: None}), poll_interval=0.02, straggler_timeout=0.1, quorum=2
    )
    replies, took = _collect(collector, [1, 2, 3], timeout=0.6)
    assert len(replies) == 1 and took >= 0.55
    missing = collector.take_missing()
    assert sorted(missing) == [2, 3] and all("within the 1 s timeout" in why for why in missing.values()), (
        missing
    )
    with pytest.raises(ValueError, match="straggler_timeout"):
        ReplyCollector(grid, straggler_timeout=-1)
