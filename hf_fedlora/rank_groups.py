"""Clients' factors read as stacks of one rank, ahead of the merge, in chunks of bounded size.

A rule of running sums adds n clients of one rank with one weighted sum per factor
(``Strategy.fold_in_many``) instead of n small adds: far fewer passes over memory and calls. A
helper thread reads each chunk's factors straight into one reused stack per factor (and feeds the
provenance hash) while the merging thread converts the chunk before to float32, in one buffer it
reuses, and adds it. Chunks live in :data:`BUFFER_SETS` reused sets of buffers, so memory is bounded
and page-faulted once, whatever the number of clients.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .adapters import LoraAdapter

Factors = tuple[torch.Tensor, torch.Tensor]
CHUNK_ELEMENTS = 1 << 22
"""At most this many values per chunk (16 MiB in float32), unless one client alone has more."""
BUFFER_SETS = 4
"""Chunks in memory at once: being read, waiting (two), being merged."""
MIN_CHUNK_BYTES = 2 << 20
"""Merge in chunks when a module's clients of one rank average at least this many bytes
(:func:`chunks_pay`; measured in ``benchmarks/bench_aggregation.py``: at 10 clients of ranks 8-64,
about 1 MiB, adding them one by one is faster)."""


@dataclass
class RankChunk:
    """Clients ``clients`` (indices) of one rank for ``module``: their stored factors as stacks
    ``[n, r, in]`` and ``[n, out, r]`` in their storage dtype (float32 when they differ), in the
    reused ``buffers`` (hand them back with :meth:`ReadAhead.release`). No clients: the module ends."""

    module: str
    clients: list[int]
    stacks: Factors | None = None
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def float32(self, buffers: dict[str, torch.Tensor]) -> Factors:
        """The stacks in float32: as read when stored so, else converted into ``buffers``."""
        a, b = self.stacks
        if a.dtype == torch.float32:
            return a, b
        return (
            _buffer(buffers, "a", torch.float32, tuple(a.shape)).copy_(a),
            _buffer(buffers, "b", torch.float32, tuple(b.shape)).copy_(b),
        )


def _buffer(
    buffers: dict[str, torch.Tensor], which: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """A ``dtype`` tensor of ``shape`` in the reused byte buffer ``which`` (grown as needed)."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    buffer = buffers.get(which)
    if buffer is None or buffer.numel() < nbytes:
        buffer = buffers[which] = torch.empty(nbytes, dtype=torch.uint8)
    return buffer[:nbytes].view(dtype).view(shape)


def read_stacks(
    adapters: Sequence[LoraAdapter], module: str, clients: Sequence[int], buffers: dict[str, torch.Tensor]
) -> Factors:
    """The stored factors of ``clients`` (one rank) read into stacks in ``buffers``: in their storage
    dtype when every client shares it (one read per tensor, no copy), else converted to float32."""
    first = adapters[clients[0]]
    a_shape, b_shape = first.factor_shapes(module)
    rank, n = a_shape[0], len(clients)
    a_row, b_row = (rank, torch.Size(a_shape[1:]).numel()), (b_shape[0], rank)
    keys = [adapters[k].layout.factor_keys(module) for k in clients]
    dtypes = {adapters[k].tensor_dtype(key) for k, pair in zip(clients, keys) for key in pair}
    if len(dtypes) == 1 and None not in dtypes:
        (dtype,) = dtypes
        a = _buffer(buffers, "a", dtype, (n, *a_row))
        b = _buffer(buffers, "b", dtype, (n, *b_row))
        a_bytes, b_bytes = a.view(n, -1).view(torch.uint8), b.view(n, -1).view(torch.uint8)
        for i, k in enumerate(clients):
            adapters[k].lora_factors(module, check_finite_values=False, out=(a_bytes[i], b_bytes[i]))
        return a, b
    a = _buffer(buffers, "a32", torch.float32, (n, *a_row))
    b = _buffer(buffers, "b32", torch.float32, (n, *b_row))
    for i, k in enumerate(clients):
        a_raw, b_raw = adapters[k].lora_factors(module, check_finite_values=False)
        a[i].copy_(a_raw.reshape(a_row))
        b[i].copy_(b_raw.reshape(b_row))
    return a, b


def rank_chunks(adapters: Sequence[LoraAdapter], modules: Sequence[str], take_buffers) -> Iterator[RankChunk]:
    """Every module's clients in chunks of one rank, the largest ranks first (running sums then never
    grow), each module's chunks followed by ``RankChunk(module, [])``; files are read module by module,
    so each file front to back. ``take_buffers()`` gives each chunk its set of buffers."""
    for module in modules:
        by_rank: dict[int, list[int]] = {}
        for k, adapter in enumerate(adapters):
            by_rank.setdefault(adapter.factor_shapes(module)[0][0], []).append(k)
        for rank in sorted(by_rank, reverse=True):
            clients = by_rank[rank]
            a_shape, b_shape = adapters[clients[0]].factor_shapes(module)
            per_client = max(1, torch.Size(a_shape).numel() + torch.Size(b_shape).numel())
            step = max(1, CHUNK_ELEMENTS // per_client)
            for start in range(0, len(clients), step):
                part = clients[start : start + step]
                buffers = take_buffers()
                yield RankChunk(module, part, read_stacks(adapters, module, part, buffers), buffers)
        yield RankChunk(module, [])


class ReadAhead:
    """The chunks of :func:`rank_chunks`, produced on a helper thread into :data:`BUFFER_SETS`
    reused sets of buffers. The helper's exception is raised where its chunk would have come. Leave
    the ``with`` block to stop the helper (before the files it reads are closed)."""

    _END = object()

    def __init__(self, adapters: Sequence[LoraAdapter], modules: Sequence[str]):
        self._free: queue.Queue = queue.Queue()
        for _ in range(BUFFER_SETS):
            self._free.put({})
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._chunks = rank_chunks(adapters, modules, self._take)
        self._thread = threading.Thread(target=self._run, name="hf-fedlora-read", daemon=True)
        self._thread.start()

    def _take(self) -> dict[str, torch.Tensor]:
        while not self._stop.is_set():  # checked first: no read after the merge has stopped
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        raise _Stopped

    def _run(self) -> None:
        try:
            for chunk in self._chunks:
                self._ready.put(chunk)
            self._ready.put(self._END)
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the merging thread
            self._ready.put(exc)

    def __iter__(self) -> Iterator[RankChunk]:
        while (item := self._ready.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, chunk: RankChunk) -> None:
        """Hand a merged chunk's buffers back for a later chunk."""
        if chunk.clients:
            chunk.stacks = None
            self._free.put(chunk.buffers)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _Stopped(Exception):
    """The merge ended before the helper thread read everything."""


def chunks_pay(adapters: Sequence[LoraAdapter], modules: Sequence[str]) -> bool:
    """Whether a module's clients of one rank hold, on average, at least :data:`MIN_CHUNK_BYTES`:
    below, the calls and GIL hand-overs per chunk cost more than adding the clients one by one."""
    groups = sum(len({a.factor_shapes(m)[0][0] for a in adapters}) for m in modules)
    return sum(a.num_bytes() for a in adapters) >= MIN_CHUNK_BYTES * max(1, groups)
