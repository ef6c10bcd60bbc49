"""Zero-padding with revived slots: ``rank_view(..., revive_zero_slots=True)`` gives slots that are
exactly zero (A row and B column) PEFT's initialisation, leaves the update and every other slot as
they were, and a client trained with ``ClientArguments.revive_zero_slots`` trains them again."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_fedlora import aggregate_adapters
from hf_fedlora.adapters import LoraAdapter
from hf_fedlora.adapters.views import rank_view
from hf_fedlora.federation import ClientArguments, LocalTrainer
from hf_fedlora.federation.data import TextSplit

TEXTS = ["the market rallied on strong earnings", "the striker scored twice in the final"] * 8
SHARD = TextSplit(TEXTS, None, np.arange(len(TEXTS)) % 2)


@pytest.fixture(scope="module")
def trainer(tiny_model_dir) -> LocalTrainer:
    return LocalTrainer(str(tiny_model_dir), 2, lora_alpha=8.0, lora_dropout=0.0)


def _with_dead_slots(trainer: LocalTrainer, rank: int = 6, dead: int = 3) -> LoraAdapter:
    """A trained-looking rank-6 adapter whose slots 3..5 are exactly zero: what zero-padding gives
    after a round whose clients all have rank 3 (aggregated here, not built by hand)."""
    start = trainer.initial_adapter(rank, seed=1)
    g = torch.Generator().manual_seed(4)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in start.state_dict().items()}
    full = LoraAdapter.from_state_dict(start.config, state)
    low = full.to_rank(dead, lora_alpha=8.0)
    merged = aggregate_adapters([low, low], strategy="zero_padding", target_rank=rank)
    return merged.to_rank(rank, lora_alpha=8.0)  # the truncate view a rank-6 client gets


def test_revival_inits_only_the_dead_slots_and_keeps_the_update(trainer) -> None:
    view = _with_dead_slots(trainer)
    for module in view.modules:
        a, b = view.lora_factors(module)
        assert not a[3:].any() and not b[:, 3:].any() and a[:3].any()
    revived = rank_view(view, 6, 8.0, seed=7, revive_zero_slots=True)
    plain = rank_view(view, 6, 8.0, seed=7)
    for module in view.modules:
        a, b = view.lora_factors(module)
        ra, rb = revived.lora_factors(module)
        bound = 1 / math.sqrt(a.shape[1])
        assert ra[3:].abs().max() <= bound and (ra[3:] != 0).float().mean() > 0.99  # PEFT's kaiming-uniform A
        assert ra[3:].abs().max() > 0.8 * bound  # spread over the whole interval
        assert not rb[:, 3:].any()  # B zero: the update does not change
        torch.testing.assert_close(ra[:3], a[:3])
        torch.testing.assert_close(rb, b)
        torch.testing.assert_close(revived.delta_weight(module), view.delta_weight(module))
        pa, _ = plain.lora_factors(module)
        assert not pa[3:].any()  # off by default: the dead slots stay dead


def test_a_revived_client_trains_the_dead_slots_again(trainer) -> None:
    view = _with_dead_slots(trainer)
    base = dict(local_steps=3, per_device_train_batch_size=8, learning_rate=1e-2)
    dead, _ = trainer.train(view, 6, SHARD, ClientArguments(**base), seed=2, max_seq_length=16)
    alive, _ = trainer.train(
        view, 6, SHARD, ClientArguments(**base, revive_zero_slots=True), seed=2, max_seq_length=16
    )
    for module in view.modules:
        a, b = dead.lora_factors(module)
        assert not a[3:].any() and not b[:, 3:].any()  # A = B = 0 has no gradient
        a, b = alive.lora_factors(module)
        assert a[3:].any() and b[:, 3:].any()


def test_to_rank_passes_revive_zero_slots_through(trainer) -> None:
    dead = _with_dead_slots(trainer)
    direct = rank_view(dead, 6, 8.0, revive_zero_slots=True, seed=3).state_dict()
    method = dead.to_rank(6, lora_alpha=8.0, revive_zero_slots=True, seed=3).state_dict()
    plain = dead.to_rank(6, lora_alpha=8.0, seed=3).state_dict()
    assert direct.keys() == method.keys()
    assert all(torch.equal(direct[k], method[k]) for k in direct)
    assert any(not torch.equal(plain[k], method[k]) for k in plain)  # the dead slots were revived
