"""Local training on an accelerator: the recipe's trainer runs where ``device`` says (the recipe
passes ``Accelerator().device``) and hands adapters back on the CPU. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_fedlora.federation import ClientArguments, LocalTrainer
from hf_fedlora.federation.data import TextSplit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TEXTS = [
    "the market rallied on strong earnings",
    "the striker scored twice in the final",
    "a new chip doubles battery life",
    "talks over the treaty stalled again",
] * 6


def _trainer(model_dir, device: str) -> LocalTrainer:
    # no dropout anywhere (CPU and CUDA draw different masks from the same seed): the same math on both devices
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return LocalTrainer(
        str(model_dir), 2, lora_alpha=8.0, lora_dropout=0.0, config_overrides=no_dropout, device=device
    )


def test_cuda_training_matches_cpu_and_returns_cpu_adapters(tiny_model_dir):
    shard = TextSplit(TEXTS, None, np.arange(len(TEXTS)) % 2)
    args = ClientArguments(local_steps=3, per_device_train_batch_size=8, learning_rate=1e-3)
    cpu, gpu = _trainer(tiny_model_dir, "cpu"), _trainer(tiny_model_dir, "cuda")
    start = cpu.initial_adapter(4, seed=1)
    on_cpu, _ = cpu.train(start, 4, shard, args, seed=2, max_seq_length=16)
    on_gpu, result = gpu.train(start, 4, shard, args, seed=2, max_seq_length=16)

    assert next(gpu.model.parameters()).device.type == "cuda"
    assert result.num_steps == 3
    assert {t.device.type for t in on_gpu.state_dict().values()} == {"cpu"}
    moved = [k for k in on_cpu.state_dict() if not torch.equal(on_cpu.state_dict()[k], start.state_dict()[k])]
    assert moved, "training changed nothing"
    for key in on_cpu.state_dict():
        torch.testing.assert_close(on_gpu.state_dict()[key], on_cpu.state_dict()[key], rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(gpu.predict(on_gpu, shard, 8, 16), cpu.predict(on_cpu, shard, 8, 16))
