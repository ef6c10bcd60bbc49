"""A client's view of a (global) adapter at its own rank and alpha: ``LoraAdapter.to_rank``."""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..constants import SendBackMethod, check_send_back
from ..errors import AdapterError, RankMismatchError
from ..linalg import empty_directions, factored_svd, lora_a_init, pad_cols, pad_rows
from .io import MemoryStore
from .keys import bias_key, magnitude_key
from .limits import positive_number
from .scaling import lora_scale, unfold
from .validate import check_finite, layer_size


def _init_slots(
    a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, embedding: bool, generator: torch.Generator
) -> None:
    """Give ``slots`` (a boolean mask over rank slots) PEFT's initialisation, in place: A uniform in
    ``±1/sqrt(in)`` and B zero, or for an embedding layer A zero and B standard normal."""
    count = int(slots.sum())
    if embedding:
        a[slots] = 0
        b[:, slots] = torch.randn(b.shape[0], count, generator=generator)
    else:
        a[slots] = lora_a_init(count, a.shape[1], generator)
        b[:, slots] = 0


def rank_view(
    adapter: Any,
    rank: int,
    lora_alpha: float | None = None,
    *,
    use_rslora: bool = False,
    method: SendBackMethod = "truncate",
    seed: int = 0,
    revive_zero_slots: bool = False,
) -> Any:
    """``adapter`` (a ``LoraAdapter``) at ``rank`` with the client's alpha; see ``LoraAdapter.to_rank``.

    ``revive_zero_slots`` (opt-in): slots whose A row and B column are both exactly zero (what
    zero-padding leaves once a round has no client of that rank: A = B = 0 has no gradient, so no
    client could train them again) get PEFT's initialisation too, like the padded slots: the
    update is unchanged (B stays zero) but the slots are trainable again."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"`rank` must be a positive integer, got {rank!r:.60}.")
    if lora_alpha is not None and not positive_number(lora_alpha, integer=False):
        raise AdapterError(f"`lora_alpha` must be a finite positive number, got {lora_alpha!r:.60}.")
    for module in adapter.modules:  # before allocating anything: a view is at most the layer's rank
        out_features, in_features = layer_size(*adapter.factor_shapes(module))
        largest = min(out_features, in_features)
        if rank > largest:
            raise RankMismatchError(
                f"{adapter.label}: `rank` {rank} is larger than module `{module}` itself ({out_features} x "
                f"{in_features}); the largest view of this adapter is rank {largest}."
            )
    try:
        check_send_back(method, "method")
    except ValueError as exc:
        raise AdapterError(str(exc)) from None
    alpha = float(rank if lora_alpha is None else lora_alpha)
    target_scale = lora_scale(rank, alpha, use_rslora)
    generator = torch.Generator().manual_seed(seed)
    layout = adapter.layout
    state: dict[str, torch.Tensor] = {}
    for module in adapter.modules:
        embedding = module in layout.embeddings
        a, b = adapter.folded_factors(module)
        empty = None
        if method == "svd":
            a, b = factored_svd([b], [a], min(rank, a.shape[0]))
            empty = empty_directions(a, b)
        a, b = unfold(pad_rows(a, min(rank, a.shape[0])), pad_cols(b, min(rank, b.shape[1])), target_scale)
        if empty is not None and empty.any():
            a, b = a.clone(), b.clone()
            _init_slots(a, b, empty, embedding, generator)
        if revive_zero_slots:
            dead = ~a.reshape(a.shape[0], -1).any(dim=1) & ~b.reshape(b.shape[0], b.shape[1], -1).any(
                dim=(0, 2)
            )
            if dead.any():
                a, b = a.clone(), b.clone()
                _init_slots(a, b, dead, embedding, generator)
        if a.shape[0] < rank:
            fresh = torch.arange(rank) >= a.shape[0]
            a, b = pad_rows(a, rank), pad_cols(b, rank)
            _init_slots(a, b, fresh, embedding, generator)
        a_shape, b_shape = adapter.factor_shapes(module)
        a_key, b_key = layout.factor_keys(module)
        dtype = adapter.tensor_dtype(a_key) or torch.float32
        state[a_key] = a.reshape(rank, *a_shape[1:]).to(dtype)
        state[b_key] = b.reshape(b_shape[0], rank, *b_shape[2:]).to(dtype)
        for key in (a_key, b_key):  # unfolding to a small scale, or the cast, may overflow the dtype
            check_finite(state[key], f"{adapter.label} at rank {rank} (lora_alpha {alpha:g}, {dtype})", key)
        bias = adapter.delta_bias(module)
        if bias is not None:
            state[bias_key(module)] = (bias / target_scale).to(adapter.tensor_dtype(bias_key(module)))
        if module in layout.magnitudes:
            state[magnitude_key(module)] = adapter.magnitude(module).clone()
    for key in adapter.extras:
        state[key] = adapter.extra(key).clone()
    config = copy.deepcopy(adapter.config)
    config.r, config.lora_alpha, config.use_rslora = rank, alpha, use_rslora
    config.rank_pattern, config.alpha_pattern = {}, {}
    provenance = {k: v for k, v in adapter.provenance.items() if k != "num_examples"}
    return type(adapter)(
        config, MemoryStore(state), label=f"{adapter.label} at rank {rank}", provenance=provenance
    )
