"""Find an adapter's folder: a source string (a local PEFT folder, or a Hub repo id with an optional
``@revision``) becomes a local folder holding the adapter files, downloaded when needed."""

from __future__ import annotations

import os
from pathlib import Path

from ..constants import ADAPTER_CONFIG_NAME, ADAPTER_PICKLE_NAME, ADAPTER_SAFETENSORS_NAME, PROVENANCE_NAME
from ..errors import AdapterFormatError, AdapterNotFoundError
from ..hub._timeouts import ensure_timeouts, hub_timeout
from ..hub.errors import check_commit_sha, is_repo_id, redact_chain


def split_revision(source: str, revision: str | None = None) -> tuple[str, str | None]:
    """Split ``"user/repo@rev"`` into ``("user/repo", "rev")``; an explicit ``revision`` wins."""
    if "@" in source and not os.path.exists(source):
        repo_id, _, rev = source.rpartition("@")
        return repo_id, revision or rev or None
    return source, revision


def resolve_source(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    where: str | None = None,
) -> tuple[Path, str]:
    """Find or download the adapter files for ``source``.

    Args:
        source: a local folder, or a Hub repo id, optionally ``"user/repo@revision"``.
        revision: branch, tag (e.g. ``round-0003``) or commit; overrides an ``@revision`` suffix.
        token: Hub token; never logged.
        cache_dir: Hub cache folder (defaults to the ``huggingface_hub`` cache).
        allow_pickle: also download ``adapter_model.bin``.
        where: how to name this source in errors.

    Returns:
        ``(folder, label)``: the local folder and a display name such as ``user/repo@round-0003``.

    Raises:
        AdapterNotFoundError: no such folder, repo, revision or file.
    """
    text = os.fspath(source)
    if os.path.isdir(text):
        check_files_stay_inside(Path(text), where or text)
        return Path(text), where or text
    if os.path.exists(text):
        raise AdapterNotFoundError(
            f"{where or text}: '{text}' is a file; pass the folder holding '{ADAPTER_CONFIG_NAME}' and "
            f"'{ADAPTER_SAFETENSORS_NAME}'."
        )
    repo_id, rev = split_revision(text, revision)
    label = where or (f"{repo_id}@{rev}" if rev else repo_id)
    if not isinstance(source, str) or looks_local(repo_id):
        raise AdapterNotFoundError(
            f"{label}: no such folder '{text}', and it is not a valid Hub repo id (it reads as a local path, "
            "so the Hub is not asked; a repo id is 'user/name' or 'user/name@revision')."
        )
    if not is_repo_id(repo_id):  # also refuses '..' (no path tricks through a repo id)
        raise AdapterNotFoundError(f"{label}: no such folder, and '{repo_id}' is not a valid Hub repo id.")
    return _download(
        repo_id, rev, token=token, cache_dir=cache_dir, allow_pickle=allow_pickle, label=label
    ), label


def looks_local(text: str) -> bool:
    """True when ``text`` is clearly a path rather than a Hub repo id: it starts with ``/``, ``.``
    or ``~``, holds a backslash or the OS separator beyond one ``/``, more than one ``/``, or its
    first part is a local folder (``clients/a`` beside a ``clients`` folder)."""
    first = text.split("/", 1)[0]
    return (
        text.startswith(("/", ".", "~"))
        or "\\" in text
        or (os.sep != "/" and os.sep in text)
        or text.count("/") > 1
        or ("/" in text and os.path.isdir(first))
    )


def _download(
    repo_id: str, revision: str | None, *, token, cache_dir, allow_pickle: bool, label: str
) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = [ADAPTER_CONFIG_NAME, ADAPTER_SAFETENSORS_NAME, PROVENANCE_NAME]
    if allow_pickle:
        patterns.append(ADAPTER_PICKLE_NAME)
    ensure_timeouts()
    try:
        if (
            not constants.HF_HUB_OFFLINE
        ):  # the commit id the server answers must be one before it names a cache folder
            info = HfApi().model_info(repo_id, revision=revision, token=token)
            check_commit_sha(info.sha, label)
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            etag_timeout=hub_timeout(),
        )
    except RevisionNotFoundError as exc:
        redact_chain(exc, token)
        raise AdapterNotFoundError(
            f"{label}: the Hub repo '{repo_id}' has no revision {revision!r}. List its round tags with "
            "`hf_fedlora.hub.list_rounds`."
        ) from exc
    except RepositoryNotFoundError as exc:
        redact_chain(exc, token)
        raise AdapterNotFoundError(
            f"{label}: no local folder of that name and no Hub repo '{repo_id}' (or it is private: pass `token`)."
        ) from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        redact_chain(exc, token)
        raise AdapterNotFoundError(
            f"{label}: no local folder of that name, and the Hub download failed ({type(exc).__name__}). "
            "Check the repo id, your connection and `HF_ENDPOINT`."
        ) from exc
    return Path(folder)


def check_files_stay_inside(folder: Path, label: str) -> None:
    """Refuse adapter files that are symlinks leading out of a client's folder.

    A client controls its folder's contents; a link such as ``adapter_config.json -> /etc/...``
    would make the server read (and hash, and log) files the client should not reach.
    """
    try:
        root = folder.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise AdapterFormatError(f"{label}: folder '{folder}' cannot be resolved ({exc}).") from exc
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        # a huggingface_hub cache snapshot (snapshot_download's result): its files link to ../../blobs
        root = root.parent.parent
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_SAFETENSORS_NAME, ADAPTER_PICKLE_NAME, PROVENANCE_NAME):
        path = folder / name
        if not path.is_symlink():
            continue
        try:
            inside = path.resolve(strict=True).is_relative_to(root)
        except (OSError, RuntimeError) as exc:  # a dangling link or a symlink loop
            raise AdapterFormatError(
                f"{label}, file '{name}': is a symlink that cannot be followed ({exc}); copy the file into "
                "the folder instead of linking it."
            ) from exc
        if not inside:
            raise AdapterFormatError(
                f"{label}, file '{name}': is a symlink to '{os.readlink(path)}', outside the adapter folder. "
                "Copy the file into the folder instead of linking it."
            )
