"""Which adapter the clients of a round are checked against: never simply the first client.

A round's compatibility reference is, in order: the previous global adapter, else the federation's
own LoRA config or adapter (``reference=``), else the majority of the clients' compatibility
fingerprints. A hostile first client (another base model, ``layers_to_transform=[0]``, other
``target_modules``) is then the outlier, and its config never becomes the global one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from peft import LoraConfig

from ..constants import ADAPTER_CONFIG_NAME
from ..errors import IncompatibleAdaptersError
from .validate import AdapterLayout, check_compatible

CONFIG_FIELDS = ("target_modules", "layers_to_transform", "layers_pattern")
"""Config fields every client must share with the reference (besides the base model): they decide
which layers PEFT adapts when it loads the global adapter."""


def _normalised(value: Any) -> Any:
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(sorted(map(str, value)))
    return value


def config_fingerprint(config: LoraConfig, check_base_model: bool) -> tuple:
    """What of a config must agree across a round: base model (when checked) and :data:`CONFIG_FIELDS`."""
    base = (config.base_model_name_or_path or None) if check_base_model else None
    return (base, *(_normalised(getattr(config, f, None)) for f in CONFIG_FIELDS))


def fingerprint(adapter: AdapterLayout, check_base_model: bool) -> tuple:
    """An adapter's compatibility fingerprint: its config's (:func:`config_fingerprint`), its modules
    and their layer shapes (ranks left out), its LoRA kind (biases, DoRA, embeddings) and its extras."""
    shapes = []
    for module in adapter.modules:
        a, b = adapter.factor_shapes(module)
        shapes.append((tuple(a[1:]), b[0], tuple(b[2:])))
    layout = adapter.layout
    return (
        config_fingerprint(adapter.config, check_base_model),
        tuple(adapter.modules),
        tuple(shapes),
        tuple(sorted(layout.biases)),
        tuple(sorted(layout.magnitudes)),
        tuple(sorted(layout.embeddings)),
        tuple((key, tuple(adapter.tensor_shape(key))) for key in adapter.extras),
    )


def check_config_fields(
    reference: LoraConfig, where: str, other: AdapterLayout, check_base_model: bool
) -> None:
    """``other``'s config agrees with the reference config on the base model and :data:`CONFIG_FIELDS`.

    Raises:
        IncompatibleAdaptersError: naming ``other``, the field, and both values.
    """
    fields = (("base_model_name_or_path",) if check_base_model else ()) + CONFIG_FIELDS
    for field in fields:
        mine, theirs = getattr(other.config, field, None), getattr(reference, field, None)
        if field == "base_model_name_or_path":
            mine, theirs = mine or None, theirs or None
        if _normalised(mine) != _normalised(theirs):
            hint = (
                " Adapters of different base models cannot be merged (pass `check_base_model=False` if the "
                "names differ but the weights are the same)."
                if field == "base_model_name_or_path"
                else " Every client must use the same target modules and layers: train each with the "
                "federation's LoRA config."
            )
            raise IncompatibleAdaptersError(
                f"{other.label}, file '{ADAPTER_CONFIG_NAME}': field `{field}` is {mine!r:.200} but {where} "
                f"has {theirs!r:.200}.{hint}"
            )


def check_against(
    reference: AdapterLayout | LoraConfig,
    where: str,
    clients: Sequence[AdapterLayout],
    check_base_model: bool = True,
) -> None:
    """Every client agrees with ``reference`` (an adapter: config, modules and shapes; a
    ``LoraConfig``: its base model and :data:`CONFIG_FIELDS`).

    Raises:
        IncompatibleAdaptersError: naming the first client that differs, and how.
    """
    config = reference if isinstance(reference, LoraConfig) else reference.config
    for client in clients:
        if not isinstance(reference, LoraConfig):
            check_compatible([reference, client], check_base_model=check_base_model)
        check_config_fields(config, where, client, check_base_model)


def majority_reference(clients: Sequence[AdapterLayout], check_base_model: bool = True) -> AdapterLayout:
    """The first client of the largest group of clients sharing one compatibility fingerprint.

    Every client must share it: the others are named as outliers (the error of
    :func:`check_against` for the first of them). When two groups tie for largest, no client can be
    trusted as the reference: the error names one client of each.

    Raises:
        IncompatibleAdaptersError: a client outside the majority, or a tie.
    """
    groups: dict[tuple, list[AdapterLayout]] = {}
    for client in clients:
        groups.setdefault(fingerprint(client, check_base_model), []).append(client)
    if len(groups) == 1:
        return clients[0]
    ranked = sorted(groups.values(), key=len, reverse=True)
    if len(ranked[0]) == len(ranked[1]):
        try:
            check_against(ranked[0][0], ranked[0][0].label, [ranked[1][0]], check_base_model)
            detail = f"{ranked[1][0].label} differs from {ranked[0][0].label}."
        except IncompatibleAdaptersError as exc:
            detail = str(exc)
        raise IncompatibleAdaptersError(
            f"{detail} As many clients side with {ranked[1][0].label} as with {ranked[0][0].label} "
            f"({len(ranked[0])} each): no majority says which one the round should follow. Pass the "
            "previous global adapter (`previous=`) or the federation's LoRA config (`reference=`)."
        )
    majority = ranked[0][0]
    outliers = [c for group in ranked[1:] for c in group]
    try:
        check_against(
            majority,
            f"{majority.label} (and {len(ranked[0]) - 1} other client(s))",
            outliers,
            check_base_model,
        )
    except IncompatibleAdaptersError as exc:
        names = ", ".join(c.label for c in outliers[:5]) + (" ..." if len(outliers) > 5 else "")
        raise IncompatibleAdaptersError(
            f"{exc} Outliers against the majority of {len(ranked[0])} of {len(clients)} clients: {names}."
        ) from None
    return majority


__all__ = ["check_against", "config_fingerprint", "fingerprint", "majority_reference"]
