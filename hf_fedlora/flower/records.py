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

import torch
from flwr.app import ArrayRecord, ConfigRecord
from peft import LoraConfig

from ..adapters import LoraAdapter
from ..adapters.keys import lora_a_key, lora_b_key
from ..adapters.validate import check_finite, layer_size, lora_config_from_dict
from ..constants import MAX_JSON_BYTES, MAX_JSON_DEPTH
from ..errors import AdapterFormatError, RankMismatchError
from ..files import json_nesting
from .arrays import array_to_tensor, declared_shape, tensor_to_array

RANK_KEY = "lora-r"
ALPHA_KEY = "lora-alpha"
RSLORA_KEY = "lora-use-rslora"
MODULES_KEY = "lora-modules"
NUM_EXAMPLES_KEY = "lora-num-examples"
CONFIG_JSON_KEY = "lora-config"
ADAPTER_CONFIG_KEYS = (RANK_KEY, ALPHA_KEY, RSLORA_KEY, MODULES_KEY, NUM_EXAMPLES_KEY, CONFIG_JSON_KEY)


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot serialise {type(value).__name__} in a LoraConfig")


def config_to_json(config: LoraConfig) -> str:
    """``LoraConfig`` as the JSON PEFT writes to ``adapter_config.json`` (sets become sorted lists)."""
    return json.dumps(config.to_dict(), default=_json_default, sort_keys=True)


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


def _int_text(value: int) -> str:
    """An int for an error message (Python refuses to print one of more than 4,300 digits)."""
    return str(value) if abs(value) < 10**18 else f"an integer of {value.bit_length()} bits"


def layer_shapes(reference: LoraAdapter) -> dict[str, tuple[tuple[int, ...], int | None, int]]:
    """Every tensor a reply may hold, from the adapter it was trained from:
    ``{key: (shape in the reference, the rank dimension or None, the layer's largest rank)}``."""
    shapes: dict[str, tuple[tuple[int, ...], int | None, int]] = {}
    layout = reference.layout
    for module in reference.modules:
        (a_key, b_key), (a_shape, b_shape) = layout.factor_keys(module), reference.factor_shapes(module)
        largest = min(layer_size(a_shape, b_shape))
        shapes[a_key], shapes[b_key] = (a_shape, 0, largest), (b_shape, 1, largest)
        for key in layout.lora_keys(module)[2:]:
            shapes[key] = (tuple(reference.tensor_shape(key)), None, 0)
    for key in reference.extras:
        shapes[key] = (tuple(reference.tensor_shape(key)), None, 0)
    return shapes


def check_shapes(
    arrays: ArrayRecord, rank: int, reference: LoraAdapter, label: str = "Flower message"
) -> None:
    """Refuse, before decoding anything, a reply whose ``lora-r`` or declared array shapes do not fit
    the layers of ``reference`` (the global adapter it was trained from): unknown tensors, other layer
    dimensions, or a rank larger than the layer itself.

    Raises:
        AdapterFormatError, RankMismatchError: naming ``label`` and the field or array.
    """
    shapes = layer_shapes(reference)
    largest = max(bound for _, _, bound in shapes.values())
    if rank > largest:
        raise RankMismatchError(
            f"{label}: field `{RANK_KEY}` is {_int_text(rank)}, larger than every layer of the global adapter "
            f"(the largest rank a layer can hold is {largest}); refusing the reply before decoding it."
        )
    for key in arrays.keys():
        if key not in shapes:
            raise AdapterFormatError(
                f"{label}: array `{key:.200}` is not a tensor of the global adapter (its LoRA modules and "
                "modules_to_save)."
            )
        shape = declared_shape(arrays[key], f"{label}: array `{key}`")
        expected, rank_dim, bound = shapes[key]
        other = [d for i, d in enumerate(shape) if i != rank_dim]
        if len(shape) != len(expected) or other != [d for i, d in enumerate(expected) if i != rank_dim]:
            module = key.rsplit(".", 2)[0]
            layer = ", ".join("r" if i == rank_dim else str(d) for i, d in enumerate(expected))
            raise AdapterFormatError(
                f"{label}: array `{key}` declares shape {list(shape)}, but module `{module}` has layer shape "
                f"[{layer}] for this array in the global adapter (r: the rank)."
            )
        if rank_dim is not None and not 1 <= shape[rank_dim] <= bound:
            raise RankMismatchError(
                f"{label}: array `{key}` declares rank {shape[rank_dim]}; its layer holds rank 1 to {bound}."
            )


def _config_json(config: ConfigRecord, label: str) -> dict[str, Any]:
    text = _required(config, CONFIG_JSON_KEY, (str,), label)
    if len(text) > MAX_JSON_BYTES:
        raise AdapterFormatError(
            f"{label}: field `{CONFIG_JSON_KEY}` is {len(text):,} characters, over the limit of "
            f"{MAX_JSON_BYTES:,}; a LoraConfig is a few kilobytes."
        )
    if json_nesting(text) > MAX_JSON_DEPTH:
        raise AdapterFormatError(
            f"{label}: field `{CONFIG_JSON_KEY}` is nested deeper than {MAX_JSON_DEPTH} levels."
        )
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise AdapterFormatError(
            f"{label}: field `{CONFIG_JSON_KEY}` is not valid JSON ({exc!s:.200})."
        ) from exc
    if not isinstance(data, dict):
        raise AdapterFormatError(
            f"{label}: field `{CONFIG_JSON_KEY}` must be a JSON object, got {type(data).__name__}."
        )
    return data


def adapter_from_records(
    arrays: ArrayRecord,
    config: ConfigRecord,
    *,
    label: str = "Flower message",
    check_finite_values: bool = True,
    reference: LoraAdapter | None = None,
) -> LoraAdapter:
    """Decode an adapter sent with :func:`adapter_to_records`.

    Nothing is allocated from what the sender declares before it is checked: each array's declared
    dtype and shape must match its bytes (:func:`~hf_fedlora.flower.arrays.array_to_tensor`), and with
    a ``reference`` its ``lora-r`` and every array's shape must fit the reference's layers
    (:func:`check_shapes`) before the first array is decoded.

    Args:
        arrays: its tensors under PEFT's keys.
        config: its ``lora-*`` fields (other keys are ignored).
        label: how error messages name the sender, e.g. ``"reply from node 42"``.
        check_finite_values: refuse NaN/Inf tensors now rather than when they are first read.
        reference: the adapter the sender trained from (the server: the global adapter of the round).

    Returns:
        An in-memory ``LoraAdapter`` (``num_examples`` set when the record carries it).

    Raises:
        AdapterFormatError: a missing or mistyped field, module names that do not match the tensors,
            or an undecodable array (declared sizes that do not match its bytes, an empty or lying
            ``.npy`` buffer). ``RankMismatchError``: tensors whose shape contradicts the rank, or a
            rank larger than the reference's layers. NonFiniteTensorError: a tensor holding NaN or Inf.
    """
    rank = _required(config, RANK_KEY, (int,), label)
    alpha = _required(config, ALPHA_KEY, (int, float), label)
    use_rslora = _required(config, RSLORA_KEY, (bool,), label)
    modules = _required(config, MODULES_KEY, (list,), label)
    if rank < 1:
        raise AdapterFormatError(
            f"{label}: field `{RANK_KEY}` must be a positive int, got {_int_text(rank)}."
        )
    if reference is not None:
        check_shapes(arrays, rank, reference, label)
    data = _config_json(config, label)
    data.update(r=rank, lora_alpha=alpha, use_rslora=use_rslora)
    lora_config = lora_config_from_dict(data, label)

    if not all(isinstance(m, str) for m in modules):
        raise AdapterFormatError(f"{label}: field `{MODULES_KEY}` must list module names (strings).")
    expected = {k for m in modules for k in (lora_a_key(m), lora_b_key(m))}
    missing = sorted(expected - set(arrays.keys()))
    if missing:
        raise AdapterFormatError(
            f"{label}: field `{MODULES_KEY}` lists {len(modules)} modules but the ArrayRecord lacks "
            f"{missing[:3]}{' ...' if len(missing) > 3 else ''}."
        )
    state: dict[str, torch.Tensor] = {}
    for key in arrays.keys():
        state[key] = array_to_tensor(arrays[key], f"{label}: array `{key:.200}`")
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
    "check_shapes",
    "config_to_json",
    "layer_shapes",
    "tensor_to_array",
]
