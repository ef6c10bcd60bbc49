"""Errors of the Hub layer. Both are :class:`~hf_fedlora.errors.AdapterError` (so ``ValueError``),
which the ``hf-fedlora`` CLI turns into a one-line message and exit status 2.

Messages never contain the token: every message built from a client exception goes through
:func:`redact` first.
"""

from __future__ import annotations

import re

from ..errors import AdapterError

_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{16,}")


class HubPushError(AdapterError):
    """Pushing to the Hub failed, after retries for transient failures (connection errors, 5xx,
    429) or at once for permanent ones (401/403: no write access; a round tag that points at
    another commit). The local round output is never modified by a push; the message says where
    it is and that rerunning skips the rounds already tagged, e.g.::

        HubPushError: pushing round 2 ('out/round-0002') to 'user/fed-sst2' failed after 6 attempts
        (commit: HTTP 500 Internal Server Error). The local round output in 'out/round-0002' is
        intact; rerun the push (rounds whose tag already exists are skipped).
    """


class HubPathError(AdapterError):
    """A Hub repo lists a file whose name would escape the download folder (absolute, ``..``,
    backslashes, NUL). Nothing is downloaded from such a repo."""


def is_repo_id(text: object) -> bool:
    """True for ``name`` or ``namespace/name`` as the Hub allows them
    (``huggingface_hub.utils.validate_repo_id``: no ``..`` or ``--``, at most 96 characters)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(text, str) or not text:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def redact(text: str, token: object) -> str:
    """``text`` with ``token`` (when it is a string) and anything shaped like a Hub token
    (``hf_`` + 16 or more letters and digits) replaced by ``***``."""
    if isinstance(token, str) and token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


def check_commit_sha(value: object, where: str) -> str:
    """``value`` if it is a 40-hex commit id as the Hub answers them, else :class:`HubPathError`
    (a server's answer is used in cache paths and tags: ``../x`` must never get there)."""
    if not isinstance(value, str) or not _COMMIT_SHA.match(value):
        raise HubPathError(
            f"{where}: the server answered the commit id {value!r:.80}, not 40 hex digits; refusing it."
        )
    return value


def redact_chain(exc: BaseException | None, token: object) -> None:
    """Redact the token from the messages of ``exc`` and every exception chained to it
    (``__cause__``/``__context__``), in place, so that no traceback can print it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 64:
        seen.add(id(exc))
        try:
            exc.args = tuple(redact(a, token) if isinstance(a, str) else a for a in exc.args)
        except (AttributeError, TypeError):  # pragma: no cover - exotic exception types
            pass
        exc = exc.__cause__ or exc.__context__


__all__ = ["HubPathError", "HubPushError", "check_commit_sha", "is_repo_id", "redact", "redact_chain"]
