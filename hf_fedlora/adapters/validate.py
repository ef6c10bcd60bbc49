"""Checks on one adapter and on a set of adapters; every error names the client, file and field."""

from __future__ import annotations

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
from .scaling import declared_rank_alpha


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
    peft_type = str(data.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{where}, file '{ADAPTER_CONFIG_NAME}': field `peft_type` is {data.get('peft_type')!r}; "
            "hf_fedlora merges LoRA adapters only (`peft_type: LORA`)."
        )
    for field in ("r", "lora_alpha"):
        value = data.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise AdapterFormatError(
                f"{where}, file '{ADAPTER_CONFIG_NAME}': field `{field}` must be a positive number, got {value!r}."
            )
    for field in ("rank_pattern", "alpha_pattern"):
        if data.get(field) is not None and not isinstance(data[field], dict):
            raise AdapterFormatError(
                f"{where}, file '{ADAPTER_CONFIG_NAME}': field `{field}` must be a mapping, got {data[field]!r}."
            )
    try:
        return LoraConfig.from_peft_type(**data)
    except (TypeError, ValueError) as exc:
        raise AdapterFormatError(
            f"{where}, file '{ADAPTER_CONFIG_NAME}': not a valid LoraConfig ({exc})."
        ) from exc


def check_factor_shapes(adapter: AdapterLayout) -> None:
    """Every module's A and B agree with each other and with the rank its config declares.

    Reads tensor headers only, no data.
    """
    where = f"{adapter.label}, file '{ADAPTER_SAFETENSORS_NAME}'"
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
                raise AdapterFormatError(
                    f"{where}: tensor `{key}` has dtype {dtype}; LoRA factors must be floating point."
                )
            if len(shape) < 2:
                raise AdapterFormatError(
                    f"{where}: tensor `{key}` has shape {list(shape)}; LoRA factors are matrices."
                )
        rank, _ = declared_rank_alpha(adapter.config, module)
        if a_shape[0] != rank or b_shape[1] != rank:
            raise RankMismatchError(
                f"{where}: tensors `{a_key}` {list(a_shape)} and `{b_key}` {list(b_shape)} "
                f"hold rank {a_shape[0]}/{b_shape[1]} but '{ADAPTER_CONFIG_NAME}' declares rank {rank} for this module "
                "(`r`/`rank_pattern`). Re-save the adapter with PEFT so config and tensors agree."
            )
        in_features = int(torch.Size(a_shape[1:]).numel())
        if rank > min(b_shape[0], in_features):
            raise RankMismatchError(
                f"{where}: module `{module}` has rank {rank}, larger than the layer itself "
                f"({b_shape[0]} x {in_features}); such an adapter is not a low-rank update."
            )
        _check_dense_terms(adapter, module, b_shape[0], where)


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


def check_finite(tensor: torch.Tensor, where: str, key: str) -> None:
    """Refuse NaN or Inf in a client's tensor."""
    if torch.isfinite(tensor.sum(dtype=torch.float32)):  # one cheap reduction; NaN/Inf propagate
        return
    if not torch.isfinite(tensor).all():  # the sum may overflow on huge finite values
        bad = int((~torch.isfinite(tensor)).sum())
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
                    f"{other.label}: module `{module}` has layer shape {[ob[0], *oa[1:]]} but {ref.label} has "
                    f"{[rb[0], *ra[1:]]}. The adapters were trained on different architectures."
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
