"""Nested-rank local training (ClientArguments.nested_rank): masked slots get no gradient and do not
act, the truncation ranks follow the chosen distribution, and the default (off) trains exactly as
the plain loop written out here does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_fedlora.adapters import LoraAdapter
from hf_fedlora.federation import ClientArguments, LocalTrainer
from hf_fedlora.federation import nested_rank as nr
from hf_fedlora.federation.data import TextSplit

TEXTS = [
    "the market rallied on strong earnings",
    "the striker scored twice in the final",
    "a new chip doubles battery life",
    "talks over the treaty stalled again",
] * 5
SHARD = TextSplit(TEXTS, None, np.arange(len(TEXTS)) % 2)
RANK = 6


@pytest.fixture(scope="module")
def trainer(tiny_model_dir) -> LocalTrainer:
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return LocalTrainer(str(tiny_model_dir), 2, lora_alpha=8.0, lora_dropout=0.0, config_overrides=no_dropout)


def _start(trainer: LocalTrainer) -> LoraAdapter:
    """A rank-6 adapter with B random too (PEFT's B = 0 would give A no gradient at all)."""
    start = trainer.initial_adapter(RANK, seed=1)
    g = torch.Generator().manual_seed(3)
    state = {
        k: torch.randn(v.shape, generator=g) * 0.1 if k.endswith("lora_B.weight") else v
        for k, v in start.state_dict().items()
    }
    return LoraAdapter.from_state_dict(start.config, state)


def _lora(model, name):
    return [m for m in model.modules() if hasattr(m, "lora_A") and name in getattr(m, "lora_A", {})]


def test_masked_slots_have_zero_gradient_and_act_as_if_cut(trainer) -> None:
    name = trainer.load(_start(trainer), RANK)
    model, t = trainer.model, 2
    batch = trainer._batch(SHARD, range(8), 16)
    with nr.NestedRankMask(model, name, RANK, "uniform", seed=0) as mask:
        mask.mask = (torch.arange(RANK) < t).float()
        model.zero_grad()
        model.train()
        loss = model(**batch).loss
        loss.backward()
        masked_logits = model.eval()(**batch).logits.detach()
    modules = _lora(model, name)
    for m in modules:
        ga, gb = m.lora_A[name].weight.grad, m.lora_B[name].weight.grad
        assert torch.count_nonzero(ga[t:]) == 0 and torch.count_nonzero(gb[:, t:]) == 0
        assert torch.count_nonzero(ga[:t]) > 0 and torch.count_nonzero(gb[:, :t]) > 0
    model.zero_grad()
    # reference: the same model with slots >= t zeroed in the weights, no hooks
    saved = [(m.lora_A[name].weight.detach().clone()) for m in modules]
    with torch.no_grad():
        for m in modules:
            m.lora_A[name].weight[t:] = 0
        cut_logits = model(**batch).logits
        for m, w in zip(modules, saved):
            m.lora_A[name].weight.copy_(w)
    torch.testing.assert_close(masked_logits, cut_logits)
    assert not torch.allclose(model(**batch).logits, cut_logits)  # the hooks are gone


def test_truncation_ranks_follow_the_distribution() -> None:
    rng = np.random.default_rng(0)
    uniform = [nr.sample_truncation(rng, 8, "uniform") for _ in range(4000)]
    assert set(uniform) == set(range(1, 9))
    assert abs(np.mean(uniform) - 4.5) < 0.15
    geometric = [nr.sample_truncation(rng, 8, "geometric") for _ in range(4000)]
    assert min(geometric) == 1 and max(geometric) == 8
    # P(t = 1) = p = 2/8 for Geometric(p) on 1, 2, ...
    assert abs(np.mean(np.array(geometric) == 1) - 0.25) < 0.03
    with pytest.raises(ValueError, match="nested_rank_distribution"):
        nr.sample_truncation(rng, 8, "zipf")


def test_training_with_t_always_one_leaves_every_other_slot_untouched(trainer, monkeypatch) -> None:
    monkeypatch.setattr(nr, "sample_truncation", lambda rng, rank, distribution: 1)
    start = _start(trainer)
    args = ClientArguments(local_steps=3, per_device_train_batch_size=8, learning_rate=1e-2, nested_rank=True)
    trained, _ = trainer.train(start, RANK, SHARD, args, seed=2, max_seq_length=16)
    for module in start.modules:
        a0, b0 = start.lora_factors(module)
        a1, b1 = trained.lora_factors(module)
        assert torch.equal(a1[1:], a0[1:]) and torch.equal(b1[:, 1:], b0[:, 1:])
        assert not torch.equal(a1[0], a0[0])


def test_default_off_trains_exactly_as_the_plain_loop(trainer) -> None:
    start, seed = _start(trainer), 5
    args = ClientArguments(local_steps=4, per_device_train_batch_size=8, learning_rate=1e-2)
    assert not args.nested_rank and not args.revive_zero_slots
    trained, _ = trainer.train(start, RANK, SHARD, args, seed=seed, max_seq_length=16)
    # the loop as it was before the option existed
    name = trainer.load(start, RANK)
    model = trainer.model
    model.train()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    order: list[int] = []
    for _ in range(4):
        if len(order) < 8:
            order += torch.randperm(len(SHARD), generator=generator).tolist()
        batch, order = order[:8], order[8:]
        model(**trainer._batch(SHARD, batch, 16)).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    plain = LoraAdapter.from_peft_model(model, name)
    for key, value in plain.state_dict().items():
        assert torch.equal(trained.state_dict()[key], value), key
