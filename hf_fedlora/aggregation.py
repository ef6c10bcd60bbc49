"""``aggregate_adapters``: merge LoRA adapters of different ranks into one global adapter."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Sequence

import torch
from peft import LoraConfig

from .adapters import LoraAdapter
from .adapters.reference import check_against, majority_reference
from .adapters.scaling import unit_scale_config
from .adapters.sources import AdapterSource, describe_source, resolve_adapter
from .adapters.validate import layer_size
from .constants import __version__
from .errors import AdapterError, IncompatibleAdaptersError, InvalidWeightsError, RankMismatchError
from .merging import merge_modules
from .strategies import Strategy, get_strategy


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


def check_target_rank_fits(target_rank: int | None, adapter: LoraAdapter) -> None:
    """Refuse a ``target_rank`` larger than one of the adapter's layers before anything is allocated.

    A rank above ``min(out, in)`` is no low-rank update; merging at 10**7 would first allocate
    gigabytes per module only to fail at the end (``RankMismatchError``, naming the module).
    """
    if target_rank is None:
        return
    for module in adapter.modules:
        out_features, in_features = layer_size(*adapter.factor_shapes(module))
        if target_rank > min(out_features, in_features):
            raise RankMismatchError(
                f"`target_rank={target_rank}` is larger than module `{module}` itself "
                f"({out_features} x {in_features}, checked on {adapter.label}); a merged adapter cannot "
                "hold more rank than its smallest layer."
            )


def _output_dtype(adapters: Sequence[LoraAdapter], dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    dtypes = {a.dtype for a in adapters}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _dense_extra(adapters: Sequence[LoraAdapter], key: str, p: torch.Tensor) -> torch.Tensor:
    """A dense tensor averaged with ``p``; a base embedding weight PEFT saved is copied as it is when
    every client holds the same one (the frozen base layer), so rounding cannot perturb it."""
    if key in adapters[0].layout.saved_embeddings:
        first = adapters[0].extra(key)
        if all(torch.equal(first, a.extra(key)) for a in adapters[1:]):
            return first.clone()
    dense = sum(w * a.extra(key).float() for w, a in zip(p, adapters))
    return dense.to(adapters[0].tensor_dtype(key) or torch.float32)


def check_ranks(adapters: Sequence[LoraAdapter], strategy: Strategy) -> None:
    """Refuse heterogeneous ranks for a rule that needs equal ones (``fedavg``), naming the client
    whose rank differs from the first one's.

    Raises:
        IncompatibleAdaptersError: naming both clients, the module and the rules that accept them.
    """
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


ReferenceSource = AdapterSource | LoraConfig


def resolve_reference(
    reference: ReferenceSource | None, **load: object
) -> tuple[LoraAdapter | LoraConfig | None, str]:
    """The federation's own reference (``reference=``) opened, and how errors name it."""
    if reference is None:
        return None, ""
    if isinstance(reference, LoraConfig):
        return reference, "the federation's LoraConfig (`reference=`)"
    label = f"federation reference ({describe_source(reference)})"
    return resolve_adapter(reference, label, **load), label


def choose_reference(
    adapters: Sequence[LoraAdapter],
    prior: LoraAdapter | None,
    reference: LoraAdapter | LoraConfig | None,
    reference_where: str,
    check_base_model: bool,
) -> LoraConfig:
    """Check every client against the round's reference, never against a client: the previous global
    adapter, else ``reference``, else the majority of the clients' compatibility fingerprints
    (``adapters/reference.py``). Returns the config the global adapter is built from.

    Raises:
        IncompatibleAdaptersError: naming the first client that differs from the reference, or both
            sides of a tie when no majority exists.
    """
    if reference is not None and prior is not None:
        check_against(reference, reference_where, [prior], check_base_model)
    if prior is not None:
        check_against(prior, prior.label, adapters, check_base_model)
        return prior.config
    if reference is not None:
        check_against(reference, reference_where, adapters, check_base_model)
        if isinstance(reference, LoraAdapter):
            return reference.config
    majority = majority_reference(adapters, check_base_model)
    return reference if isinstance(reference, LoraConfig) else majority.config


def aggregate_adapters(
    sources: Iterable[AdapterSource],
    strategy: str | Strategy = "replication",
    *,
    weights: Sequence[float] | None = None,
    target_rank: int | None = None,
    previous: AdapterSource | None = None,
    reference: ReferenceSource | None = None,
    num_examples: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    check_base_model: bool = True,
    progress: bool = False,
    record_sha256: bool = True,
) -> LoraAdapter:
    """Merge LoRA adapters, possibly of different ranks, into one global adapter.

    Every module's factors are folded with their client's PEFT scale, merged in float32 by the
    strategy, and stored at scale 1 (``lora_alpha = r``, with ``rank_pattern``/``alpha_pattern`` where
    module ranks differ). Embedding-layer LoRA is merged like any module; LoRA biases
    (``lora_bias=True``) become ``sum_k p_k s_k bias_k`` and DoRA magnitudes ``sum_k p_k m_k``
    under every rule (DoRA's normalisation makes no rule exact: see ``docs/aggregation.md``).
    Inputs are read lazily, one module at a time (the next module's reads overlap the current
    one's arithmetic), so peak memory is about the output plus two modules of every client.

    The clients are checked against the round's reference, never against one of them: the previous
    global adapter (``previous``), else ``reference``, else the majority of the clients'
    compatibility fingerprints (base model, ``target_modules``, ``layers_to_transform``,
    ``layers_pattern``, modules and layer shapes, LoRA kind, extras); a client outside the majority
    is named, and so are both sides of a tie. The global config is the reference's (the majority's
    first client's), at scale 1.

    Args:
        sources: the clients' adapters: PEFT folders, Hub repo ids (``"user/repo@rev"``),
            ``LoraAdapter`` objects or ``PeftModel`` objects; any iterable (a generator is read once).
        strategy: a registered name (``hf_fedlora.strategies.list_strategies()``) or a ``Strategy``.
            Defaults to ``"replication"``. Every later argument is keyword-only.
        weights: per-client weights (normalised here). Default: example counts when every source
            carries one (``num_examples`` or provenance files), else uniform.
        target_rank: output rank for ``flexlora`` (and the padding rules); default the largest rank.
        previous: last round's global adapter; ``replication`` keeps its slots that no client of
            this round owns. Also the compatibility reference.
        reference: the federation's own LoRA setup, when there is no ``previous``: a
            ``peft.LoraConfig`` (its base model, ``target_modules``, ``layers_to_transform`` and
            ``layers_pattern`` are checked) or an adapter (folder, Hub id, ``LoraAdapter``: its
            modules and shapes too).
        num_examples: per-client example counts, overriding the provenance files.
        dtype: dtype of the output tensors (default: the inputs' dtype if they share one, else
            float32); a merged value that overflows it raises ``NonFiniteTensorError``.
        token, cache_dir: for Hub sources.
        allow_pickle: accept pickle ``adapter_model.bin`` inputs (still loaded weights-only).
        check_base_model: refuse adapters whose ``base_model_name_or_path`` differ.
        progress: show a progress bar over modules.
        record_sha256: record each client's sha256 in the provenance (computed from the same
            reads as its tensors); ``False`` records ``None`` and skips the hashing.

    Returns:
        The global ``LoraAdapter`` (in memory), with a provenance record of the strategy, each
        client's ranks, weight, example count and sha256.

    Raises:
        AdapterError: (subclasses) naming the client and the file or field at fault, for unreadable,
            unsupported or incompatible inputs and invalid weights; ``UnknownStrategyError`` for an
            unknown strategy name; ``NonFiniteTensorError`` naming the client, or the module whose
            merged value is not finite in float32 or in ``dtype``.
    """
    strategy = get_strategy(strategy)
    if isinstance(sources, (str, os.PathLike, LoraAdapter)):
        raise AdapterError("`sources` must be a list of client adapters, not a single one: wrap it in [...].")
    sources = list(sources)  # a generator is consumed once here, so provenance can name every client
    if not sources:
        raise AdapterError("`sources` is empty: pass at least one client adapter to aggregate.")
    check_target_rank(target_rank)
    load = {"token": token, "cache_dir": cache_dir, "allow_pickle": allow_pickle}
    adapters = [
        resolve_adapter(s, f"client {i} ({describe_source(s)})", **load) for i, s in enumerate(sources)
    ]
    prior = None
    if previous is not None:
        prior = resolve_adapter(previous, f"previous global adapter ({describe_source(previous)})", **load)
    ref, ref_where = resolve_reference(reference, **load)
    template = choose_reference(adapters, prior, ref, ref_where, check_base_model)
    check_ranks(adapters, strategy)
    check_target_rank_fits(target_rank, adapters[0])
    p = resolve_weights(adapters, weights, num_examples)

    if record_sha256:
        for adapter in adapters:
            adapter.hash_reads()
    out_dtype = _output_dtype(adapters, dtype)
    state, ranks = merge_modules(
        adapters,
        strategy,
        p,
        target_rank=target_rank,
        prior=prior,
        out_dtype=out_dtype,
        progress=progress,
    )
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
                "sha256": a.sha256() if record_sha256 else None,
            }
            for source, a, w, c in zip(sources, adapters, p, counts)
        ],
        "previous": describe_source(previous) if previous is not None else None,
        "hf_fedlora_version": __version__,
    }
    config = unit_scale_config(template, ranks)
    return LoraAdapter.from_state_dict(
        config, state, label=f"global adapter ({strategy.name})", provenance=provenance
    )
