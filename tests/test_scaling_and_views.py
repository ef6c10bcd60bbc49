"""alpha/r and rsLoRA scale folding, checked against the updates PEFT itself applies (merge_and_unload)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from testing_utils import tiny_bert

from hf_fedlora import LoraAdapter, aggregate_adapters

QUERY0 = "base_model.model.bert.encoder.layer.0.attention.self.query"


def peft_deltas(folder) -> dict[str, torch.Tensor]:
    """dW of every adapted Linear, as PEFT applies it: merged weight minus base weight."""
    base = dict(tiny_bert().named_parameters())
    merged = PeftModel.from_pretrained(tiny_bert(), str(folder)).merge_and_unload()
    deltas = {}
    for name, param in merged.named_parameters():
        if name.endswith(("query.weight", "value.weight")):
            deltas["base_model.model." + name[: -len(".weight")]] = (param - base[name]).double()
    return deltas


def test_lone_client_round_trips_through_to_rank(make_adapter):
    folder = make_adapter("solo", 4, 16, seed=7)
    original = LoraAdapter.from_pretrained(folder)
    view = aggregate_adapters([folder]).to_rank(4, lora_alpha=16)
    assert view.config.r == 4 and view.config.lora_alpha == 16
    for module in original.modules:
        for got, want in zip(view.lora_factors(module), original.lora_factors(module)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "client_kwargs",
    [
        [dict(r=4, lora_alpha=8), dict(r=8, lora_alpha=64)],  # mixed alphas
        [dict(r=4, lora_alpha=8, use_rslora=True), dict(r=16, lora_alpha=16)],  # rsLoRA beside plain
        [  # per-module rank and alpha patterns
            dict(
                r=4,
                lora_alpha=8,
                rank_pattern={"layer.1.attention.self.query": 2},
                alpha_pattern={"value": 32},
            ),
            dict(r=6, lora_alpha=6),
        ],
    ],
    ids=["mixed-alpha", "rslora", "patterns"],
)
def test_scales_are_folded_per_module(client_kwargs, tmp_path):
    from testing_utils import write_peft_adapter

    folders = [write_peft_adapter(tmp_path / f"c{i}", seed=i + 1, **kw) for i, kw in enumerate(client_kwargs)]
    expected = [peft_deltas(f) for f in folders]
    for folder, deltas in zip(folders, expected):
        adapter = LoraAdapter.from_pretrained(folder)
        for module, delta in deltas.items():
            torch.testing.assert_close(adapter.delta_weight(module).double(), delta, rtol=1e-4, atol=1e-6)
    merged = aggregate_adapters(folders, strategy="stacking", weights=[1, 3])
    for module in expected[0]:
        want = 0.25 * expected[0][module] + 0.75 * expected[1][module]
        torch.testing.assert_close(merged.delta_weight(module).double(), want, rtol=1e-4, atol=1e-6)


def test_global_adapter_states_scale_one_and_views_unfold_to_client_alpha(make_adapter):
    merged = aggregate_adapters([make_adapter("a", 2, 4, seed=1), make_adapter("b", 8, 32, seed=2)])
    assert all(merged.scale(m) == 1.0 for m in merged.modules)
    for rank, alpha, rslora in [(2, 4, False), (8, 16, False), (8, 8, True)]:
        view = merged.to_rank(rank, lora_alpha=alpha, use_rslora=rslora)
        a, b = merged.folded_factors(QUERY0)
        want = b[:, :rank] @ a[:rank]
        torch.testing.assert_close(view.delta_weight(QUERY0), want, rtol=1e-5, atol=1e-6)


def test_to_rank_svd_keeps_the_best_low_rank_approximation(make_adapter):
    merged = aggregate_adapters(
        [make_adapter("a", 4, 8, seed=1), make_adapter("b", 8, 8, seed=2)], strategy="stacking"
    )
    view = merged.to_rank(3, lora_alpha=6, method="svd")
    u, s, vh = torch.linalg.svd(merged.delta_weight(QUERY0).double())
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(view.delta_weight(QUERY0).double(), best, rtol=1e-4, atol=1e-5)


def test_to_rank_above_module_rank_pads_trainable_slots_without_changing_the_update(make_adapter):
    merged = aggregate_adapters([make_adapter("a", 2, 4, seed=1)])
    view = merged.to_rank(6, lora_alpha=12)
    a, b = view.lora_factors(QUERY0)
    assert a.shape[0] == 6 and b.shape[1] == 6
    assert torch.count_nonzero(a[2:]) > 0  # random A, so the new slots get gradients
    assert torch.count_nonzero(b[:, 2:]) == 0
    torch.testing.assert_close(view.delta_weight(QUERY0), merged.delta_weight(QUERY0), rtol=1e-5, atol=1e-6)


def test_svd_view_of_a_rank_deficient_update_keeps_every_slot_trainable(make_adapter):
    """An SVD view of an update of rank k < r has r - k zero singular values; those slots must come
    out as PEFT's initialisation (random A, zero B), not A = B = 0, from which LoRA never trains."""
    untrained = LoraAdapter.from_pretrained(make_adapter("a", 4, 8, seed=1)).to_rank(4, lora_alpha=8)
    state = untrained.state_dict()
    zero_b = {k: (torch.zeros_like(v) if k.endswith("lora_B.weight") else v) for k, v in state.items()}
    fresh = LoraAdapter.from_state_dict(untrained.config, zero_b)  # like round 0: random A, B = 0
    partial = aggregate_adapters([make_adapter("b", 2, 4, seed=2)]).to_rank(4, lora_alpha=4)  # rank 2 of 4

    for adapter, rank_of_update in [(fresh, 0), (partial, 2)]:
        view = adapter.to_rank(3, lora_alpha=6, method="svd", seed=5)
        for module in view.modules:
            a, b = view.lora_factors(module)
            assert a.shape[0] == 3
            assert bool((a.abs().sum(dim=1) > 0).all()), f"{module}: a slot with A = 0"
            assert bool((b[:, rank_of_update:] == 0).all())
            assert (
                float(a[rank_of_update:].abs().max()) <= 1.0 / a.shape[1] ** 0.5
            )  # PEFT's kaiming-uniform bound
            u, s, vh = torch.linalg.svd(adapter.delta_weight(module).double())
            best = (u[:, :3] * s[:3]) @ vh[:3]
            torch.testing.assert_close(view.delta_weight(module).double(), best, rtol=1e-4, atol=1e-6)
