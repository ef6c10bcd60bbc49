"""The contract every aggregation rule fulfils: one module's folded factors in, one (A, B) out."""

from __future__ import annotations

from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..constants import SendBackMethod


def normalise_weights(weights: Sequence[float]) -> torch.Tensor:
    """``w_k / sum_j w_j`` as float32, computed in float64 after dividing by the largest weight, so a
    sum of huge weights (1e308 + 1e308) cannot overflow to inf and zero the result."""
    tensor = torch.tensor(list(weights), dtype=torch.float64)
    tensor = tensor / tensor.max()
    return (tensor / tensor.sum()).float()


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


@dataclass
class ModuleStacks:
    """The default running state of one module: every client's folded factors and raw weight, kept
    until :meth:`Strategy.finish` hands them to :meth:`Strategy.aggregate_module` (memory grows with
    the number of clients)."""

    name: str
    target_rank: int | None
    a: list[torch.Tensor] = field(default_factory=list)
    b: list[torch.Tensor] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


class Strategy(ABC):
    """An aggregation rule for heterogeneous-rank LoRA, in the style of Flower's strategies.

    Subclasses set ``name`` (the registry key, equal to the file name), ``paper`` (a citation),
    ``supports_heterogeneous_ranks`` and ``send_back`` (how ``LoraAdapter.to_rank`` should give
    clients their view: ``"truncate"`` for rules whose slots are aligned across rounds, ``"svd"``
    for rules that rebuild the basis), and implement the rule as pure float32 tensor math, once,
    in one of two forms:

    - :meth:`aggregate_module`, every client's factors of one module at once; the incremental
      interface then keeps each module's factor stacks until the end (:class:`ModuleStacks`);
    - or the incremental interface :meth:`start`, :meth:`fold_in`, :meth:`finish` (running sums:
      memory independent of the number of clients); :meth:`aggregate_module` then folds the given
      clients in one by one.

    ``aggregate_adapters`` calls :meth:`aggregate_module` per module; ``StreamingAggregator`` calls
    the incremental interface as clients arrive. Register the class with
    :func:`hf_fedlora.strategies.register_strategy`.
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    supports_heterogeneous_ranks: ClassVar[bool] = True
    send_back: ClassVar[SendBackMethod] = "truncate"
    propagates_non_finite: ClassVar[bool] = False
    rank_grows_with_clients: ClassVar[bool] = False
    """Whether the output rank is set by the clients (e.g. stacking: the sum of their ranks), so a
    caller must not cap it with ``target_rank``."""
    retains_inputs: ClassVar[bool] = True
    """Whether :meth:`fold_in` may keep references to the factors it is given (the default
    :class:`ModuleStacks` does). A rule that only adds them into its own state sets ``False``, so that
    callers may reuse one buffer for every client's folded factors."""

    def reads_every_value(self, ranks: Sequence[int], target_rank: int | None) -> bool:
        """Whether every value of every client's factors reaches the output, so that a NaN or Inf
        anywhere in the inputs shows in the merged module.

        If so, :func:`~hf_fedlora.aggregate_adapters` checks each merged module once instead of every
        input tensor, and reads the inputs again to name the culprit only when that check fails.
        Padding rules set ``propagates_non_finite`` and read every value unless ``target_rank`` cuts
        clients; the default (``False``) checks every input, which is always safe.
        """
        return self.propagates_non_finite and (target_rank is None or target_rank >= max(ranks))

    @classmethod
    def implements_rule(cls) -> bool:
        """Whether the class implements the rule in one of the two forms (else the defaults would
        call each other forever)."""
        return cls.aggregate_module is not Strategy.aggregate_module or (
            cls.fold_in is not Strategy.fold_in and cls.finish is not Strategy.finish
        )

    def aggregate_module(self, inputs: ModuleInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge one module.

        The default folds the clients in one by one with the incremental interface (weights
        ``p_k`` as given, total 1).

        Args:
            inputs: the clients' folded factors and weights for this module.

        Returns:
            ``(A, B)``, folded (scale 1), ``[R, in]`` and ``[out, R]`` for the rule's output rank ``R``.
        """
        self._check_implemented()
        state = self.start(inputs.name, inputs.target_rank)
        for a, b, weight in zip(inputs.a, inputs.b, inputs.weights.tolist()):
            self.fold_in(state, a, b, weight)
        return self.finish(state, 1.0, inputs.previous)

    def check_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Refuse one client's folded factors of module ``name`` that the rule cannot merge, raising an
        ``AdapterError`` (the caller prefixes the client's name). ``StreamingAggregator`` calls it for
        every module of a client before folding any in, so a refused client leaves the state
        unchanged. The default accepts everything (finiteness is checked by the callers)."""
        return None

    def start(self, name: str, target_rank: int | None) -> Any:
        """A fresh running state for module ``name`` (default: empty :class:`ModuleStacks`)."""
        return ModuleStacks(name, target_rank)

    def fold_in(self, state: Any, a: torch.Tensor, b: torch.Tensor, weight: float) -> None:
        """Add one client's folded factors (``[r_k, in]``, ``[out, r_k]``, float32) to ``state``, with
        its weight before normalisation (an example count, a given weight or 1). The default appends
        them to the stacks."""
        state.a.append(a)
        state.b.append(b)
        state.weights.append(weight)

    def fold_in_scaled(
        self, state: Any, a: torch.Tensor, b: torch.Tensor, weight: float, root: float
    ) -> None:
        """:meth:`fold_in` of the folded factors ``root * a`` and ``root * b`` (``root = sqrt(s)``),
        for callers that hand over float32 factors not yet multiplied by it; the rule may modify
        ``a`` and ``b``. The default multiplies them in place; rules that only add the factors into
        sums override it to fold ``root`` into the weight of their add: one pass fewer over every input."""
        self.fold_in(state, a.mul_(root), b.mul_(root), weight)

    def fold_in_many(
        self, state: Any, a: torch.Tensor, b: torch.Tensor, weights: list[float], roots: list[float]
    ) -> None:
        """:meth:`fold_in_scaled` of n clients of one rank at once: ``a`` is ``[n, r, in]``, ``b``
        ``[n, out, r]`` (float32, not yet multiplied by ``roots``; the rule may modify them but must
        not keep them: they are reused for the next clients), client k with ``weights[k]`` and
        ``roots[k]``. The default folds them in one by one; rules of running sums override it with
        one weighted sum per factor, far fewer passes over memory."""
        for k, (weight, root) in enumerate(zip(weights, roots)):
            self.fold_in_scaled(state, a[k], b[k], weight, root)

    def finish(
        self,
        state: Any,
        total_weight: float,
        previous: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged ``(A, B)`` of the clients folded into ``state`` (which it may consume).

        Args:
            state: what :meth:`start` returned, after every :meth:`fold_in`.
            total_weight: the sum of the weights folded in (normalise by it).
            previous: last round's folded global ``(A, B)`` for this module, if any.

        The default normalises the stacked weights as ``aggregate_adapters`` does (float64, then
        float32) and calls :meth:`aggregate_module`.
        """
        self._check_implemented()
        inputs = ModuleInputs(
            name=state.name,
            a=state.a,
            b=state.b,
            weights=normalise_weights(state.weights),
            target_rank=state.target_rank,
            previous=previous,
        )
        return self.aggregate_module(inputs)

    def _check_implemented(self) -> None:
        if not self.implements_rule():
            raise NotImplementedError(
                f"{type(self).__name__} implements neither `aggregate_module` nor `fold_in` and `finish`."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
