"""LocalTrainer.predict tokenises a split once and reuses the batches (a federation evaluates the
same rows every round): the same predictions as tokenising every time, and no tokenizer call after
the first."""

from __future__ import annotations

import numpy as np
import torch

from hf_fedlora.federation import LocalTrainer
from hf_fedlora.federation.data import TextSplit

TEXTS = ["the market rallied on strong earnings", "a new chip doubles battery life", "rain"] * 7


def test_eval_batches_are_tokenised_once_and_predict_the_same(tiny_model_dir, monkeypatch) -> None:
    trainer = LocalTrainer(str(tiny_model_dir), 2, lora_alpha=8.0)
    split = TextSplit(TEXTS, None, np.arange(len(TEXTS)) % 2)
    adapter = trainer.initial_adapter(4, seed=0)
    first = trainer.predict(adapter, split, batch_size=8, max_length=16)
    # reference: tokenised batch by batch, as before the cache
    trainer.load(adapter)
    reference = []
    with torch.no_grad():
        for lo in range(0, len(split), 8):
            batch = trainer._batch(split, range(lo, min(lo + 8, len(split))), 16)
            batch.pop("labels")
            reference.append(trainer.model(**batch).logits.argmax(-1))
    np.testing.assert_array_equal(first, torch.cat(reference).numpy())

    def refuse(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(trainer, "tokenizer", refuse)
    np.testing.assert_array_equal(trainer.predict(adapter, split, batch_size=8, max_length=16), first)
    other = split.select(range(5))  # a new split is tokenised (and fails here, proving it is not reused)
    try:
        trainer.predict(adapter, other, batch_size=8, max_length=16)
    except AssertionError as exc:
        assert "tokenised again" in str(exc)
    else:
        raise AssertionError("a different split reused another split's batches")
