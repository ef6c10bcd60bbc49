"""What ``aggregate_adapters`` and ``screen_clients`` accept as a client: any :data:`AdapterSource`,
turned into a ``LoraAdapter`` named for error messages."""

from __future__ import annotations

import os
from typing import Any, Union

from ..errors import AdapterError
from .adapter import LoraAdapter

AdapterSource = Union[str, os.PathLike, LoraAdapter, Any]
"""A PEFT folder, a Hub repo id (``"user/repo"`` or ``"user/repo@revision"``), a ``LoraAdapter``
or a ``peft.PeftModel`` (its active adapter)."""


def describe_source(source: AdapterSource) -> str:
    """How errors and provenance name a source: its path, repo id, label or type."""
    if isinstance(source, LoraAdapter):
        return source.label
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return type(source).__name__


def resolve_adapter(source: AdapterSource, label: str, **load_kwargs: Any) -> LoraAdapter:
    """Turn any accepted source into a ``LoraAdapter`` named ``label`` in errors.

    Raises:
        AdapterError: (subclasses) the source cannot be read, or is of a type we do not accept.
    """
    if isinstance(source, LoraAdapter):
        return source.relabel(label)
    if hasattr(source, "peft_config") and hasattr(source, "active_adapter"):
        return LoraAdapter.from_peft_model(source, label=label)
    if isinstance(source, (str, os.PathLike)):
        return LoraAdapter.from_pretrained(source, label=label, **load_kwargs)
    raise AdapterError(
        f"{label}: cannot read an adapter from a {type(source).__name__}; pass a folder, a Hub repo id, "
        "a LoraAdapter or a peft.PeftModel."
    )


__all__ = ["AdapterSource", "describe_source", "resolve_adapter"]
