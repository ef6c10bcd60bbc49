"""Retry with exponential backoff for Hub calls: connection errors, timeouts, 408/429/5xx.

``huggingface_hub`` retries some requests itself (``http_backoff`` for preupload and LFS), but
``create_commit`` posts the commit once; this loop wraps whole operations. A retried commit is
safe: the client first asks the server which files already exist with the same content and
skips them, so a commit that went through before the connection dropped is not made twice
(the retry finds nothing to change and returns the branch head).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import HubPathError, HubPushError, redact

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_STATUS_CODES = (408, 429, 500, 502, 503, 504)
# Seconds before the first retry, doubled each time up to _MAX_WAIT (tests shrink them).
_BASE_WAIT = 1.0
_MAX_WAIT = 16.0


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:  # the HTTP library huggingface_hub uses for its version (httpx2 in 2.x, requests in 0.x)
        from huggingface_hub.utils._http import _DEFAULT_RETRY_ON_EXCEPTIONS

        errors.extend(_DEFAULT_RETRY_ON_EXCEPTIONS)
    except ImportError:  # pragma: no cover - other huggingface_hub versions
        pass
    return tuple(errors)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of a ``huggingface_hub`` HTTP error, else ``None``."""
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: network errors, timeouts and 408/429/5xx answers."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    status = status_of(exc)
    if status is not None:
        return status in RETRY_STATUS_CODES
    if isinstance(exc, OfflineModeIsEnabled):  # a ConnectionError, but waiting will not help
        return False
    return isinstance(exc, _network_errors())


def describe(exc: BaseException, token: object = None) -> str:
    """One line for a failure: ``HTTP 500 Internal Server Error`` or the exception's type and text."""
    status = status_of(exc)
    if status is not None:
        reason = getattr(getattr(exc, "response", None), "reason_phrase", "") or ""
        text = f"HTTP {status} {reason}".strip()
        server = getattr(exc, "server_message", None)
        if server:
            text += f": {str(server).strip().splitlines()[0]}"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return redact(text, token)


class RetryError(Exception):
    """Raised by :func:`with_retries` when it gives up; carries the attempts and the last error."""

    def __init__(self, what: str, attempts: int, last: BaseException, token: object = None):
        self.what, self.attempts, self.last = what, attempts, last
        super().__init__(f"{what}: {describe(last, token)}")


def with_retries(fn: Callable[[], T], what: str, *, max_retries: int, token: object = None) -> T:
    """Call ``fn`` until it succeeds, retrying transient failures up to ``max_retries`` times.

    Raises:
        RetryError: a permanent failure (at once) or a transient one after the last retry; the
            original exception is its ``last`` attribute and its ``__cause__``.
    """
    wait = _BASE_WAIT
    for attempt in range(max_retries + 1):
        try:
            return fn()
        except (HubPushError, HubPathError):  # already a clear, final answer
            raise
        except Exception as exc:
            if not is_transient(exc) or attempt == max_retries:
                raise RetryError(what, attempt + 1, exc, token) from exc
            delay = min(_MAX_WAIT, wait) * (0.5 + random.random() / 2)
            logger.warning(
                "%s failed (%s); retry %d/%d in %.1fs",
                what,
                describe(exc, token),
                attempt + 1,
                max_retries,
                delay,
            )
            time.sleep(delay)
            wait *= 2
    raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["RETRY_STATUS_CODES", "RetryError", "describe", "is_transient", "status_of", "with_retries"]
