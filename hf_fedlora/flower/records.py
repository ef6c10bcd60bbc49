"""Conversion between a ``LoraAdapter`` and Flower's records.

An adapter travels as two records: an ``ArrayRecord`` holding its tensors under PEFT's own keys
(``...lora_A.weight``, ``...lora_B.weight``, ``modules_to_save`` tensors), and a ``ConfigRecord``
holding what the tensors alone do not say::

    lora-r             int        the adapter's rank (``LoraConfig.r``)
    lora-alpha         float      ``LoraConfig.lora_alpha``
    lora-use-rslora    bool       ``LoraConfig.use_rslora``
    lora-modules       list[str]  LoRA module names (PEFT keys without ``.lora_A.weight``)
    lora-num-examples  int        training examples behind the adapter (when known)
    lora-config        str        the full ``LoraConfig`` as JSON (target modules, rank/alpha patterns, ...)

The conversion is lossless: tensors keep their dtype (``bfloat16`` included) and bytes, so
``adapter_from_records(*adapter_to_records(a))`` has the same state dict and config as ``a``.
Decoding checks everything a client could get wrong (missing fields, shapes that contradict the
declared rank, NaN/Inf) and raises an ``AdapterError`` that names the sender and the field.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from peft import LoraConfig

from ..adapters import LoraAdapter
from ..adapters.keys import lora_a_key, lora_b_key
from ..adapters.validate import check_finite, lora_config_from_dict
from ..errors import AdapterFormatError

RANK_KEY = "lora-r"
ALPHA_KEY = "lora-alpha"
RSLORA_KEY = "lora-use-rslora"
MODULES_KEY = "lora-modules"
NUM_EXAMPLES_KEY = "lora-num-examples"
CONFIG_JSON_KEY = "lora-config"
ADAPTER_CONFIG_KEYS = (RANK_KEY, ALPHA_KEY, RSLORA_KEY, MODULES_KEY, NUM_EXAMPLES_KEY, CONFIG_JSON_KEY)

# numpy has no bfloat16: such tensors travel as their raw bytes under this serialisation type.
_RAW_STYPE = "hf_fedlora.torch.raw"
_RAW_DTYPES = {"bfloat16": torch.bfloat16}


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot serialise {type(value).__name__} in a LoraConfig")


def config_to_json(config: LoraConfig) -> str:
    """``LoraConfig`` as the JSON PEFT writes to ``adapter_config.json`` (sets become sorted lists)."""
    return json.dumps(config.to_dict(), default=_json_default, sort_keys=True)


def tensor_to_array(tensor: torch.Tensor) -> Array:
    """A Flower ``Array`` holding exactly the tensor's bytes; ``bfloat16`` included."""
    tensor = tensor.detach().cpu().contiguous()
    name = str(tensor.dtype).removeprefix("torch.")
    if name in _RAW_DTYPES:
        data = tensor.view(torch.int16).numpy().tobytes()
        return Array(dtype=name, shape=tuple(tensor.shape), stype=_RAW_STYPE, data=data)
    return Array.from_numpy_ndarray(tensor.numpy())


def array_to_tensor(array: Array) -> torch.Tensor:
    """The tensor an ``Array`` holds (a fresh, writable copy)."""
    if array.stype == _RAW_STYPE:
        dtype = _RAW_DTYPES.get(array.dtype)
        if dtype is None:
            raise AdapterFormatError(f"raw array of unsupported dtype {array.dtype!r}")
        if not array.data:
            return torch.empty(array.shape, dtype=dtype)
        return torch.frombuffer(bytearray(array.data), dtype=dtype).reshape(array.shape)
    return torch.from_numpy(np.array(array.numpy(), copy=True))


def adapter_to_records(
    adapter: LoraAdapter, num_examples: int | None = None
) -> tuple[ArrayRecord, ConfigRecord]:
    """Encode an adapter for a Flower ``Message``.

    Args:
        adapter: the adapter to send.
        num_examples: training examples behind it (default: ``adapter.num_examples``, when known).

    Returns:
        ``(arrays, config)``: its tensors under PEFT's keys, and the fields listed in this module's
        docstring.
    """
    arrays = ArrayRecord()
    for key, tensor in sorted(adapter.state_dict().items()):
        arrays[key] = tensor_to_array(tensor)
    cfg = adapter.config
    config = ConfigRecord(
        {
            RANK_KEY: int(cfg.r),
            ALPHA_KEY: float(cfg.lora_alpha),
            RSLORA_KEY: bool(cfg.use_rslora),
            MODULES_KEY: list(adapter.modules),
            CONFIG_JSON_KEY: config_to_json(cfg),
        }
    )
    count = adapter.num_examples if num_examples is None else num_examples
    if count is not None:
        config[NUM_EXAMPLES_KEY] = int(count)
    return arrays, config


def _required(config: ConfigRecord, key: str, types: tuple[type, ...], where: str) -> Any:
    if key not in config:
        raise AdapterFormatError(
            f"{where}: the ConfigRecord has no `{key}`. Build replies with "
            "`hf_fedlora.flower.adapter_to_records(adapter)` so rank and alpha travel with the tensors."
        )
    value = config[key]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise AdapterFormatError(
            f"{where}: field `{key}` must be {'/'.join(t.__name__ for t in types)}, got {value!r}."
        )
    return value


def adapter_from_records(
    arrays: ArrayRecord,
    config: ConfigRecord,
    *,
    label: str = "Flower message",
    check_finite_values: bool = True,
) -> LoraAdapter:
    """Decode an adapter sent with :func:`adapter_to_records`.

    Args:
        arrays: its tensors under PEFT's keys.
        config: its ``lora-*`` fields (other keys are ignored).
        label: how error messages name the sender, e.g. ``"reply from node 42"``.
        check_finite_values: refuse NaN/Inf tensors now rather than when they are first read.

    Returns:
        An in-memory ``LoraAdapter`` (``num_examples`` set when the record carries it).

    Raises:
        AdapterFormatError: a missing or mistyped field, module names that do not match the tensors,
            or an undecodable array. ``RankMismatchError``: tensors whose shape contradicts the rank.
        NonFiniteTensorError: a tensor holding NaN or Inf.
    """
    rank = _required(config, RANK_KEY, (int,), label)
    alpha = _required(config, ALPHA_KEY, (int, float), label)
    use_rslora = _required(config, RSLORA_KEY, (bool,), label)
    modules = _required(config, MODULES_KEY, (list,), label)
    try:
        data = json.loads(_required(config, CONFIG_JSON_KEY, (str,), label))
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{label}: field `{CONFIG_JSON_KEY}` is not valid JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise AdapterFormatError(
            f"{label}: field `{CONFIG_JSON_KEY}` must be a JSON object, got {type(data).__name__}."
        )
    data.update(r=rank, lora_alpha=alpha, use_rslora=use_rslora)
    lora_config = lora_config_from_dict(data, label)

    expected = {k for m in modules for k in (lora_a_key(m), lora_b_key(m))}
    missing = sorted(expected - set(arrays.keys()))
    if missing:
        raise AdapterFormatError(
            f"{label}: field `{MODULES_KEY}` lists {len(modules)} modules but the ArrayRecord lacks "
            f"{missing[:3]}{' ...' if len(missing) > 3 else ''}."
        )
    state: dict[str, torch.Tensor] = {}
    for key in arrays.keys():
        try:
            state[key] = array_to_tensor(arrays[key])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise AdapterFormatError(f"{label}: array `{key}` cannot be decoded ({exc}).") from exc
        if check_finite_values and state[key].is_floating_point():
            check_finite(state[key], label, key)
    adapter = LoraAdapter.from_state_dict(lora_config, state, label=label)
    if set(adapter.modules) != set(modules):
        extra = sorted(set(adapter.modules) - set(modules))
        raise AdapterFormatError(
            f"{label}: the ArrayRecord holds LoRA modules not listed in `{MODULES_KEY}`: {extra[:3]}."
        )
    if NUM_EXAMPLES_KEY in config:
        count = config[NUM_EXAMPLES_KEY]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise AdapterFormatError(
                f"{label}: field `{NUM_EXAMPLES_KEY}` must be a non-negative int, got {count!r}."
            )
        adapter.num_examples = count
    return adapter


__all__ = [
    "ADAPTER_CONFIG_KEYS",
    "ALPHA_KEY",
    "CONFIG_JSON_KEY",
    "MODULES_KEY",
    "NUM_EXAMPLES_KEY",
    "RANK_KEY",
    "RSLORA_KEY",
    "adapter_from_records",
    "adapter_to_records",
    "array_to_tensor",
    "config_to_json",
    "tensor_to_array",
]
