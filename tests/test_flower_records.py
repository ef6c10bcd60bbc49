"""LoraAdapter <-> Flower ArrayRecord/ConfigRecord: lossless round trips, and clear refusals."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord  # noqa: E402

from hf_fedlora import AdapterError, LoraAdapter, NonFiniteTensorError, RankMismatchError, aggregate_adapters  # noqa: E402
from hf_fedlora.flower import adapter_from_records, adapter_to_records, array_to_tensor, tensor_to_array  # noqa: E402
from hf_fedlora.flower.records import CONFIG_JSON_KEY, MODULES_KEY, NUM_EXAMPLES_KEY, RANK_KEY  # noqa: E402


def _assert_identical(a: LoraAdapter, b: LoraAdapter) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) or sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert sa[key].shape == sb[key].shape, key
        # compare bits, so -0.0 vs 0.0 or NaN payloads would show
        assert torch.equal(sa[key].view(torch.uint8), sb[key].view(torch.uint8)), key
    assert a.config.to_dict() == b.config.to_dict()
    assert a.modules == b.modules and a.extras == b.extras


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4, lora_alpha=8),
        dict(r=8, lora_alpha=16, use_rslora=True),
        dict(r=4, lora_alpha=8, rank_pattern={"query": 2}, alpha_pattern={"query": 5}),
    ],
)
def test_peft_adapter_round_trips_bit_identical(make_adapter, kwargs) -> None:
    adapter = LoraAdapter.from_pretrained(make_adapter("client", seed=3, **kwargs))
    assert adapter.extras, "the SEQ_CLS fixture carries a classifier head (modules_to_save)"
    arrays, config = adapter_to_records(adapter, num_examples=123)
    back = adapter_from_records(arrays, config)
    _assert_identical(adapter, back)
    assert back.num_examples == 123
    assert config[RANK_KEY] == kwargs["r"] and config[MODULES_KEY] == list(adapter.modules)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_round_trips_bit_identical(make_adapter, dtype) -> None:
    adapter = LoraAdapter.from_pretrained(make_adapter("client", r=4, seed=1))
    cast = LoraAdapter.from_state_dict(
        adapter.config, {k: v.to(dtype) for k, v in adapter.state_dict().items()}
    )
    _assert_identical(cast, adapter_from_records(*adapter_to_records(cast)))


def test_global_adapter_with_rank_pattern_round_trips(make_adapter) -> None:
    clients = [make_adapter(f"c{r}", r=r, lora_alpha=2 * r, seed=r) for r in (2, 4, 8)]
    global_adapter = aggregate_adapters(clients, strategy="stacking")
    _assert_identical(global_adapter, adapter_from_records(*adapter_to_records(global_adapter)))


def test_tensor_array_round_trip_keeps_special_values() -> None:
    x = torch.tensor([[0.0, -0.0, 1e-40, -3.5], [65504.0, 1.0 / 3.0, math.pi, -1e30]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = x.to(dtype)
        back = array_to_tensor(tensor_to_array(t))
        assert back.dtype == dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def _records(make_adapter, r: int = 4):
    adapter = LoraAdapter.from_pretrained(make_adapter("client", r=r, seed=2))
    arrays, config = adapter_to_records(adapter)
    return adapter, arrays, config


def test_missing_rank_is_refused_with_the_field_named(make_adapter) -> None:
    _, arrays, config = _records(make_adapter)
    del config[RANK_KEY]
    with pytest.raises(AdapterError, match=r"reply from node 7: the ConfigRecord has no `lora-r`"):
        adapter_from_records(arrays, config, label="reply from node 7")


def test_wrong_shape_is_refused_with_the_tensor_named(make_adapter) -> None:
    adapter, arrays, config = _records(make_adapter)
    key = f"{adapter.modules[0]}.lora_A.weight"
    arrays[key] = tensor_to_array(torch.zeros(3, adapter.tensor_shape(key)[1]))  # rank 3, config says 4
    with pytest.raises(RankMismatchError, match=r"node 7.*hold rank 3/4 but .* declares rank 4"):
        adapter_from_records(arrays, config, label="reply from node 7")


def test_nan_is_refused_with_the_tensor_named(make_adapter) -> None:
    adapter, arrays, config = _records(make_adapter)
    key = f"{adapter.modules[1]}.lora_B.weight"
    bad = array_to_tensor(arrays[key])
    bad[0, 0] = float("nan")
    arrays[key] = tensor_to_array(bad)
    with pytest.raises(NonFiniteTensorError, match=rf"node 7: tensor `{key}` holds 1 NaN/Inf"):
        adapter_from_records(arrays, config, label="reply from node 7")


def test_module_list_must_match_the_tensors(make_adapter) -> None:
    adapter, arrays, config = _records(make_adapter)
    del arrays[f"{adapter.modules[0]}.lora_B.weight"]
    with pytest.raises(AdapterError, match=r"`lora-modules` lists 4 modules but the ArrayRecord lacks"):
        adapter_from_records(arrays, config)


@pytest.mark.parametrize(
    "key, value, message",
    [
        (CONFIG_JSON_KEY, "{not json", "is not valid JSON"),
        (RANK_KEY, 4.0, "`lora-r` must be int"),
        (NUM_EXAMPLES_KEY, -3, "`lora-num-examples` must be a non-negative int"),
    ],
)
def test_bad_fields_are_refused(make_adapter, key, value, message) -> None:
    _, arrays, config = _records(make_adapter)
    config[key] = value
    with pytest.raises(AdapterError, match=message):
        adapter_from_records(arrays, config)


def test_records_are_flower_types(make_adapter) -> None:
    _, arrays, config = _records(make_adapter)
    assert isinstance(arrays, ArrayRecord) and isinstance(config, ConfigRecord)
    # standard Flower/numpy tooling can read float32 arrays as they are
    assert all(a.stype == "numpy.ndarray" for a in arrays.values())
