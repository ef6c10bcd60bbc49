"""Adapter I/O: ``LoraAdapter`` (read lazily, checked, saved atomically), the sources that
``aggregate_adapters`` accepts, and ``pull_round``.

The helpers it is built from (``keys``, ``scaling``, ``io``, ``validate``, ``folders``) are imported
from their modules; they are not part of the public API.
"""

from .adapter import LoraAdapter
from .sources import AdapterSource, pull_round, resolve_adapter

__all__ = ["AdapterSource", "LoraAdapter", "pull_round", "resolve_adapter"]
