"""Tensor helpers shared by the padding strategies (in-place accumulation, no padded copies)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_padded_sum(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], weights: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_k w_k pad(A_k)`` and ``sum_k w_k pad(B_k)``, every client zero-padded (or cut) to ``rank``."""
    out_a = a[0].new_zeros(rank, a[0].shape[1])
    out_b = b[0].new_zeros(b[0].shape[0], rank)
    for w, ak, bk in zip(weights.tolist(), a, b):
        r = min(ak.shape[0], rank)
        out_a[:r].add_(ak[:r], alpha=w)
        out_b[:, :r].add_(bk[:, :r], alpha=w)
    return out_a, out_b


def slot_owner_weights(ranks: Sequence[int], weights: torch.Tensor, rank: int) -> torch.Tensor:
    """``[K, rank]`` matrix: ``w_k`` where client k owns slot i (``r_k > i``), else 0."""
    owns = torch.arange(rank)[None, :] < torch.tensor(ranks)[:, None]
    return owns.float() * weights[:, None]


def slotwise_padded_sum(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], share: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_k share[k, i] * a_{k,i}`` for every slot i (rows of A, columns of B), up to ``rank``."""
    out_a = a[0].new_zeros(rank, a[0].shape[1])
    out_b = b[0].new_zeros(b[0].shape[0], rank)
    for k, (ak, bk) in enumerate(zip(a, b)):
        r = min(ak.shape[0], rank)
        out_a[:r].addcmul_(ak[:r], share[k, :r, None])
        out_b[:, :r].addcmul_(bk[:, :r], share[k, None, :r])
    return out_a, out_b
