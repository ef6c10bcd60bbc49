"""Pull federation rounds from the Hub: list the ``round-NNNN`` tags, download a round's folder.
File names the repo lists are checked before anything is downloaded. (``hf_fedlora.pull_round``
opens a downloaded round as a ``LoraAdapter``.)"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

from ..constants import ADAPTER_CONFIG_NAME, ADAPTER_SAFETENSORS_NAME, MODEL_CARD_NAME, PROVENANCE_NAME
from ..errors import AdapterNotFoundError
from ._retry import RetryError, describe, with_retries
from ._timeouts import hub_timeout
from .errors import HubPathError, check_commit_sha, redact, redact_chain
from .push import _api, round_tag

_ROUND_TAG = re.compile(r"^round-(\d{4,})$")
ROUND_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_SAFETENSORS_NAME, PROVENANCE_NAME, MODEL_CARD_NAME)


def check_repo_path(name: str, where: str) -> str:
    """Return ``name`` if it is a safe relative path inside a repo, else raise.

    A name is refused when it is empty, absolute (``/x``, ``C:x``), holds a backslash or NUL, or
    has a ``..`` part: written under a download folder it could land outside it.

    Raises:
        HubPathError: naming the repo and the file.
    """
    bad = (
        not name
        or "\\" in name
        or "\0" in name
        or name.startswith("/")
        or re.match(r"^[A-Za-z]:", name) is not None
        or ".." in name.split("/")
        or posixpath.normpath(name) != name.rstrip("/")
    )
    if bad:
        raise HubPathError(
            f"{where}: the repo lists a file named {name!r}, which would be written outside the download folder. "
            "Refusing to download from this repo; check the repo id and the endpoint."
        )
    return name


def check_inside(folder: str | os.PathLike, name: str, where: str) -> Path:
    """``folder / name`` after checking, without following links, that it stays inside ``folder``."""
    root = os.path.abspath(folder)
    target = os.path.abspath(os.path.join(root, check_repo_path(name, where)))
    if os.path.commonpath([root, target]) != root:
        raise HubPathError(f"{where}: file {name!r} resolves outside '{root}'; refusing it.")
    return Path(target)


def list_rounds(
    repo_id: str, *, token: str | bool | None = None, endpoint: str | None = None, max_retries: int = 5
) -> list[int]:
    """The rounds pushed to ``repo_id``: the numbers of its ``round-NNNN`` tags, ascending.

    Returns ``[]`` when the repo does not exist (yet) or cannot be seen with this token.

    Raises:
        AdapterNotFoundError: the Hub could not be reached (after retries).
    """
    from huggingface_hub.errors import RepositoryNotFoundError

    api = _api(endpoint, token)

    def refs():
        try:
            return api.list_repo_refs(repo_id)
        except RepositoryNotFoundError:
            return None

    try:
        found = with_retries(refs, "listing tags", max_retries=max_retries, token=token)
    except RetryError as error:
        redact_chain(error.last, token)
        raise AdapterNotFoundError(
            redact(
                f"{repo_id}: cannot list its round tags ({describe(error.last, token)}). Check your connection and HF_ENDPOINT.",
                token,
            )
        ) from error.last
    if found is None:
        return []
    return sorted(int(m[1]) for t in found.tags if (m := _ROUND_TAG.match(t.name)))


def download_round(
    repo_id: str,
    round_index: int,
    *,
    token: str | bool | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_retries: int = 5,
) -> Path:
    """Download a round's files (adapter, provenance, model card) into the Hub cache; returns the
    snapshot folder. Every file name the repo lists is checked first (see :func:`check_repo_path`).

    Raises:
        AdapterNotFoundError: no such repo or round, or the Hub could not be reached.
        HubPathError: the repo lists a file name that escapes the download folder.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    tag = round_tag(round_index)
    where = f"{repo_id}@{tag}"
    api = _api(endpoint, token)

    def tag_commit() -> str | None:
        found = api.list_repo_refs(repo_id)
        return next((t.target_commit for t in found.tags if t.name == tag), None)

    try:
        # the tag's commit, checked before it names anything in the cache; then everything by that id
        sha = with_retries(tag_commit, "listing tags", max_retries=max_retries, token=token)
        if sha is None:
            raise AdapterNotFoundError(
                f"{where}: the repo has no tag '{tag}'. Rounds on the Hub: use `hf_fedlora.hub.list_rounds('{repo_id}')`."
            )
        check_commit_sha(sha, where)
        names = with_retries(
            lambda: api.list_repo_files(repo_id, revision=sha),
            "listing files",
            max_retries=max_retries,
            token=token,
        )
        for name in names:
            check_repo_path(name, where)
        wanted = [n for n in ROUND_FILES if n in names]
        folder = with_retries(
            lambda: snapshot_download(
                repo_id,
                revision=sha,
                token=token,
                endpoint=endpoint,
                cache_dir=cache_dir,
                allow_patterns=wanted,
                etag_timeout=hub_timeout(),
            ),
            "download",
            max_retries=max_retries,
            token=token,
        )
    except RetryError as error:
        redact_chain(error.last, token)
        if isinstance(error.last, RevisionNotFoundError):
            raise AdapterNotFoundError(
                f"{where}: the repo has no tag '{tag}'. Rounds on the Hub: use `hf_fedlora.hub.list_rounds('{repo_id}')`."
            ) from error.last
        if isinstance(error.last, RepositoryNotFoundError):
            raise AdapterNotFoundError(
                f"{where}: no Hub repo '{repo_id}' (or it is private: pass `token`)."
            ) from error.last
        raise AdapterNotFoundError(
            redact(
                f"{where}: download failed ({error.what}: {describe(error.last, token)}). Check your connection and HF_ENDPOINT.",
                token,
            )
        ) from error.last
    for name in wanted:
        check_inside(folder, name, where)
    return Path(folder)


__all__ = ["check_inside", "check_repo_path", "download_round", "list_rounds"]
