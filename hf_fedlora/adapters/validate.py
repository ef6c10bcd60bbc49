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
from .keys import lora_a_key, lora_b_key
from .scaling import declared_rank_alpha


class AdapterLayout(Protocol):
    """What these checks read of a ``LoraAdapter``: its config and tensor headers, never its data."""

    label: str
    config: LoraConfig
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
    if data.get("use_dora"):
        raise UnsupportedAdapterError(
            f"{where}, file '{ADAPTER_CONFIG_NAME}': field `use_dora` is true; DoRA magnitudes cannot be "
            "merged across ranks. Train with `use_dora=False`."
        )
    if data.get("lora_bias"):
        raise UnsupportedAdapterError(
            f"{where}, file '{ADAPTER_CONFIG_NAME}': field `lora_bias` is true; LoRA biases are not supported."
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
        for key, shape, dtype in (
            (lora_a_key(module), a_shape, adapter.tensor_dtype(lora_a_key(module))),
            (lora_b_key(module), b_shape, adapter.tensor_dtype(lora_b_key(module))),
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
                f"{where}: tensors `{lora_a_key(module)}` {list(a_shape)} and `{lora_b_key(module)}` {list(b_shape)} "
                f"hold rank {a_shape[0]}/{b_shape[1]} but '{ADAPTER_CONFIG_NAME}' declares rank {rank} for this module "
                "(`r`/`rank_pattern`). Re-save the adapter with PEFT so config and tensors agree."
            )
        in_features = int(torch.Size(a_shape[1:]).numel())
        if rank > min(b_shape[0], in_features):
            raise RankMismatchError(
                f"{where}: module `{module}` has rank {rank}, larger than the layer itself "
                f"({b_shape[0]} x {in_features}); such an adapter is not a low-rank update."
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
