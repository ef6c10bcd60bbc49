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


__all__ = ["HubPathError", "HubPushError", "is_repo_id", "redact"]
