"""``aggregate_adapters``: merge LoRA adapters of different ranks into one global adapter."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .adapters import LoraAdapter
from .adapters.keys import bias_key, magnitude_key
from .adapters.scaling import unit_scale_config
from .adapters.sources import AdapterSource, describe_source, resolve_adapter
from .adapters.validate import check_compatible
from .constants import __version__
from .errors import AdapterError, IncompatibleAdaptersError, InvalidWeightsError
from .strategies import ModuleInputs, Strategy, get_strategy


def resolve_weights(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None,
    num_examples: Sequence[int] | None,
) -> torch.Tensor:
    """Normalised client weights: ``weights`` if given, else example counts, else uniform.

    Raises:
        InvalidWeightsError: wrong length, or a weight (or example count) that is not a finite
            positive number.
    """
    counts = list(num_examples) if num_examples is not None else [a.num_examples for a in adapters]
    if weights is None and num_examples is not None:
        weights, what = counts, "num_examples"
    elif weights is None and all(c is not None for c in counts):
        weights, what = counts, "num_examples from the provenance files"
    elif weights is None:
        weights, what = [1.0] * len(adapters), "uniform"
    else:
        what = "weights"
    values = list(weights)
    if len(values) != len(adapters):
        raise InvalidWeightsError(
            f"`{what}` has {len(values)} entries for {len(adapters)} clients; give one per client."
        )
    checked = [check_weight(adapter.label, what, value) for adapter, value in zip(adapters, values)]
    tensor = torch.tensor(checked, dtype=torch.float64)
    tensor = tensor / tensor.max()  # first, so that a sum of huge weights cannot overflow to inf
    return (tensor / tensor.sum()).float()


def check_weight(label: str, what: str, value: object) -> float:
    """A client weight (or example count) as a float: a finite positive real number, given as a
    Python, NumPy or 0-d torch scalar.

    Raises:
        InvalidWeightsError: naming the client (``label``) and the option (``what``).
    """
    number = value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        number = value.item()
    if not isinstance(number, bool) and isinstance(number, numbers.Real):
        number = float(number)
    if not isinstance(number, float) or not math.isfinite(number) or number <= 0:
        raise InvalidWeightsError(
            f"{label}: `{what}` entry is {value!r}; every client's weight must be a finite positive number."
        )
    return number


def check_target_rank(target_rank: object) -> None:
    """Refuse a ``target_rank`` that is not a positive integer (``AdapterError``)."""
    if target_rank is not None and (
        isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1
    ):
        raise AdapterError(f"`target_rank` must be a positive integer, got {target_rank!r}.")


def _output_dtype(adapters: Sequence[LoraAdapter], dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    dtypes = {a.dtype for a in adapters}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _name_non_finite_input(adapters: Sequence[LoraAdapter], module: str) -> None:
    """Raise ``NonFiniteTensorError`` for the first client whose factors of ``module`` hold NaN/Inf."""
    for adapter in adapters:
        adapter.lora_factors(module)


def _dense_terms(
    adapters: Sequence[LoraAdapter], module: str, p: torch.Tensor, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """A module's LoRA bias and DoRA magnitude in the merged adapter: ``sum_k p_k s_k bias_k`` (the
    bias update, stored at scale 1) and ``sum_k p_k m_k``, whatever the rule."""
    terms = {}
    if module in adapters[0].layout.biases:
        bias = sum(w * a.delta_bias(module) for w, a in zip(p, adapters))
        terms[bias_key(module)] = bias.to(dtype).contiguous()
    if module in adapters[0].layout.magnitudes:
        magnitude = sum(w * a.magnitude(module).float() for w, a in zip(p, adapters))
        terms[magnitude_key(module)] = magnitude.to(dtype).contiguous()
    return terms


def _dense_extra(adapters: Sequence[LoraAdapter], key: str, p: torch.Tensor) -> torch.Tensor:
    """A dense tensor averaged with ``p``; a base embedding weight PEFT saved is copied as it is when
    every client holds the same one (the frozen base layer), so rounding cannot perturb it."""
    if key in adapters[0].layout.saved_embeddings:
        first = adapters[0].extra(key)
        if all(torch.equal(first, a.extra(key)) for a in adapters[1:]):
            return first.clone()
    dense = sum(w * a.extra(key).float() for w, a in zip(p, adapters))
    return dense.to(adapters[0].tensor_dtype(key) or torch.float32)


def _check_ranks(adapters: Sequence[LoraAdapter], strategy: Strategy) -> None:
    if strategy.supports_heterogeneous_ranks:
        return
    reference = adapters[0].ranks
    for other in adapters[1:]:
        for module, rank in other.ranks.items():
            if rank != reference[module]:
                raise IncompatibleAdaptersError(
                    f"{other.label}: module `{module}` has rank {rank} but {adapters[0].label} has rank "
                    f"{reference[module]}; strategy '{strategy.name}' needs equal ranks. Use 'replication' "
                    "(or 'zero_padding', 'hetlora', 'flexlora', 'stacking') for heterogeneous ranks."
                )


def aggregate_adapters(
    sources: Sequence[AdapterSource],
    strategy: str | Strategy = "replication",
    *,
    weights: Sequence[float] | None = None,
    target_rank: int | None = None,
    previous: AdapterSource | None = None,
    num_examples: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    check_base_model: bool = True,
    progress: bool = False,
) -> LoraAdapter:
    """Merge LoRA adapters, possibly of different ranks, into one global adapter.

    Every module's factors are folded with their client's PEFT scale, merged in float32 by the
    strategy, and stored at scale 1 (``lora_alpha = r``, with ``rank_pattern``/``alpha_pattern`` where
    module ranks differ). Embedding-layer LoRA is merged like any module; LoRA biases
    (``lora_bias=True``) become ``sum_k p_k s_k bias_k`` and DoRA magnitudes ``sum_k p_k m_k``
    under every rule (DoRA's normalisation makes no rule exact: see ``docs/aggregation.md``). Inputs are read lazily, one module at a time, so peak memory is about the
    output plus one module of every client.

    Args:
        sources: the clients' adapters: PEFT folders, Hub repo ids (``"user/repo@rev"``),
            ``LoraAdapter`` objects or ``PeftModel`` objects.
        strategy: a registered name (``hf_fedlora.strategies.list_strategies()``) or a ``Strategy``.
            Defaults to ``"replication"``. Every later argument is keyword-only.
        weights: per-client weights (normalised here). Default: example counts when every source
            carries one (``num_examples`` or provenance files), else uniform.
        target_rank: output rank for ``flexlora`` (and the padding rules); default the largest rank.
        previous: last round's global adapter; ``replication`` keeps its slots that no client of
            this round owns.
        num_examples: per-client example counts, overriding the provenance files.
        dtype: dtype of the output tensors (default: the inputs' dtype if they share one, else float32).
        token, cache_dir: for Hub sources.
        allow_pickle: accept pickle ``adapter_model.bin`` inputs (still loaded weights-only).
        check_base_model: refuse adapters whose ``base_model_name_or_path`` differ.
        progress: show a progress bar over modules.

    Returns:
        The global ``LoraAdapter`` (in memory), with a provenance record of the strategy, each
        client's ranks, weight, example count and sha256.

    Raises:
        AdapterError: (subclasses) naming the client and the file or field at fault, for unreadable,
            unsupported or incompatible inputs and invalid weights; ``UnknownStrategyError`` for an
            unknown strategy name.
    """
    strategy = get_strategy(strategy)
    if not sources:
        raise AdapterError("`sources` is empty: pass at least one client adapter to aggregate.")
    check_target_rank(target_rank)
    load = {"token": token, "cache_dir": cache_dir, "allow_pickle": allow_pickle}
    adapters = [
        resolve_adapter(s, f"client {i} ({describe_source(s)})", **load) for i, s in enumerate(sources)
    ]
    check_compatible(adapters, check_base_model=check_base_model)
    _check_ranks(adapters, strategy)
    p = resolve_weights(adapters, weights, num_examples)
    prior = None
    if previous is not None:
        prior = resolve_adapter(previous, f"previous global adapter ({describe_source(previous)})", **load)
        check_compatible([adapters[0], prior], check_base_model=check_base_model)

    out_dtype = _output_dtype(adapters, dtype)
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    max_ranks = [max(a.ranks.values()) for a in adapters]
    # a NaN or Inf that reaches the merged module is caught there, in one check per module
    check_inputs = not strategy.reads_every_value(max_ranks, target_rank)
    for module in tqdm(
        adapters[0].modules, desc=f"aggregate ({strategy.name})", disable=not progress, unit="module"
    ):
        folded = [a.folded_factors(module, check_finite_values=check_inputs) for a in adapters]
        inputs = ModuleInputs(
            name=module,
            a=[f[0] for f in folded],
            b=[f[1] for f in folded],
            weights=p,
            target_rank=target_rank,
            previous=prior.folded_factors(module) if prior is not None else None,
        )
        try:
            a, b = strategy.aggregate_module(inputs)
        except RuntimeError:  # e.g. an SVD that does not converge on non-finite input
            if not check_inputs:
                _name_non_finite_input(adapters, module)
            raise
        if not check_inputs and not (torch.isfinite(a.sum()) and torch.isfinite(b.sum())):
            _name_non_finite_input(adapters, module)  # returns if every input is finite (the sum overflowed)
        a_shape, b_shape = adapters[0].factor_shapes(module)
        a_key, b_key = adapters[0].layout.factor_keys(module)
        ranks[module] = a.shape[0]
        state[a_key] = a.reshape(a.shape[0], *a_shape[1:]).to(out_dtype).contiguous()
        state[b_key] = b.reshape(b.shape[0], a.shape[0], *b_shape[2:]).to(out_dtype).contiguous()
        state.update(_dense_terms(adapters, module, p, out_dtype))
    for key in adapters[0].extras:
        state[key] = _dense_extra(adapters, key, p)

    counts = [a.num_examples for a in adapters] if num_examples is None else list(num_examples)
    provenance = {
        "strategy": strategy.name,
        "target_rank": target_rank,
        "num_clients": len(adapters),
        "num_examples": sum(counts) if all(c is not None for c in counts) else None,
        "clients": [
            {
                "source": describe_source(source),
                "ranks": sorted(set(a.ranks.values())),
                "weight": float(w),
                "num_examples": c,
                "sha256": a.sha256(),
            }
            for source, a, w, c in zip(sources, adapters, p, counts)
        ],
        "previous": describe_source(previous) if previous is not None else None,
        "hf_fedlora_version": __version__,
    }
    config = unit_scale_config(adapters[0].config, ranks)
    return LoraAdapter.from_state_dict(
        config, state, label=f"global adapter ({strategy.name})", provenance=provenance
    )
