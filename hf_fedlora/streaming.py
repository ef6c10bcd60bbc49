"""``StreamingAggregator``: merge clients' adapters one at a time, as their replies arrive.

Each ``add`` reads one client once (checked as ``aggregate_adapters`` checks it), folds it into the
strategy's running state, and lets it go; ``result()`` returns the same global adapter that
``aggregate_adapters`` builds from the same sources and weights. Peak memory of the rules with
running sums (``zero_padding``, ``replication``, ``hetlora``, ``fedavg``) is the output plus one
client, however many clients are added; ``flexlora`` and ``stacking`` keep every client's folded
factors until ``result()``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from peft import LoraConfig

from .adapters import LoraAdapter
from .adapters.keys import bias_key, magnitude_key
from .adapters.reference import check_against
from .adapters.scaling import fold, unit_scale_config
from .adapters.sources import AdapterSource, describe_source, resolve_adapter
from .adapters.validate import reducible
from .aggregation import (
    ReferenceSource,
    check_ranks,
    check_target_rank,
    check_target_rank_fits,
    check_weight,
    resolve_reference,
)
from .constants import __version__
from .errors import AdapterError, InvalidWeightsError
from .linalg import FLOAT32_MAX
from .merging import Scratch, cast_checked, store_module
from .strategies import Strategy, get_strategy
from .strategies._linalg import power_of_two_unit
from .strategies.base import normalise_weights

_MODES = {
    "weights": "given a `weight`",
    "num_examples": "weighted by example counts",
    "uniform": "weighted uniformly (no `weight` and no example count)",
}


class _HeaderStore:
    """Tensor names, shapes and dtypes of an adapter without its data: what the compatibility checks
    and the output's layout need of the first client, so that client need not be kept."""

    def __init__(self, adapter: LoraAdapter):
        keys = [k for m in adapter.modules for k in adapter.layout.factor_keys(m)]
        keys += [bias_key(m) for m in adapter.layout.biases]
        keys += [magnitude_key(m) for m in adapter.layout.magnitudes] + list(adapter.extras)
        self._headers = {k: (tuple(adapter.tensor_shape(k)), adapter.tensor_dtype(k)) for k in keys}

    def keys(self) -> list[str]:
        return sorted(self._headers)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._headers[key][0]

    def dtype(self, key: str) -> torch.dtype | None:
        return self._headers[key][1]

    def get(self, key: str) -> torch.Tensor:
        raise KeyError(f"{key}: only the header of this adapter is kept")


class _DenseSum:
    """``sum_k w_k x_k`` of a dense tensor (a LoRA bias, a DoRA magnitude, an extra) in float32,
    relative to the largest weight seen (huge weights cannot overflow it); for a base embedding
    weight PEFT saved, also the first client's tensor while every client holds the same."""

    def __init__(self, keep_identical: bool):
        self.total: torch.Tensor | None = None
        self.first: torch.Tensor | None = None
        self.identical = keep_identical
        self.unit = 1.0  # a power of two, at least half of every weight added
        self.weight = 0.0  # sum of the weights relative to the unit

    def add(self, value: torch.Tensor, weight: float) -> None:
        if self.identical:
            if self.first is None:
                self.first = value
            elif not torch.equal(self.first, value):
                self.identical, self.first = False, None
        unit = power_of_two_unit(weight)
        if unit > self.unit:  # exact rescaling: both units are powers of two
            if self.total is not None:
                self.total.mul_(self.unit / unit)
            self.weight *= self.unit / unit
            self.unit = unit
        relative = weight / self.unit
        value = value.float()
        if self.total is None:
            self.total = value * relative
        else:
            self.total.add_(value, alpha=relative)
        self.weight += relative

    def mean(self) -> torch.Tensor:
        return self.total.div_(self.weight)


class _ClientData:
    """Every tensor of one client, read once and checked finite: LoRA factors keyed as in the output
    (for rules of running sums, the stored ones with ``sqrt(s)``, folded into a reused buffer for
    the rule's own check and again as they are added; for rules that keep their inputs, folded,
    float32), LoRA bias updates (``s * bias``), DoRA magnitudes and extras."""

    def __init__(self, adapter: LoraAdapter, strategy: Strategy, scratch: Scratch):
        self.stored: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.folded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        keeps_folded = strategy.retains_inputs
        checks = type(strategy).check_factors is not Strategy.check_factors
        for module in adapter.modules:
            a, b = adapter.lora_factors(module, check_finite_values=False)
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1])
            scale = adapter.scale(module)
            root = math.sqrt(scale)
            # NaN/Inf in the stored factors, or from folding the scale in: one look at each extreme;
            # on failure the checked read raises aggregate_adapters' error
            if not _folds_finite((a, b), root):
                adapter.folded_factors(module)
            if keeps_folded:  # folded once, for the rule's check and the rule
                folded = self.folded[module] = fold(a, b, scale)
            elif checks:  # folded into the reused buffer for the check, again as it is added
                folded = (scratch.fold("a", a, a.shape, root), scratch.fold("b", b, b.shape, root))
            if keeps_folded or checks:
                try:
                    strategy.check_factors(module, *folded)
                except AdapterError as exc:
                    raise type(exc)(f"{adapter.where}: {exc}") from exc
            if not keeps_folded:
                self.stored[module] = (a, b, root)  # one client in float32 at most
        self.dense: dict[str, torch.Tensor] = {}
        for module in adapter.modules:
            if module in adapter.layout.biases:
                self.dense[bias_key(module)] = adapter.delta_bias(module)
            if module in adapter.layout.magnitudes:
                self.dense[magnitude_key(module)] = adapter.magnitude(module)
        self.dense.update((key, adapter.extra(key)) for key in adapter.extras)
        self.saved_embeddings = set(adapter.layout.saved_embeddings)


def _folds_finite(factors: tuple[torch.Tensor, torch.Tensor], root: float) -> bool:
    """Whether every value is finite and stays within float32 once multiplied by ``root``."""
    for tensor in factors:
        if tensor.numel():
            low, high = torch.aminmax(reducible(tensor))
            peak = max(-float(low), float(high)) * root  # NaN stays NaN
            if not peak <= FLOAT32_MAX:
                return False
    return True


class StreamingAggregator:
    """Merge LoRA adapters of different ranks one client at a time.

    ``add`` each reply as it arrives (a folder, a Hub id, a ``LoraAdapter`` or a ``peft.PeftModel``),
    then call ``result()`` once::

        agg = StreamingAggregator("replication", previous="round-0003")
        for reply in replies:
            agg.add(reply, num_examples=reply_count)
        global_adapter = agg.result()

    The result equals ``aggregate_adapters(sources, strategy, weights=..., num_examples=...)`` on the
    accepted clients (up to float32 summation order). A source is read once, in ``add``, and not
    kept. Every ``add`` checks its client as ``aggregate_adapters`` does (readable, finite,
    compatible with ``previous`` and ``reference`` when given, and with the first accepted client,
    which without either is the round's only reference: pass one when clients may be hostile; equal ranks for
    ``fedavg``) and raises the same errors, naming it ``client i (source)`` with ``i`` counting
    every ``add`` call; a refused client leaves the running state unchanged, so the round can go on
    without it.

    Weights: a client's ``weight`` if given, else its example count (``num_examples``, or its
    provenance file), else 1; they are normalised in ``result()``. Every client of a round is
    weighted the same way as the first accepted one: a client given a ``weight`` among clients that
    were not (or the reverse), or one without an example count among clients weighted by their
    counts, is refused with ``InvalidWeightsError`` (``aggregate_adapters`` would instead fall back
    to uniform weights for the whole round).

    Memory: ``zero_padding``, ``replication``, ``hetlora`` and ``fedavg`` keep running sums, so the
    peak is the output plus one client whatever the number of clients; ``flexlora`` and
    ``stacking`` keep every client's folded factors (float32) until ``result()``; a rule of your own
    keeps what its :meth:`~hf_fedlora.strategies.Strategy.start` / ``fold_in`` keep.

    Args:
        strategy: a registered name or a ``Strategy`` (default ``"replication"``).
        target_rank, previous, reference, dtype, token, cache_dir, allow_pickle, check_base_model,
            record_sha256: as for :func:`~hf_fedlora.aggregate_adapters`; ``previous`` and
            ``reference`` are opened here, ``previous`` is read in ``result()``; the global config is
            the previous adapter's, else the reference's, else the first accepted client's.

    Raises:
        AdapterError: an invalid ``target_rank`` (or any, for a rule whose rank grows with the
            clients), an unknown strategy, or an unreadable ``previous``.
    """

    def __init__(
        self,
        strategy: str | Strategy = "replication",
        *,
        target_rank: int | None = None,
        previous: AdapterSource | None = None,
        reference: ReferenceSource | None = None,
        dtype: torch.dtype | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        check_base_model: bool = True,
        record_sha256: bool = True,
    ):
        self.strategy = get_strategy(strategy)
        check_target_rank(target_rank)
        if target_rank is not None and self.strategy.rank_grows_with_clients:
            raise AdapterError(
                f"strategy '{self.strategy.name}' outputs a rank that grows with the clients (sum of their "
                f"ranks); `target_rank={target_rank}` is not supported. Use strategy 'flexlora' for a fixed rank."
            )
        self.target_rank, self.dtype, self.check_base_model = target_rank, dtype, check_base_model
        self.record_sha256 = record_sha256
        self._load = {"token": token, "cache_dir": cache_dir, "allow_pickle": allow_pickle}
        self._previous = describe_source(previous) if previous is not None else None
        self._prior = (
            resolve_adapter(previous, f"previous global adapter ({self._previous})", **self._load)
            if previous is not None
            else None
        )
        self._reference, self._reference_where = resolve_reference(reference, **self._load)
        if self._reference is not None and self._prior is not None:
            check_against(self._reference, self._reference_where, [self._prior], check_base_model)
        self._first: LoraAdapter | None = None  # header only
        self._mode: str | None = None
        self._calls = 0
        self._weights: list[float] = []
        self._unit: float | None = None  # a power of two near the first weight: fold_in gets weight / unit
        self._clients: list[dict[str, Any]] = []
        self._dtypes: set[torch.dtype] = set()
        self._states: dict[str, Any] = {}
        self._dense: dict[str, _DenseSum] = {}
        self._closed: str | None = None
        self._scratch = Scratch()

    @property
    def num_clients(self) -> int:
        """How many clients have been accepted so far."""
        return len(self._clients)

    def add(
        self,
        source: AdapterSource,
        weight: float | None = None,
        num_examples: int | None = None,
    ) -> None:
        """Check one client, read it once and fold it into the running state.

        Args:
            source: a PEFT folder, a Hub repo id, a ``LoraAdapter`` or a ``peft.PeftModel``.
            weight: this client's weight (normalised in ``result()``).
            num_examples: its example count, overriding its provenance file.

        Raises:
            AdapterError: (subclasses) as ``aggregate_adapters`` raises them, naming the client; the
                running state is unchanged and later clients can still be added.
        """
        self._check_open()
        label = f"client {self._calls} ({describe_source(source)})"
        self._calls += 1
        adapter = resolve_adapter(source, label, **self._load)
        if self._prior is not None:
            check_against(self._prior, self._prior.label, [adapter], self.check_base_model)
        if self._reference is not None:
            check_against(self._reference, self._reference_where, [adapter], self.check_base_model)
        if self._first is not None:  # the first accepted client passed the checks above too
            check_against(self._first, self._first.label, [adapter], self.check_base_model)
            check_ranks([self._first, adapter], self.strategy)
        check_target_rank_fits(self.target_rank, adapter)
        value, count, mode = self._client_weight(adapter, weight, num_examples)
        # read every tensor once and check every value before the running state changes
        if self.record_sha256:
            adapter.hash_reads()
        data = _ClientData(adapter, self.strategy, self._scratch)
        record = {
            "source": describe_source(source),
            "ranks": sorted(set(adapter.ranks.values())),
            "weight": value,
            "num_examples": count,
            "sha256": adapter.sha256() if self.record_sha256 else None,
        }
        unit = self._unit or power_of_two_unit(value)
        relative = value / unit  # exact; the rules see weights near 1, whatever their scale
        if not math.isfinite(relative) or relative <= 0:
            raise InvalidWeightsError(
                f"{label}: weight {value!r} is out of float range relative to the first accepted client's "
                f"({self._weights[0]!r}); weights of one round must be within a factor 1e300 of each other."
            )
        try:
            self._fold_in(data, relative)
        except BaseException:
            self._closed = f"folding in {label} failed half-way; start a new StreamingAggregator"
            raise
        if self._first is None:
            self._first = LoraAdapter(adapter.config, _HeaderStore(adapter), label=label)
        self._mode, self._unit = mode, unit
        self._weights.append(value)
        self._clients.append(record)
        self._dtypes.add(adapter.dtype)

    def _client_weight(
        self, adapter: LoraAdapter, weight: float | None, num_examples: int | None
    ) -> tuple[float, int | None, str]:
        count = num_examples if num_examples is not None else adapter.num_examples
        if weight is not None:
            mode, value, what = "weights", weight, "weight"
        elif num_examples is not None:
            mode, value, what = "num_examples", num_examples, "num_examples"
        elif count is not None and self._mode != "uniform":
            mode, value, what = "num_examples", count, "num_examples from the provenance files"
        else:
            mode, value, what = "uniform", 1.0, "uniform"
        value = check_weight(adapter.label, what, value)
        if self._mode is not None and mode != self._mode:
            raise InvalidWeightsError(
                f"{adapter.label}: this client is {_MODES[mode]}, but the clients before it were "
                f"{_MODES[self._mode]}. Weight every client of a round the same way (`weight=` for all, "
                "`num_examples=` or provenance counts for all, or neither)."
            )
        return value, count, mode

    def _fold_in(self, data: _ClientData, weight: float) -> None:
        for module in (*data.folded, *data.stored):
            if module not in self._states:
                self._states[module] = self.strategy.start(module, self.target_rank)
        for module, (a, b) in data.folded.items():
            self.strategy.fold_in(self._states[module], a, b, weight)
        for module, (a, b, root) in data.stored.items():
            a, b = self._scratch.float32("a", a, a.shape), self._scratch.float32("b", b, b.shape)
            self.strategy.fold_in_scaled(self._states[module], a, b, weight, root)
        for key, value in data.dense.items():
            self._dense_sum(key, key in data.saved_embeddings).add(value, weight)

    def _dense_sum(self, key: str, keep_identical: bool = False) -> _DenseSum:
        if key not in self._dense:
            self._dense[key] = _DenseSum(keep_identical)
        return self._dense[key]

    def result(self) -> LoraAdapter:
        """The global adapter of the clients accepted so far; the aggregator is closed afterwards.

        Returns:
            A ``LoraAdapter`` at scale 1 with a provenance record of every accepted client, as
            ``aggregate_adapters`` returns it.

        Raises:
            AdapterError: no client was accepted, or ``result()`` was already called.
        """
        self._check_open()
        if not self._clients:
            raise AdapterError("no client adapter was accepted: add at least one before `result()`.")
        self._closed = "`result()` was already called; start a new StreamingAggregator for the next round"
        first = self._first
        p = normalise_weights(self._weights)  # by the largest first: no overflow
        total = math.fsum(w / self._unit for w in self._weights)  # the weights fold_in was given
        out_dtype = self.dtype or (next(iter(self._dtypes)) if len(self._dtypes) == 1 else torch.float32)
        state: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        for module in first.modules:
            previous = self._prior.folded_factors(module) if self._prior is not None else None
            merged = self.strategy.finish(self._states.pop(module), total, previous)
            ranks[module] = store_module(state, first, module, merged, out_dtype)
            for key in (bias_key(module), magnitude_key(module)):
                if key in self._dense:
                    state[key] = cast_checked(self._dense.pop(key).mean(), out_dtype, module, key)
        for key in first.extras:
            dense = self._dense.pop(key)
            if dense.identical:
                state[key] = dense.first.clone()
            else:
                state[key] = dense.mean().to(first.tensor_dtype(key) or torch.float32)
        counts = [c["num_examples"] for c in self._clients]
        provenance = {
            "strategy": self.strategy.name,
            "target_rank": self.target_rank,
            "num_clients": len(self._clients),
            "num_examples": sum(counts) if all(c is not None for c in counts) else None,
            "clients": [{**c, "weight": float(w)} for c, w in zip(self._clients, p)],
            "previous": self._previous,
            "hf_fedlora_version": __version__,
        }
        template = self._prior or self._reference or first
        config = unit_scale_config(template if isinstance(template, LoraConfig) else template.config, ranks)
        return LoraAdapter.from_state_dict(
            config, state, label=f"global adapter ({self.strategy.name})", provenance=provenance
        )

    def _check_open(self) -> None:
        if self._closed:
            raise AdapterError(f"this StreamingAggregator is closed: {self._closed}.")

    def __repr__(self) -> str:
        return f"StreamingAggregator(strategy={self.strategy.name!r}, clients={self.num_clients})"


__all__ = ["StreamingAggregator"]
