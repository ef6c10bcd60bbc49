"""Collect a round's replies as they arrive, and go on without the nodes that do not answer.

Flower's ``Grid.send_and_receive`` waits until every node replied or the timeout passed. A SuperNode
that dies in the middle of a round never replies: the SuperLink notices only when its heartbeats
stop (about a minute), then answers for it with a "node unavailable" error. :class:`ReplyCollector`
wraps the ``ServerApp``'s grid so that a round

- pulls replies as they come (``Grid.push_messages`` / ``Grid.pull_messages``) and, with an
  ``on_reply`` hook, hands each to it as soon as it is pulled, one at a time: a hook that consumes
  the reply (returns ``None``) means the server never holds more than one reply,
- stops at ``timeout`` seconds and goes on with the replies it has, logging every node without a
  reply (with its id and why) and keeping them in :attr:`ReplyCollector.missing`,
- does not wait long for a node that already missed a deadline: once every other node has
  replied, such a node gets as long again as the round has lasted, then the round goes on.
  A reply from it clears it,
- with a ``straggler_timeout``, waits at most that long for the rest once ``quorum`` replies have
  come: a round then lasts as long as its healthy nodes need plus at most ``straggler_timeout``,
  whatever ``timeout`` is (a generous ``timeout`` costs nothing when a node dies).

:class:`~hf_fedlora.flower.HeteroLoraStrategy` wraps its grid in one in ``start``, so its
``timeout`` argument is the round's reply timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from logging import WARNING

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore import log

POLL_INTERVAL_S = 1.0
"""How often pending replies are pulled (Flower's own loop sleeps 3 s)."""


class ReplyCollector(Grid):
    """A ``Grid`` whose ``send_and_receive`` pulls replies as they come and gives up on missing nodes.

    Every other method is the wrapped grid's.

    Args:
        grid: the ``ServerApp``'s grid.
        poll_interval: seconds between two pulls of the pending replies.
        on_reply: ``f(reply) -> reply | None``, called with every reply as it is pulled (error replies
            included); what it returns is what ``send_and_receive`` returns for it (``None``: nothing,
            the hook consumed it). :class:`~hf_fedlora.flower.HeteroLoraStrategy` sets it to fold
            train replies into the round's merge.
        pull_batch: at most this many replies are pulled (and held) at once; default 1 with a hook
            (one request to the SuperLink per pending reply and poll), else every pending reply.
        straggler_timeout: seconds the round still waits once ``quorum`` (non-error) replies came;
            ``None``: until ``timeout``.
        quorum: replies after which ``straggler_timeout`` starts counting (at least 1).

    Attributes:
        missing: ``{node_id: reason}`` of the nodes whose reply did not come (or came as an error) in
            the last ``send_and_receive`` that sent messages; read it with :meth:`take_missing`.
        suspects: nodes that missed a deadline and have not replied since.
    """

    def __init__(
        self,
        grid: Grid,
        *,
        poll_interval: float = POLL_INTERVAL_S,
        on_reply: Callable[[Message], Message | None] | None = None,
        pull_batch: int | None = None,
        straggler_timeout: float | None = None,
        quorum: int = 1,
    ) -> None:
        if straggler_timeout is not None and not straggler_timeout >= 0:
            raise ValueError(f"`straggler_timeout` must be a non-negative number, got {straggler_timeout!r}.")
        self.grid = grid
        self.straggler_timeout = straggler_timeout
        self.quorum = max(int(quorum), 1)
        self.poll_interval = poll_interval
        self.on_reply = on_reply
        self.pull_batch = pull_batch
        self.missing: dict[int, str] = {}
        self.suspects: set[int] = set()

    # -- the wrapped grid ------------------------------------------------------------------------
    def set_run(self, run):
        return self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def __getattr__(self, name: str):
        grid = self.__dict__.get("grid")
        if grid is None:
            raise AttributeError(name)
        return getattr(grid, name)

    # -- collecting ------------------------------------------------------------------------------
    def take_missing(self) -> dict[int, str]:
        """The nodes without a reply in the last round that sent messages (then forgets them)."""
        missing, self.missing = self.missing, {}
        return missing

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages``, then pull their replies until all came or ``timeout`` seconds passed.

        Returns:
            The replies that came, error replies included (e.g. the SuperLink's "node unavailable"
            for a node that stopped sending heartbeats), or what ``on_reply`` returned for them.
            Nodes without a usable reply are logged and recorded in :attr:`missing`.
        """
        messages = list(messages)
        if not messages:
            return []
        self.missing = {}
        start = time.monotonic()
        deadline = start + timeout if timeout is not None else float("inf")
        ids = list(self.grid.push_messages(messages))
        pending: dict[str, int] = {}
        for message_id, msg in zip(ids, messages):
            node = int(msg.metadata.dst_node_id)
            if message_id:
                pending[message_id] = node
            else:
                self._lose(node, "the message to it could not be pushed to the SuperLink")
        replies: list[Message] = []
        healthy_done: float | None = None
        answered, quorum_at = 0, None
        while pending:
            for reply in self._pull(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                if reply.has_error():
                    self._lose(node, f"error reply: {reply.error.reason}")
                else:
                    self.suspects.discard(node)
                    answered += 1
                kept = reply if self.on_reply is None else self.on_reply(reply)
                del reply  # with a hook that consumed it, the reply is freed before the next pull
                if kept is not None:
                    replies.append(kept)
            now = time.monotonic()
            if not pending or now >= deadline:
                break
            if self.straggler_timeout is not None and answered >= min(self.quorum, len(messages)):
                quorum_at = quorum_at or now
                if now - quorum_at >= self.straggler_timeout:
                    break
            if set(pending.values()) <= self.suspects:
                healthy_done = healthy_done or now
                if now - healthy_done >= max(healthy_done - start, self.poll_interval):
                    break
            time.sleep(min(self.poll_interval, max(deadline - now, 0.0)))
        now = time.monotonic()
        waited = now - start
        for node in pending.values():
            if node in self.suspects:
                why = f"no reply after {waited:.0f} s; it missed the previous deadline too"
            elif quorum_at is not None and now < deadline:
                why = (
                    f"no reply within the {self.straggler_timeout:g} s straggler timeout after {answered} of "
                    f"{len(messages)} replies came ({waited:.0f} s into the round)"
                )
            else:
                why = f"no reply within the {waited:.0f} s timeout"
            self._lose(node, why)
            self.suspects.add(node)
        return replies

    def _pull(self, message_ids: list[str]) -> Iterator[Message]:
        """The replies to ``message_ids`` that came, pulled ``pull_batch`` ids at a time."""
        size = self.pull_batch or (1 if self.on_reply is not None else max(len(message_ids), 1))
        for start in range(0, len(message_ids), size):
            yield from self.grid.pull_messages(message_ids[start : start + size])

    def _lose(self, node: int, reason: str) -> None:
        self.missing[node] = reason
        log(WARNING, "node %s lost for this round (%s); the round goes on without it.", node, reason)


__all__ = ["POLL_INTERVAL_S", "ReplyCollector"]
