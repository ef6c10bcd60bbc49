"""Tensor helpers shared by the padding strategies."""

from __future__ import annotations

from typing import Sequence

import torch

from ..linalg import pad_cols, pad_rows


def weighted_padded_sum(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], weights: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_k w_k pad(A_k)`` and ``sum_k w_k pad(B_k)``, every client zero-padded to ``rank``."""
    out_a = sum(w * pad_rows(ak, rank) for w, ak in zip(weights, a))
    out_b = sum(w * pad_cols(bk, rank) for w, bk in zip(weights, b))
    return out_a, out_b


def slot_owner_weights(ranks: Sequence[int], weights: torch.Tensor, rank: int) -> torch.Tensor:
    """``[K, rank]`` matrix: ``w_k`` where client k owns slot i (``r_k > i``), else 0."""
    owns = torch.arange(rank)[None, :] < torch.tensor(ranks)[:, None]
    return owns.float() * weights[:, None]
