"""Screening a round's client updates before aggregation: drop or clip the broken and the hostile.

A federation server takes files from parties it does not control. ``screen_clients`` reads every
client's adapter in full, and turns what would stop the round (an unreadable file, NaN, a base
model or shape mismatch, an update norm far beyond the others) into a per-client verdict, so the
round can go on with the rest and the log can say who was dropped and why.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .adapters import AdapterSource, LoraAdapter, resolve_adapter
from .adapters.keys import bias_key
from .adapters.reference import check_against
from .adapters.sources import describe_source
from .errors import AdapterError, NonFiniteTensorError
from .linalg import squared_update_norm


@dataclass
class ClientVerdict:
    """What screening decided about one client.

    Attributes:
        index: the client's position in the list given to :func:`screen_clients`.
        source: how the client was named.
        accepted: whether its update goes into the aggregate.
        reason: why it was rejected or clipped (``None`` when accepted as is).
        update_norm: ``sqrt(sum_m ||dW_m||_F^2)`` over its LoRA modules, when it could be computed.
        clipped: whether its update was scaled down to ``clip_update_norm``.
    """

    index: int
    source: str
    accepted: bool
    reason: str | None = None
    update_norm: float | None = None
    clipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record for round logs."""
        return asdict(self)


def _squared_module_norm(adapter: LoraAdapter, module: str) -> float:
    total = float(squared_update_norm(*adapter.folded_factors(module)))
    bias = adapter.delta_bias(module)
    return total if bias is None else total + float(bias.square().sum())


def adapter_update_norm(adapter: LoraAdapter) -> float:
    """Frobenius norm of the adapter's whole update, ``sqrt(sum_m ||s_m B_m A_m||_F^2 + ||s_m b_m||^2)``
    (``b_m`` the LoRA bias, when ``lora_bias=True``; DoRA magnitudes are not an update and count not).

    Reads every LoRA tensor (checking it is finite) and never forms ``B @ A``
    (:func:`hf_fedlora.linalg.squared_update_norm` per module).
    """
    return math.sqrt(sum(_squared_module_norm(adapter, m) for m in adapter.modules))


def _scaled(adapter: LoraAdapter, factor: float) -> LoraAdapter:
    """The adapter with its update multiplied by ``factor`` (A and B each by ``sqrt(factor)``, a LoRA
    bias by ``factor``); DoRA magnitudes and extras are kept."""
    root = math.sqrt(factor)
    layout = adapter.layout
    factors = {k for m in adapter.modules for k in layout.factor_keys(m)}
    biases = {bias_key(m) for m in layout.biases}
    state = {}
    for key, tensor in adapter.state_dict().items():
        if key in factors or key in biases:
            state[key] = (tensor.float() * (root if key in factors else factor)).to(tensor.dtype)
        else:
            state[key] = tensor
    return LoraAdapter.from_state_dict(
        adapter.config, state, label=adapter.label, provenance=adapter.provenance
    )


def screen_clients(
    sources: Sequence[AdapterSource],
    *,
    max_update_norm: float | None = None,
    max_norm_ratio: float | None = None,
    clip_update_norm: float | None = None,
    check_base_model: bool = True,
    reference: AdapterSource | None = None,
    **load_kwargs: Any,
) -> tuple[list[LoraAdapter], list[ClientVerdict]]:
    """Check every client of a round and keep the ones fit to aggregate.

    A client is rejected when its adapter cannot be read or validated (any ``AdapterError``:
    corrupt file, NaN/Inf, unsupported type), when it is incompatible with the first readable
    client, when its update norm exceeds ``max_update_norm``, or exceeds ``max_norm_ratio`` times the
    median norm of the readable clients. Updates above ``clip_update_norm`` are scaled down to it.

    Args:
        sources: the round's client adapters (anything ``aggregate_adapters`` accepts).
        max_update_norm: absolute bound on a client's update norm.
        max_norm_ratio: bound relative to the round's median update norm (e.g. ``10.0``).
        clip_update_norm: clip larger updates to this norm instead of rejecting them.
        check_base_model: also reject clients whose ``base_model_name_or_path`` differs.
        reference: what every client must be compatible with (the previous global adapter, or one
            built from the federation's own LoRA config). Without it the first readable client is
            the reference, so a hostile first client makes the honest ones look incompatible.
        **load_kwargs: passed to ``LoraAdapter.from_pretrained`` (``token``, ``allow_pickle``, ...).

    Returns:
        ``(accepted, verdicts)``: the adapters to aggregate (clipped where needed, in input order)
        and one verdict per source.
    """
    for name, value in (
        ("max_update_norm", max_update_norm),
        ("max_norm_ratio", max_norm_ratio),
        ("clip_update_norm", clip_update_norm),
    ):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise AdapterError(f"`{name}` must be a finite positive number, got {value!r}.")
    verdicts, readable = [], {}
    ref = (
        resolve_adapter(reference, "the reference adapter", **load_kwargs) if reference is not None else None
    )
    for index, source in enumerate(sources):
        label = f"client {index} ({describe_source(source)})"
        verdict = ClientVerdict(index=index, source=describe_source(source), accepted=False)
        verdicts.append(verdict)
        try:
            adapter = resolve_adapter(source, label, **load_kwargs)
            first = ref if ref is not None else next(iter(readable.values()), None)
            if first is not None:
                check_against(first, first.label, [adapter], check_base_model)
            for key in adapter.extras:
                adapter.extra(key)  # raises on NaN/Inf
            norm = adapter_update_norm(adapter)
            verdict.update_norm = norm if math.isfinite(norm) else None
            if not math.isfinite(norm):  # huge finite values overflow the norm; bounds compare False to NaN
                raise NonFiniteTensorError(
                    f"{label}: its update norm is {norm} (the values are finite but their squares overflow); "
                    "such an update cannot be bounded or averaged."
                )
        except AdapterError as exc:
            verdict.reason = f"{type(exc).__name__}: {exc}"
            continue
        except (RuntimeError, OverflowError, RecursionError) as exc:  # never let one client stop the round
            verdict.reason = (
                f"AdapterFormatError: {label}: cannot be read ({type(exc).__name__}: {exc!s:.200})"
            )
            continue
        readable[index] = adapter
    median = (
        statistics.median(v.update_norm for v in verdicts if v.update_norm is not None) if readable else 0.0
    )
    accepted = []
    for index, adapter in readable.items():
        verdict = verdicts[index]
        norm = verdict.update_norm
        if max_update_norm is not None and norm > max_update_norm:
            verdict.reason = f"update norm {norm:.4g} exceeds `max_update_norm` {max_update_norm:.4g}"
        elif max_norm_ratio is not None and median > 0 and norm > max_norm_ratio * median:
            verdict.reason = (
                f"update norm {norm:.4g} exceeds {max_norm_ratio:g} x the round's median {median:.4g}"
            )
        else:
            verdict.accepted = True
            if clip_update_norm is not None and norm > clip_update_norm:
                adapter = _scaled(adapter, clip_update_norm / norm)
                verdict.clipped = True
                verdict.reason = f"update norm {norm:.4g} clipped to {clip_update_norm:.4g}"
            accepted.append(adapter)
    return accepted, verdicts


__all__ = ["ClientVerdict", "adapter_update_norm", "screen_clients"]
