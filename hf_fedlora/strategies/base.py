"""The contract every aggregation rule fulfils: one module's folded factors in, one (A, B) out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..constants import SendBackMethod


@dataclass(frozen=True)
class ModuleInputs:
    """Everything a strategy sees of one LoRA module in one round.

    Factors are *folded* (the PEFT scale is already inside them, so ``b[k] @ a[k]`` is client k's
    update ``dW_k``), float32, and 2-D.

    Args:
        name (`str`): the module name, for messages.
        a (`list[torch.Tensor]`): client k's ``A'_k``, ``[r_k, in]``.
        b (`list[torch.Tensor]`): client k's ``B'_k``, ``[out, r_k]``.
        weights (`torch.Tensor`): ``p_k``, float32, positive, summing to 1.
        target_rank (`int`, *optional*): the output rank the caller asked for.
        previous (`tuple[torch.Tensor, torch.Tensor]`, *optional*): last round's folded global
            ``(A, B)`` for this module, for rules that keep slots no client of this round owns.
    """

    name: str
    a: list[torch.Tensor]
    b: list[torch.Tensor]
    weights: torch.Tensor
    target_rank: int | None = None
    previous: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def ranks(self) -> list[int]:
        """Each client's rank for this module."""
        return [a.shape[0] for a in self.a]

    @property
    def max_rank(self) -> int:
        """The largest client rank, the natural output rank of the padding rules."""
        return max(self.ranks)


class Strategy(ABC):
    """An aggregation rule for heterogeneous-rank LoRA, in the style of Flower's strategies.

    Subclasses set ``name`` (the registry key, equal to the file name), ``paper`` (a citation),
    ``supports_heterogeneous_ranks`` and ``send_back`` (how ``LoraAdapter.to_rank`` should give
    clients their view: ``"truncate"`` for rules whose slots are aligned across rounds, ``"svd"``
    for rules that rebuild the basis), and implement :meth:`aggregate_module` as pure float32
    tensor math. Register the class with :func:`hf_fedlora.strategies.register_strategy`.
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    supports_heterogeneous_ranks: ClassVar[bool] = True
    send_back: ClassVar[SendBackMethod] = "truncate"
    propagates_non_finite: ClassVar[bool] = False
    rank_grows_with_clients: ClassVar[bool] = False
    """Whether the output rank is set by the clients (e.g. stacking: the sum of their ranks), so a
    caller must not cap it with ``target_rank``."""

    def reads_every_value(self, ranks: Sequence[int], target_rank: int | None) -> bool:
        """Whether every value of every client's factors reaches the output, so that a NaN or Inf
        anywhere in the inputs shows in the merged module.

        If so, :func:`~hf_fedlora.aggregate_adapters` checks each merged module once instead of every
        input tensor, and reads the inputs again to name the culprit only when that check fails.
        Padding rules set ``propagates_non_finite`` and read every value unless ``target_rank`` cuts
        clients; the default (``False``) checks every input, which is always safe.
        """
        return self.propagates_non_finite and (target_rank is None or target_rank >= max(ranks))

    @abstractmethod
    def aggregate_module(self, inputs: ModuleInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge one module.

        Args:
            inputs: the clients' folded factors and weights for this module.

        Returns:
            ``(A, B)``, folded (scale 1), ``[R, in]`` and ``[out, R]`` for the rule's output rank ``R``.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
