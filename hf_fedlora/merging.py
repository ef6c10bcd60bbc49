"""The module loop of ``aggregate_adapters``: read, fold, merge and check one module at a time.

Files are read in order, so each client's provenance sha256 is computed from the same bytes as its
tensors (``LoraAdapter.hash_reads``) instead of a second pass over every file. A rule with its own
``Strategy.fold_in_many`` (running sums: the padding rules, fedavg) whose inputs need no check one
by one gets a module's clients in chunks of one rank when those hold 2 MiB or more on average
(:mod:`hf_fedlora.rank_groups`): converted into one reused float32 buffer and added with
``sqrt(s)`` in the weights; peak memory: the output and a few chunks. Otherwise a module's clients
are read one module ahead on a helper thread (reads and hashing release the GIL) and folded in one
by one (``fold_in_scaled`` into a reused buffer, or ``fold_in`` after a check when a target rank
cuts clients) or handed over at once (``aggregate_module``); peak memory: the output, two modules'
stored inputs and one module's folded inputs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from .adapters import LoraAdapter
from .adapters.keys import bias_key, magnitude_key
from .adapters.validate import check_finite, non_finite_count
from .errors import AdapterError, NonFiniteTensorError
from .rank_groups import ReadAhead, chunks_pay
from .strategies import ModuleInputs, Strategy

Factors = tuple[torch.Tensor, torch.Tensor]
MAX_HELD_FILES = 256
"""Up to this many clients, each client's file stays open for the whole merge (one open, not one
per tensor); beyond, each read opens its file, so thousands of clients never exhaust descriptors."""


def _name_non_finite_input(adapters: Sequence[LoraAdapter], module: str) -> None:
    """Raise ``NonFiniteTensorError`` for the first client whose factors of ``module`` hold NaN/Inf
    (stored, or after folding the scale in); return if every one is finite."""
    for adapter in adapters:
        adapter.folded_factors(module)


class Scratch:
    """One float32 buffer per factor, reused for every client's factors of every module."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def float32(self, which: str, raw: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """``raw`` converted into the buffer: a float32 ``shape`` matrix the caller may modify."""
        numel = shape[0] * shape[1]
        buffer = self._buffers.get(which)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[which] = torch.empty(numel, dtype=torch.float32)
        return buffer[:numel].view(shape).copy_(raw.reshape(shape))

    def fold(self, which: str, raw: torch.Tensor, shape: tuple[int, int], root: float) -> torch.Tensor:
        # as adapters.scaling.fold: the same float32 product
        return self.float32(which, raw, shape).mul_(root)


def _read(adapters: Sequence[LoraAdapter], module: str, check: bool) -> list[Factors]:
    return [a.lora_factors(module, check_finite_values=check) for a in adapters]


def _fold_checked(adapter: LoraAdapter, module: str, raw: Factors, fold, check: bool) -> Factors:
    a_raw, b_raw = raw
    scale = adapter.scale(module)
    root = math.sqrt(scale)
    a = fold("a", a_raw, (a_raw.shape[0], math.prod(a_raw.shape[1:])), root)
    b = fold("b", b_raw, (b_raw.shape[0], b_raw.shape[1]), root)
    if check:  # finite factors times a large scale may still overflow float32
        where = f"{adapter.where} (after folding the scale {scale:.3g})"
        for key, tensor in zip(adapter.layout.factor_keys(module), (a, b)):
            check_finite(tensor, where, key)
    return a, b


def _is_incremental(strategy: Strategy) -> bool:
    """Whether the module loop folds clients in one by one (a rule of running sums) rather than
    handing ``aggregate_module`` every client's factors at once."""
    return not strategy.retains_inputs and type(strategy).aggregate_module is Strategy.aggregate_module


def _adds_many(strategy: Strategy) -> bool:
    """Whether the rule keeps running sums and adds clients of one rank at once with one weighted
    sum (its own ``Strategy.fold_in_many``), e.g. the padding rules and fedavg."""
    return _is_incremental(strategy) and type(strategy).fold_in_many is not Strategy.fold_in_many


def _fresh_fold(which: str, raw: torch.Tensor, shape: tuple[int, int], root: float) -> torch.Tensor:
    return raw.reshape(shape).to(torch.float32, copy=True).mul_(root)


def _merge_module(
    adapters: Sequence[LoraAdapter],
    module: str,
    raw: list[Factors],
    strategy: Strategy,
    p: torch.Tensor,
    target_rank: int | None,
    previous: Factors | None,
    check: bool,
    scratch: Scratch,
) -> Factors:
    if not _is_incremental(strategy):
        folded = [_fold_checked(a, module, r, _fresh_fold, check) for a, r in zip(adapters, raw)]
        inputs = ModuleInputs(
            name=module,
            a=[f[0] for f in folded],
            b=[f[1] for f in folded],
            weights=p,
            target_rank=target_rank,
            previous=previous,
        )
        try:
            return strategy.aggregate_module(inputs)
        except RuntimeError:  # e.g. an SVD that does not converge on non-finite input
            if not check:
                _name_non_finite_input(adapters, module)
            raise
    state = strategy.start(module, target_rank)
    # the largest ranks first, so that running sums never grow (a copy per growth)
    order = sorted(range(len(adapters)), key=lambda k: -raw[k][0].shape[0])
    weights = p.tolist()
    for adapter, factors, weight in ((adapters[k], raw[k], weights[k]) for k in order):
        try:
            if check:
                a, b = _fold_checked(adapter, module, factors, scratch.fold, check)
                strategy.fold_in(state, a, b, weight)
            else:  # the scale is folded into the rule's add (an overflow shows in the merged module)
                a_raw, b_raw = factors
                a = scratch.float32("a", a_raw, (a_raw.shape[0], math.prod(a_raw.shape[1:])))
                b = scratch.float32("b", b_raw, (b_raw.shape[0], b_raw.shape[1]))
                strategy.fold_in_scaled(state, a, b, weight, math.sqrt(adapter.scale(module)))
        except (AdapterError, RuntimeError) as exc:
            if not check:
                _name_non_finite_input([adapter], module)
            if isinstance(exc, AdapterError):
                raise type(exc)(f"{adapter.where}: {exc}") from exc
            raise
    return strategy.finish(state, 1.0, previous)


def cast_checked(tensor: torch.Tensor, dtype: torch.dtype, module: str, key: str) -> torch.Tensor:
    """``tensor`` in the output dtype, refused (``NonFiniteTensorError`` naming the module) when a
    value is NaN/Inf: a merged value past float16's range is an error, never an Inf in the output."""
    out = tensor.to(dtype).contiguous()
    if bad := non_finite_count(out):
        raise NonFiniteTensorError(
            f"merged module `{module}`: tensor `{key}` holds {bad} NaN/Inf value(s) in the output dtype "
            f"{str(dtype).replace('torch.', '')}"
            + (
                " (the float32 result is finite: it overflows this dtype; pass `dtype=torch.float32`)."
                if torch.isfinite(tensor).all()
                else " (the clients' weighted sum overflows float32)."
            )
        )
    return out


def store_module(
    state: dict[str, torch.Tensor],
    layout: LoraAdapter,
    module: str,
    factors: Factors,
    out_dtype: torch.dtype,
) -> int:
    """Put a merged module's folded ``(A, B)`` into ``state`` under PEFT's keys, in the layer's
    own shape (convolutions keep their kernel dimensions) and ``out_dtype`` (checked); its rank."""
    a, b = factors
    a_shape, b_shape = layout.factor_shapes(module)
    a_key, b_key = layout.layout.factor_keys(module)
    state[a_key] = cast_checked(a.reshape(a.shape[0], *a_shape[1:]), out_dtype, module, a_key)
    state[b_key] = cast_checked(b.reshape(b.shape[0], a.shape[0], *b_shape[2:]), out_dtype, module, b_key)
    return a.shape[0]


def dense_terms(
    adapters: Sequence[LoraAdapter], module: str, p: torch.Tensor, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """A module's LoRA bias and DoRA magnitude in the merged adapter: ``sum_k p_k s_k bias_k`` (the
    bias update, stored at scale 1) and ``sum_k p_k m_k``, whatever the rule."""
    terms = {}
    if module in adapters[0].layout.biases:
        bias = sum(w * a.delta_bias(module) for w, a in zip(p, adapters))
        terms[bias_key(module)] = cast_checked(bias, dtype, module, bias_key(module))
    if module in adapters[0].layout.magnitudes:
        magnitude = sum(w * a.magnitude(module).float() for w, a in zip(p, adapters))
        terms[magnitude_key(module)] = cast_checked(magnitude, dtype, module, magnitude_key(module))
    return terms


def merge_modules(
    adapters: Sequence[LoraAdapter],
    strategy: Strategy,
    p: torch.Tensor,
    *,
    target_rank: int | None,
    prior: LoraAdapter | None,
    out_dtype: torch.dtype,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every LoRA module of ``adapters`` (checked compatible) merged by ``strategy`` with the
    normalised weights ``p``: the output tensors keyed as PEFT saves them, and each module's rank.

    A rule with its own ``Strategy.fold_in_many`` whose inputs need no check one by one gets each
    module's clients in chunks of one rank when those are large enough to pay
    (:func:`~hf_fedlora.rank_groups.chunks_pay`), read ahead on a helper thread; otherwise every
    client's factors of a module are read one module ahead and folded one by one (running sums)
    or handed over at once (``aggregate_module``).

    Raises:
        NonFiniteTensorError: naming the client whose factors hold NaN/Inf (stored or once folded),
            or the module whose merged factors are not finite in float32 or in ``out_dtype``.
        AdapterError: what the rule raises for one client, prefixed with that client's name.
    """
    layout = adapters[0]
    modules = list(layout.modules)
    max_ranks = [max(a.ranks.values()) for a in adapters]
    # a NaN or Inf that reaches the merged module is caught there, in one check per module
    check = not strategy.reads_every_value(max_ranks, target_rank)
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    bar = tqdm(total=len(modules), desc=f"aggregate ({strategy.name})", disable=not progress, unit="module")
    with bar, contextlib.ExitStack() as files:
        if len(adapters) <= MAX_HELD_FILES:  # one descriptor per client for the whole merge
            for adapter in adapters:
                files.enter_context(adapter.held_open())
        if not check and _adds_many(strategy) and chunks_pay(adapters, modules):
            # closed before the files: the helper stops reading first
            reader = files.enter_context(ReadAhead(adapters, modules))
            merged = _merge_by_rank(reader, adapters, strategy, p, target_rank, prior)
        else:  # closed (its helper stopped) before the files
            merged = files.enter_context(
                contextlib.closing(
                    _merge_one_by_one(adapters, modules, strategy, p, target_rank, prior, check)
                )
            )
        for module, factors in merged:
            ranks[module] = _store(state, adapters, module, factors, p, out_dtype, check)
            bar.update()
    return state, ranks


def _store(
    state: dict[str, torch.Tensor],
    adapters: Sequence[LoraAdapter],
    module: str,
    factors: Factors,
    p: torch.Tensor,
    out_dtype: torch.dtype,
    check: bool,
) -> int:
    try:  # the one finiteness check of a module whose inputs were not checked one by one
        rank = store_module(state, adapters[0], module, factors, out_dtype)
    except NonFiniteTensorError:
        if not check:
            _name_non_finite_input(adapters, module)  # else every input is finite: the sum overflowed
        raise
    state.update(dense_terms(adapters, module, p, out_dtype))
    return rank


def _merge_one_by_one(
    adapters: Sequence[LoraAdapter],
    modules: Sequence[str],
    strategy: Strategy,
    p: torch.Tensor,
    target_rank: int | None,
    prior: LoraAdapter | None,
    check: bool,
) -> Iterator[tuple[str, Factors]]:
    """Each module merged from its clients' factors, the next module read on a helper thread."""
    scratch = Scratch()
    with ThreadPoolExecutor(1, thread_name_prefix="hf-fedlora-read") as pool:
        pending = pool.submit(_read, adapters, modules[0], check) if modules else None
        try:
            for i, module in enumerate(modules):
                raw = pending.result()
                if i + 1 < len(modules):  # the next module's reads overlap this module's arithmetic
                    pending = pool.submit(_read, adapters, modules[i + 1], check)
                previous = prior.folded_factors(module) if prior is not None else None
                factors = _merge_module(
                    adapters, module, raw, strategy, p, target_rank, previous, check, scratch
                )
                del raw
                yield module, factors
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # before the files close under the helper


def _merge_by_rank(
    chunks: ReadAhead,
    adapters: Sequence[LoraAdapter],
    strategy: Strategy,
    p: torch.Tensor,
    target_rank: int | None,
    prior: LoraAdapter | None,
) -> Iterator[tuple[str, Factors]]:
    """Each module of a running-sum rule merged from its clients' chunks of one rank
    (``Strategy.fold_in_many``), the scale folded into the sums' weights."""
    weights = p.tolist()
    buffers: dict[str, torch.Tensor] = {}  # one float32 stack per factor, reused for every chunk
    sums = None
    for chunk in chunks:
        module = chunk.module
        if sums is None:
            sums = strategy.start(module, target_rank)
        if not chunk.clients:  # the module's last chunk is in
            previous = prior.folded_factors(module) if prior is not None else None
            yield module, strategy.finish(sums, 1.0, previous)
            sums = None
            continue
        a, b = chunk.float32(buffers)
        members = [adapters[k] for k in chunk.clients]
        roots = [math.sqrt(adapter.scale(module)) for adapter in members]
        with _naming(members, module):
            strategy.fold_in_many(sums, a, b, [weights[k] for k in chunk.clients], roots)
        chunks.release(chunk)


@contextlib.contextmanager
def _naming(members: Sequence[LoraAdapter], module: str) -> Iterator[None]:
    """Name the client at fault when folding ``members`` in fails: the one whose factors are not
    finite, else the one (or the clients) the rule's error is about."""
    try:
        yield
    except (AdapterError, RuntimeError) as exc:
        _name_non_finite_input(members, module)
        if isinstance(exc, AdapterError):
            where = members[0].where if len(members) == 1 else "one of " + ", ".join(m.where for m in members)
            raise type(exc)(f"{where}: {exc}") from exc
        raise


__all__ = ["Scratch", "cast_checked", "dense_terms", "merge_modules", "store_module"]
