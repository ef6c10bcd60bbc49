"""What ``aggregate_adapters`` and ``screen_clients`` accept as a client: any :data:`AdapterSource`,
turned into a ``LoraAdapter`` named for error messages; and :func:`pull_round`, a federation round
of a Hub repo as a ``LoraAdapter``."""

from __future__ import annotations

import os
from typing import Any

from ..errors import AdapterError, AdapterFormatError
from .adapter import LoraAdapter

AdapterSource = str | os.PathLike | LoraAdapter | Any
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
        try:
            return LoraAdapter.from_pretrained(source, label=label, **load_kwargs)
        except AdapterError:
            raise
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, RecursionError, OverflowError) as exc:
            # a client's files must never stop the round with an error that names no one
            raise AdapterFormatError(
                f"{label}: cannot be read ({type(exc).__name__}: {exc!s:.300})."
            ) from exc
    raise AdapterError(
        f"{label}: cannot read an adapter from a {type(source).__name__}; pass a folder, a Hub repo id, "
        "a LoraAdapter or a peft.PeftModel."
    )


def pull_round(
    repo_id: str,
    round_index: int,
    *,
    token: str | bool | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_retries: int = 5,
) -> LoraAdapter:
    """The global adapter of round ``round_index`` of ``repo_id`` (the commit tagged ``round-NNNN``).

    Args:
        repo_id: ``"user/name"``.
        round_index: the round; see :func:`hf_fedlora.hub.list_rounds`.
        token: Hub token for private repos; never logged.
        endpoint: Hub URL (default: ``HF_ENDPOINT`` or https://huggingface.co).
        cache_dir: Hub cache folder.
        max_retries: retries for connection errors, timeouts and 408/429/5xx answers.

    Returns:
        A ``LoraAdapter`` labelled ``user/name@round-NNNN``, with the round's provenance.

    Raises:
        AdapterNotFoundError: no such repo or round, or the Hub could not be reached.
        HubPathError: the repo lists a file name that escapes the download folder.
    """
    from ..hub.pull import download_round
    from ..hub.push import round_tag

    folder = download_round(
        repo_id, round_index, token=token, endpoint=endpoint, cache_dir=cache_dir, max_retries=max_retries
    )
    return LoraAdapter.from_pretrained(folder, label=f"{repo_id}@{round_tag(round_index)}")


__all__ = ["AdapterSource", "describe_source", "pull_round", "resolve_adapter"]
