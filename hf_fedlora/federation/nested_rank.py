"""Nested-rank local training: a client trains with its LoRA slots beyond a sampled truncation rank
masked, step by step (nested dropout over the rank slots, in the spirit of PreLort, arXiv
2606.15963).

At each local step a truncation rank ``t`` in ``1..r`` is drawn and every ``lora_A`` output is
multiplied by the 0/1 mask ``[i < t]``: slots ``>= t`` neither act in that step's forward pass nor
receive a gradient (row i of A and column i of B). Slot 0 trains at every step, slot ``r - 1`` only
when ``t = r``, so the first slots carry the most and slot i means the same thing on every client,
whatever its rank: what a padding rule's averaging of slot i assumes. Evaluation and the adapter a
client sends are unmasked.

The draws come from their own generator seeded by the client's seed, so batch order and dropout
are those of the unmasked run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

DISTRIBUTIONS = ("uniform", "geometric")
_STREAM = 0x6E657374  # keeps the draws apart from every other stream seeded by the client's seed


def sample_truncation(rng: np.random.Generator, rank: int, distribution: str) -> int:
    """A truncation rank in ``1..rank``: ``uniform``, or ``geometric`` (``1 + Geometric(2 / rank)``
    failures, mean about ``rank / 2``, capped at ``rank``)."""
    if distribution == "uniform":
        return int(rng.integers(1, rank + 1))
    if distribution == "geometric":
        return int(min(rank, rng.geometric(min(1.0, 2.0 / rank))))
    raise ValueError(f"`nested_rank_distribution` must be one of {DISTRIBUTIONS}, got {distribution!r}.")


class NestedRankMask:
    """Forward hooks on the ``lora_A`` modules of adapter ``adapter_name`` that mask slots ``>= t``;
    :meth:`step` draws a new ``t``. Use as a context manager (the hooks are removed on exit).

    Args:
        model: the ``PeftModel``.
        adapter_name: the trained adapter slot's name.
        rank: its LoRA rank.
        distribution: ``uniform`` or ``geometric`` (see :func:`sample_truncation`).
        seed: the client's seed.
    """

    def __init__(self, model: Any, adapter_name: str, rank: int, distribution: str, seed: int):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"`nested_rank_distribution` must be one of {DISTRIBUTIONS}, got {distribution!r}."
            )
        self.rank, self.distribution = rank, distribution
        self.rng = np.random.default_rng([seed, _STREAM])
        self.mask = torch.ones(rank)
        self.truncations: list[int] = []
        self._handles = [
            module.lora_A[adapter_name].register_forward_hook(self._hook)
            for module in model.modules()
            if hasattr(module, "lora_A") and adapter_name in getattr(module, "lora_A", {})
        ]
        if not self._handles:
            raise ValueError(f"no LoRA module of adapter {adapter_name!r} to mask")

    def _hook(self, module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * self.mask.to(device=output.device, dtype=output.dtype)

    def step(self) -> int:
        """Draw this step's truncation rank and set the mask; returns it."""
        t = sample_truncation(self.rng, self.rank, self.distribution)
        self.mask = (torch.arange(self.rank) < t).float()
        self.truncations.append(t)
        return t

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> NestedRankMask:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
