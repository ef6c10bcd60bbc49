"""PEFT's per-module LoRA scale, and folding it into the factors.

PEFT applies ``dW = s * B @ A`` with ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``), rank and alpha taken per module from ``rank_pattern``/``alpha_pattern``. Averaging
raw factors of adapters whose scales differ is wrong, so every strategy works on folded factors
``A' = sqrt(s) A`` and ``B' = sqrt(s) B`` whose product is the update itself.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Mapping

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key

from .keys import module_path, pattern_for


def declared_rank_alpha(config: LoraConfig, module: str) -> tuple[int, float]:
    """The rank and alpha ``config`` gives ``module``, honouring ``rank_pattern``/``alpha_pattern``."""
    path = module_path(module)
    rank_pattern = config.rank_pattern or {}
    alpha_pattern = config.alpha_pattern or {}
    rank = rank_pattern.get(get_pattern_key(list(rank_pattern), path), config.r)
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), path), config.lora_alpha)
    return int(rank), float(alpha)


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scale for a module of this rank and alpha."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def module_scale(config: LoraConfig, module: str) -> float:
    """The scale PEFT applies to ``module`` under ``config``."""
    rank, alpha = declared_rank_alpha(config, module)
    return lora_scale(rank, alpha, bool(config.use_rslora))


def fold(a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the scale into the factors: returns ``(sqrt(s) A, sqrt(s) B)`` in float32."""
    root = math.sqrt(scale)
    return a.to(torch.float32, copy=True).mul_(root), b.to(torch.float32, copy=True).mul_(root)


def unfold(a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fold`: the raw factors a module with this scale must store."""
    root = math.sqrt(scale)
    return a / root, b / root


def unit_scale_config(template: LoraConfig, ranks: Mapping[str, int]) -> LoraConfig:
    """A copy of ``template`` whose every module has scale exactly 1 at the given ranks.

    ``r`` is the most common rank, ``lora_alpha = r``; modules of other ranks get ``rank_pattern`` and
    ``alpha_pattern`` entries equal to their rank, so folded factors can be stored as they are.
    """
    counts = Counter(ranks.values())
    common = max(counts, key=lambda rank: (counts[rank], rank))
    config = copy.deepcopy(template)
    config.r, config.lora_alpha, config.use_rslora, config.inference_mode = common, common, False, True
    config.rank_pattern = {pattern_for(m): rank for m, rank in ranks.items() if rank != common}
    config.alpha_pattern = dict(config.rank_pattern)
    return config
