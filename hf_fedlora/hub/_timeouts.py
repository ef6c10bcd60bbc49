"""Timeouts for every Hub request, so that a silent or trickling server cannot hang a round.

``huggingface_hub``'s shared HTTP client has no timeout of its own (only downloads pass
``HF_HUB_DOWNLOAD_TIMEOUT`` / ``HF_HUB_ETAG_TIMEOUT``); API calls such as ``create_commit`` or
``list_repo_refs`` would wait forever. :func:`ensure_timeouts` installs a client factory with
connect and read timeouts (``HF_FEDLORA_HUB_TIMEOUT`` seconds, default
``constants.HUB_TIMEOUT_S``), once, and only while the factory is still huggingface_hub's default:
a factory the application set itself is left alone.
"""

from __future__ import annotations

import os

from ..constants import HUB_TIMEOUT_S

_installed = False


def hub_timeout() -> float:
    """Seconds a Hub request may wait to connect or for the next bytes of an answer."""
    try:
        value = float(os.environ.get("HF_FEDLORA_HUB_TIMEOUT", HUB_TIMEOUT_S))
    except ValueError:
        return HUB_TIMEOUT_S
    return value if value > 0 else HUB_TIMEOUT_S


def ensure_timeouts() -> None:
    """Give huggingface_hub's shared client a timeout (idempotent; see the module docstring)."""
    global _installed
    if _installed:
        return
    try:
        from huggingface_hub.utils import _http
    except ImportError:  # pragma: no cover - other huggingface_hub versions
        return
    default = getattr(_http, "default_client_factory", None)
    if default is None or getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) is not default:
        _installed = True
        return

    def factory():
        client = default()
        client.timeout = type(client.timeout)(hub_timeout())
        return client

    _http.set_client_factory(factory)
    _installed = True


__all__ = ["ensure_timeouts", "hub_timeout"]
