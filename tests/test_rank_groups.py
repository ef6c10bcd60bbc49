"""The running-sum rules' module loop: clients read in chunks of one rank into reused buffers,
with or without a helper thread (``hf_fedlora.rank_groups``)."""

from __future__ import annotations

import threading

import pytest
import torch

import hf_fedlora.rank_groups as rank_groups
from hf_fedlora import AdapterFormatError, LoraAdapter, aggregate_adapters

RANKS = [(2, 4), (8, 8), (2, 2), (4, 16), (8, 32), (4, 4)]


@pytest.fixture
def clients(make_adapter):
    return [make_adapter(f"c{i}", r, alpha, seed=i) for i, (r, alpha) in enumerate(RANKS)]


def zero_padding_reference(folders, weights) -> dict[str, torch.Tensor]:
    """``sum_k p_k pad(sqrt(s_k) A_k)`` (and B) per module, in float64, from each client's own
    folded factors: the rule computed without the library's loop."""
    adapters = [LoraAdapter.from_pretrained(f) for f in folders]
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    out = {}
    for module in adapters[0].modules:
        rank = max(a.factor_shapes(module)[0][0] for a in adapters)
        for k, adapter in enumerate(adapters):
            a, b = (t.double() for t in adapter.folded_factors(module))
            out.setdefault(module + "/a", torch.zeros(rank, a.shape[1], dtype=torch.float64))[
                : a.shape[0]
            ] += p[k] * a
            out.setdefault(module + "/b", torch.zeros(b.shape[0], rank, dtype=torch.float64))[
                :, : a.shape[0]
            ] += p[k] * b
    return out


def merged_factors(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    out = {}
    for module in adapter.modules:
        a, b = adapter.folded_factors(module)
        out[module + "/a"], out[module + "/b"] = a.double(), b.double()
    return out


@pytest.mark.parametrize("chunk_elements", [1, 1 << 22])
def test_chunks_of_any_size_give_the_rule(clients, monkeypatch, chunk_elements) -> None:
    """One client per chunk or whole rank groups, read ahead: the float64 reference."""
    monkeypatch.setattr(rank_groups, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(rank_groups, "MIN_CHUNK_BYTES", 0)
    reads = []
    original = rank_groups.read_stacks
    monkeypatch.setattr(rank_groups, "read_stacks", lambda *args: reads.append(args[2]) or original(*args))
    weights = [1.0, 3.0, 0.5, 2.0, 1.5, 1.0]
    merged = aggregate_adapters(
        clients, "zero_padding", weights=weights, record_sha256=False, dtype=torch.float32
    )
    want = zero_padding_reference(clients, weights)
    got = merged_factors(merged)
    assert reads and max(map(len, reads)) == (1 if chunk_elements == 1 else 2)  # the chunked path ran
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_clients_stored_in_different_dtypes_are_merged_in_float32(clients, tmp_path) -> None:
    """A chunk whose clients store their factors in bf16 and float32 is converted client by client."""
    mixed = [
        LoraAdapter.from_pretrained(f).save_pretrained(tmp_path / f"mixed{i}", dtype=dtype)
        for i, (f, dtype) in enumerate(zip(clients, [torch.bfloat16, torch.float32] * 3))
    ]
    merged = aggregate_adapters(mixed, "zero_padding", dtype=torch.float32)
    want = zero_padding_reference(mixed, [1.0] * len(mixed))
    got = merged_factors(merged)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_a_failed_read_on_the_helper_thread_names_the_client_and_stops_the_thread(
    clients, monkeypatch
) -> None:
    monkeypatch.setattr(rank_groups, "MIN_CHUNK_BYTES", 0)
    bad = LoraAdapter.from_pretrained(clients[3])
    original = bad.lora_factors
    calls = []

    def failing(module, **kwargs):
        calls.append(module)
        if len(calls) == 3:  # the third module: the merge is under way
            raise AdapterFormatError(f"{bad.where}: the file ended early")
        return original(module, **kwargs)

    monkeypatch.setattr(bad, "lora_factors", failing)
    sources = [*clients[:3], bad, *clients[4:]]
    with pytest.raises(
        AdapterFormatError, match=r"c3, file 'adapter_model.safetensors': the file ended early"
    ):
        aggregate_adapters(sources, "replication", record_sha256=False)
    assert not [t for t in threading.enumerate() if t.name == "hf-fedlora-read"]


@pytest.mark.parametrize("stored_in_memory", [False, True])
def test_factors_read_into_given_buffers_are_views_of_them(clients, stored_in_memory) -> None:
    adapter = LoraAdapter.from_pretrained(clients[1])
    if stored_in_memory:
        adapter = LoraAdapter.from_state_dict(adapter.config, adapter.state_dict(), label="in memory")
    module = adapter.modules[0]
    want = adapter.lora_factors(module)
    a_out, b_out = (torch.zeros(t.numel() * t.element_size(), dtype=torch.uint8) for t in want)
    got = adapter.lora_factors(module, out=(a_out, b_out))
    for tensor, buffer, expected in zip(got, (a_out, b_out), want):
        assert tensor.data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="bytes"):
        adapter.lora_factors(module, out=(a_out[:-1], b_out))


def test_a_failed_store_on_the_merging_thread_stops_the_helper(clients, monkeypatch) -> None:
    """The merged module overflows float16 while the helper reads ahead: the error names the
    module and the helper thread is gone when aggregate_adapters returns."""
    from hf_fedlora import NonFiniteTensorError

    monkeypatch.setattr(rank_groups, "MIN_CHUNK_BYTES", 0)
    big = []
    for i, folder in enumerate(clients):
        adapter = LoraAdapter.from_pretrained(folder)
        state = {k: v * 1e6 if ".lora_" in k else v for k, v in adapter.state_dict().items()}
        big.append(LoraAdapter.from_state_dict(adapter.config, state, label=f"big{i}"))
    with pytest.raises(NonFiniteTensorError, match="merged module"):
        aggregate_adapters(big, "zero_padding", dtype=torch.float16, record_sha256=False)
    assert not [t for t in threading.enumerate() if t.name == "hf-fedlora-read"]


def test_out_must_be_a_contiguous_uint8_buffer(clients) -> None:
    adapter = LoraAdapter.from_pretrained(clients[0])
    module = adapter.modules[0]
    a, b = adapter.lora_factors(module)
    nbytes = a.numel() * a.element_size(), b.numel() * b.element_size()
    with pytest.raises(ValueError, match="uint8"):
        adapter.lora_factors(
            module, out=(torch.zeros(nbytes[0] // 4), torch.zeros(nbytes[1], dtype=torch.uint8))
        )
    with pytest.raises(ValueError, match="contiguous"):
        spread = torch.zeros(2 * nbytes[0], dtype=torch.uint8)[::2]
        adapter.lora_factors(module, out=(spread, torch.zeros(nbytes[1], dtype=torch.uint8)))
