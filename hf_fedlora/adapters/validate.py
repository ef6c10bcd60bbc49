"""Checks on one adapter and on a set of adapters; every error names the client, file and field."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from peft import LoraConfig

from ..constants import ADAPTER_CONFIG_NAME, ADAPTER_SAFETENSORS_NAME
from ..errors import (
    AdapterFormatError,
    IncompatibleAdaptersError,
    NonFiniteTensorError,
    RankMismatchError,
    UnsupportedAdapterError,
)
from .keys import KeyLayout, bias_key, magnitude_key
from .limits import check_patterns, positive_number
from .scaling import declared_rank_alpha, lora_scale


class AdapterLayout(Protocol):
    """What these checks read of a ``LoraAdapter``: its config and tensor headers, never its data."""

    label: str
    config: LoraConfig
    layout: KeyLayout
    modules: tuple[str, ...]
    extras: tuple[str, ...]

    def factor_shapes(self, module: str) -> tuple[tuple[int, ...], tuple[int, ...]]: ...

    def tensor_dtype(self, key: str) -> torch.dtype | None: ...

    def tensor_shape(self, key: str) -> tuple[int, ...]: ...


def lora_config_from_dict(data: dict[str, Any], where: str) -> LoraConfig:
    """Build a ``LoraConfig`` from a parsed ``adapter_config.json``, refusing what we cannot merge."""
    where_file = f"{where}, file '{ADAPTER_CONFIG_NAME}'"
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        if isinstance(peft_type, str) and peft_type.strip().upper() == "LORA":
            raise AdapterFormatError(
                f"{where_file}: field `peft_type` is {peft_type!r}; PEFT writes it as 'LORA' (upper case). "
                "Re-save the adapter with PEFT."
            )
        raise UnsupportedAdapterError(
            f"{where_file}: field `peft_type` is {peft_type!r:.60}; "
            "hf_fedlora merges LoRA adapters only (`peft_type: LORA`)."
        )
    for field, integer in (("r", True), ("lora_alpha", False)):
        value = data.get(field)
        if not positive_number(value, integer=integer):
            kind = "a positive integer" if integer else "a finite positive number"
            raise AdapterFormatError(f"{where_file}: field `{field}` must be {kind}, got {value!r:.60}.")
    for field in _BOOL_FIELDS:
        value = data.get(field)
        if value is not None and not isinstance(value, bool):
            raise AdapterFormatError(
                f"{where_file}: field `{field}` must be true or false, got {type(value).__name__} {value!r:.60}."
            )
    for field in ("rank_pattern", "alpha_pattern"):
        if data.get(field) is not None and not isinstance(data[field], dict):
            raise AdapterFormatError(
                f"{where_file}: field `{field}` must be a mapping, got {data[field]!r:.60}."
            )
    check_patterns(data, where_file)
    try:
        config = LoraConfig.from_peft_type(**data)
    except (TypeError, ValueError, KeyError, AttributeError, re.error, RecursionError) as exc:
        raise AdapterFormatError(f"{where_file}: not a valid LoraConfig ({exc!s:.300}).") from exc
    _check_scales(config, data, where_file)
    return config


_BOOL_FIELDS = ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "inference_mode")


def _check_scales(config: LoraConfig, data: dict[str, Any], where: str) -> None:
    """Every scale the config can give a module, ``alpha / r`` (or ``/ sqrt(r)``), is finite and small
    enough that ``sqrt(s)`` times a float32 factor can stay finite: folding must not overflow."""
    ranks = [config.r, *(config.rank_pattern or {}).values()]
    alphas = [config.lora_alpha, *(config.alpha_pattern or {}).values()]
    alpha, rank = max(alphas, key=float), min(ranks)  # the largest scale any module can get
    try:
        scale = lora_scale(int(rank), float(alpha), bool(config.use_rslora))
    except OverflowError:
        scale = math.inf
    if not math.isfinite(scale) or scale > MAX_SCALE:
        raise AdapterFormatError(
            f"{where}: field `lora_alpha`/`alpha_pattern` {alpha!r:.40} with rank {rank!r:.40} gives the "
            f"scale {scale:.3g}, over {MAX_SCALE:.0e}: folding it into the factors overflows."
        )


MAX_SCALE = 1e18
"""Largest PEFT scale accepted: ``sqrt(1e18) = 1e9`` leaves float32 room for factors up to ~1e29."""


def layer_size(a_shape: Sequence[int], b_shape: Sequence[int]) -> tuple[int, int]:
    """``(out, in)`` of the layer a LoRA module adapts, from its factors' shapes (a convolution's
    ``in`` is its input channels times its kernel): no module can hold a rank above their minimum."""
    return int(b_shape[0]), int(math.prod(a_shape[1:]))


def check_factor_shapes(adapter: AdapterLayout) -> None:
    """Every module's A and B agree with each other and with the rank its config declares.

    Reads tensor headers only, no data.
    """
    where = getattr(adapter, "where", f"{adapter.label}, file '{ADAPTER_SAFETENSORS_NAME}'")
    if not adapter.modules:
        raise AdapterFormatError(
            f"{where}: the adapter holds no LoRA tensors (`*.lora_A.weight`). Nothing to merge."
        )
    for module in adapter.modules:
        a_shape, b_shape = adapter.factor_shapes(module)
        a_key, b_key = adapter.layout.factor_keys(module)
        for key, shape, dtype in (
            (a_key, a_shape, adapter.tensor_dtype(a_key)),
            (b_key, b_shape, adapter.tensor_dtype(b_key)),
        ):
            if dtype is None or not dtype.is_floating_point:
                name = dtype_name(adapter, key) if dtype is None else str(dtype).replace("torch.", "")
                raise AdapterFormatError(
                    f"{where}: tensor `{key}` has dtype {name}; LoRA factors must be floating point "
                    "(float32, float16, bfloat16)."
                )
            if len(shape) < 2:
                raise AdapterFormatError(
                    f"{where}: tensor `{key}` has shape {list(shape)}; LoRA factors are matrices."
                )
        if int(torch.Size(b_shape[2:]).numel()) != 1:
            raise AdapterFormatError(
                f"{where}: tensor `{b_key}` has shape {list(b_shape)}; a LoRA B factor is [out, r] "
                "(or [out, r, 1, 1] for a convolution)."
            )
        rank, _ = declared_rank_alpha(adapter.config, module)
        if a_shape[0] != rank or b_shape[1] != rank:
            raise RankMismatchError(
                f"{where}: tensors `{a_key}` {list(a_shape)} and `{b_key}` {list(b_shape)} "
                f"hold rank {a_shape[0]}/{b_shape[1]} but '{ADAPTER_CONFIG_NAME}' declares rank {rank} for this module "
                "(`r`/`rank_pattern`). Re-save the adapter with PEFT so config and tensors agree."
            )
        out_features, in_features = layer_size(a_shape, b_shape)
        if rank > min(out_features, in_features):
            raise RankMismatchError(
                f"{where}: module `{module}` has rank {rank}, larger than the layer itself "
                f"({out_features} x {in_features}); such an adapter is not a low-rank update."
            )
        _check_dense_terms(adapter, module, b_shape[0], where)


def dtype_name(adapter: object, key: str) -> str:
    """How a tensor's header spells a dtype torch cannot read (e.g. ``'F8_E8M0'``)."""
    store = getattr(adapter, "_store", None)
    return repr(store.dtype_name(key)) if hasattr(store, "dtype_name") else "unknown"


def _check_dense_terms(adapter: AdapterLayout, module: str, out_features: int, where: str) -> None:
    """A module's LoRA bias and DoRA magnitude agree with the config and with the layer's outputs."""
    layout, config = adapter.layout, adapter.config
    terms = (
        ("lora_bias", bias_key(module), module in layout.biases, module not in layout.embeddings),
        ("use_dora", magnitude_key(module), module in layout.magnitudes, True),
    )
    for field, key, present, expected in terms:
        declared = bool(getattr(config, field, False)) and expected
        if present != declared:
            raise AdapterFormatError(
                f"{where}: "
                + (f"tensor `{key}` is present" if present else f"tensor `{key}` is missing")
                + f" but field `{field}` in '{ADAPTER_CONFIG_NAME}' is {str(bool(getattr(config, field))).lower()}"
                + ("" if expected else " (PEFT writes no LoRA bias for embedding layers)")
                + ". Re-save the adapter with PEFT so config and tensors agree."
            )
        if not present:
            continue
        shape, dtype = adapter.tensor_shape(key), adapter.tensor_dtype(key)
        if dtype is None or not dtype.is_floating_point or int(torch.Size(shape).numel()) != out_features:
            raise AdapterFormatError(
                f"{where}: tensor `{key}` has shape {list(shape)} and dtype {dtype}; it must hold one "
                f"floating-point value per output of the layer ({out_features})."
            )


_OWN_DTYPE_SUMS = (torch.bfloat16, torch.float32, torch.float64)
"""Dtypes summed in their own dtype by :func:`sum_is_finite`: a range of float32's or wider."""


def sum_is_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s sum is finite, which proves every value finite (a NaN or Inf propagates);
    ``False`` calls for :func:`finite_values`, since a sum of huge finite values may overflow. One
    reduction: bfloat16 keeps its dtype, whose range is float32's (asking it for a float32 result
    costs a float32 copy); float16 and float8 (small ranges, or no sum of their own) are summed to
    a float32 result."""
    own = tensor.dtype in _OWN_DTYPE_SUMS
    return bool(torch.isfinite(tensor.sum() if own else tensor.sum(dtype=torch.float32)))


def reducible(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or widened to float32 when it is float8: torch has no ``isfinite``,
    ``sum`` or ``aminmax`` of its own for float8."""
    return tensor if tensor.dtype in (*_OWN_DTYPE_SUMS, torch.float16) else tensor.float()


def finite_values(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite`` of every value, whatever the float dtype (:func:`reducible`)."""
    return torch.isfinite(reducible(tensor))


def non_finite_count(tensor: torch.Tensor) -> int:
    """How many values of ``tensor`` are NaN or Inf: one sum when there are none
    (:func:`sum_is_finite`), every value only when the sum is not finite (it may overflow)."""
    return 0 if sum_is_finite(tensor) else int((~finite_values(tensor)).sum())


def check_finite(tensor: torch.Tensor, where: str, key: str) -> None:
    """Refuse NaN or Inf in a client's tensor."""
    if bad := non_finite_count(tensor):
        raise NonFiniteTensorError(
            f"{where}: tensor `{key}` holds {bad} NaN/Inf value(s). The client's training diverged; "
            "drop this client from the round or lower its learning rate."
        )


def _first_difference(reference: Sequence[str], other: Sequence[str]) -> str:
    only_ref = sorted(set(reference) - set(other))
    only_other = sorted(set(other) - set(reference))
    parts = []
    if only_ref:
        parts.append(f"missing {only_ref[:3]}{' ...' if len(only_ref) > 3 else ''}")
    if only_other:
        parts.append(f"extra {only_other[:3]}{' ...' if len(only_other) > 3 else ''}")
    return ", ".join(parts)


def _shape(shape: Sequence[int], rank_axis: int = 0) -> str:
    """A factor's shape with its rank axis shown as ``r`` (ranks may differ between clients)."""
    return "[" + ", ".join("r" if i == rank_axis else str(d) for i, d in enumerate(shape)) + "]"


def check_compatible(adapters: Sequence[AdapterLayout], check_base_model: bool = True) -> None:
    """All adapters adapt the same base model, the same modules, with the same layer shapes.

    Raises:
        IncompatibleAdaptersError: naming the first client that differs from client 0 and how.
    """
    ref = adapters[0]
    for other in adapters[1:]:
        if check_base_model and (ref.config.base_model_name_or_path or None) != (
            other.config.base_model_name_or_path or None
        ):
            raise IncompatibleAdaptersError(
                f"{other.label}, file '{ADAPTER_CONFIG_NAME}': field `base_model_name_or_path` is "
                f"{other.config.base_model_name_or_path!r} but {ref.label} has {ref.config.base_model_name_or_path!r}. "
                "Adapters of different base models cannot be merged (pass `check_base_model=False` if the "
                "names differ but the weights are the same)."
            )
        if ref.modules != other.modules:
            raise IncompatibleAdaptersError(
                f"{other.label}: adapts different target modules than {ref.label} "
                f"({_first_difference(ref.modules, other.modules)}). All clients must use the same `target_modules`."
            )
        for module in ref.modules:
            (ra, rb), (oa, ob) = ref.factor_shapes(module), other.factor_shapes(module)
            if ra[1:] != oa[1:] or rb[0] != ob[0] or rb[2:] != ob[2:]:
                raise IncompatibleAdaptersError(
                    f"{other.label}: module `{module}` has layer shape A {_shape(oa)} and B {_shape(ob, 1)} but {ref.label} "
                    f"has A {_shape(ra)} and B {_shape(rb, 1)}. The adapters were trained on different architectures."
                )
        for kind, field in (("biases", "lora_bias"), ("magnitudes", "use_dora"), ("embeddings", None)):
            if getattr(ref.layout, kind) != getattr(other.layout, kind):
                what = f"`{field}`" if field else "which modules are embedding layers"
                raise IncompatibleAdaptersError(
                    f"{other.label}: {what} differs from {ref.label} "
                    f"({_first_difference(sorted(getattr(ref.layout, kind)), sorted(getattr(other.layout, kind)))}). "
                    "Train every client with the same LoRA kind (`use_dora`, `lora_bias`, `target_modules`)."
                )
        if ref.extras != other.extras:
            raise IncompatibleAdaptersError(
                f"{other.label}: its `modules_to_save` tensors differ from {ref.label}'s "
                f"({_first_difference(ref.extras, other.extras)})."
            )
        for key in ref.extras:
            if ref.tensor_shape(key) != other.tensor_shape(key):
                raise IncompatibleAdaptersError(
                    f"{other.label}: tensor `{key}` has shape {list(other.tensor_shape(key))} but {ref.label} has "
                    f"{list(ref.tensor_shape(key))} (e.g. a classification head with another number of labels)."
                )
