"""Push adapter folders and federation rounds to the Hub: one commit per round, then a ``round-NNNN`` tag.

The Hub layer works on PEFT folders and never needs the ``LoraAdapter`` type
(``LoraAdapter.push_to_hub`` saves itself to a folder and calls :func:`push_adapter_folder`).
A push only reads the local files, so a failed push never loses a round's output; transient
failures are retried with backoff, and a round whose tag already exists is skipped, so a run
resumed after a crash never pushes a round twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..constants import MODEL_CARD_NAME, ROUND_TAG_FORMAT, __version__
from ._retry import RetryError, describe, status_of, with_retries
from ._timeouts import ensure_timeouts
from .errors import HubPushError, check_commit_sha, redact, redact_chain
from .folders import collect_files, read_adapter_folder
from .model_card import build_model_card

logger = logging.getLogger(__name__)


def round_tag(round_index: int) -> str:
    """The Hub tag of a federation round: ``round_tag(3) == "round-0003"``."""
    if not isinstance(round_index, int) or isinstance(round_index, bool) or round_index < 0:
        raise HubPushError(f"`round_index` must be a non-negative integer, got {round_index!r}.")
    return ROUND_TAG_FORMAT.format(round_index)


def _api(endpoint: str | None, token: str | bool | None):
    from huggingface_hub import HfApi

    ensure_timeouts()
    return HfApi(endpoint=endpoint, token=token, library_name="hf-fedlora", library_version=__version__)


def existing_tag(api: Any, repo_id: str, tag: str, *, max_retries: int, token: object = None) -> str | None:
    """The commit ``tag`` points to on ``repo_id``, or ``None`` (also when the repo does not exist)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    def refs():
        try:
            return api.list_repo_refs(repo_id)
        except RepositoryNotFoundError:
            return None

    found = with_retries(refs, "listing tags", max_retries=max_retries, token=token)
    if found is None:
        return None
    target = next((t.target_commit for t in found.tags if t.name == tag), None)
    return None if target is None else check_commit_sha(target, f"'{repo_id}', tag '{tag}'")


def _failure(what: str, repo_id: str, error: RetryError, token: object, local: Path | None) -> HubPushError:
    from huggingface_hub.errors import OfflineModeIsEnabled

    status = status_of(error.last)
    if isinstance(error.last, OfflineModeIsEnabled):
        fix = "Unset HF_HUB_OFFLINE (or set it to 0) to push."
    elif status in (401, 403):
        fix = f"Check that your token has write access to '{repo_id.split('/')[0]}' (`hf auth login` or HF_TOKEN)."
    elif status == 404:
        fix = "Check the repo id and the endpoint (HF_ENDPOINT)."
    else:
        fix = "Check your connection and the Hub's status, then rerun the push."
    attempts = f"after {error.attempts} attempts" if error.attempts > 1 else "at once (not a transient error)"
    message = f"pushing {what} to '{repo_id}' failed {attempts} ({error.what}: {describe(error.last, token)}). {fix}"
    if local is not None:
        message += f" The local output in '{local}' is intact; rerun to push it (rounds whose tag already exists are skipped)."
    return HubPushError(redact(message, token))


def _push_files(
    repo_id: str,
    files: Mapping[str, Path | bytes],
    *,
    tag: str | None,
    commit_message: str,
    private: bool | None,
    token: str | bool | None,
    endpoint: str | None,
    max_retries: int,
    what: str,
    local: Path | None,
    skip_if_tagged: bool,
    plain_card: bytes | None = None,
) -> str | None:
    """Create the repo if needed, commit ``files`` in one commit, tag it. See :func:`push_round`."""
    from huggingface_hub import CommitOperationAdd

    api = _api(endpoint, token)
    try:
        if "/" not in repo_id:  # "name" means the token owner's "user/name", as in transformers' push_to_hub
            owner = with_retries(
                lambda: api.whoami()["name"], "finding the token's user", max_retries=max_retries, token=token
            )
            repo_id = f"{owner}/{repo_id}"
        if tag is not None:
            tagged = existing_tag(api, repo_id, tag, max_retries=max_retries, token=token)
            if tagged is not None:
                if skip_if_tagged:
                    logger.info(
                        "%s is already on '%s' (tag %s, commit %s); not pushing it again",
                        what,
                        repo_id,
                        tag,
                        tagged[:7],
                    )
                    return None
                raise HubPushError(
                    f"tag '{tag}' already exists on '{repo_id}' (commit {tagged[:7]}); choose another `revision_tag` "
                    "or delete the tag first."
                )
        with_retries(
            lambda: api.create_repo(repo_id, private=private, exist_ok=True),
            "creating the repo",
            max_retries=max_retries,
            token=token,
        )

        contents = dict(files)

        def commit() -> str:
            # fresh operations each attempt: the client marks them as used once committed
            ops = [
                CommitOperationAdd(path_in_repo=p, path_or_fileobj=c if isinstance(c, bytes) else str(c))
                for p, c in contents.items()
            ]
            try:
                info = api.create_commit(
                    repo_id,
                    ops,
                    commit_message=commit_message,
                    commit_description=f"Pushed by hf-fedlora {__version__}.",
                )
            except ValueError as exc:
                if (
                    plain_card is None
                    or "Invalid metadata in README.md" not in str(exc)
                    or contents[MODEL_CARD_NAME] == plain_card
                ):
                    raise
                logger.warning(
                    "the Hub refused the model card's metadata (%s); pushing it without base_model/datasets",
                    redact(str(exc), token).replace("\n", " "),
                )
                contents[MODEL_CARD_NAME] = plain_card
                return commit()
            return check_commit_sha(info.oid, f"'{repo_id}', commit")

        sha = with_retries(commit, "commit", max_retries=max_retries, token=token)
        if tag is not None:
            _create_tag(api, repo_id, tag, sha, max_retries=max_retries, token=token)
    except RetryError as error:
        redact_chain(error.last, token)
        raise _failure(what, repo_id, error, token, local) from error.last
    logger.info("pushed %s to '%s': commit %s%s", what, repo_id, sha[:7], f", tag {tag}" if tag else "")
    return sha


def _create_tag(api: Any, repo_id: str, tag: str, sha: str, *, max_retries: int, token: object) -> None:
    def create() -> None:
        try:
            api.create_tag(repo_id, tag=tag, revision=sha)
        except Exception as exc:  # a retried request whose first try went through answers 409
            if status_of(exc) != 409:
                raise
            target = existing_tag(api, repo_id, tag, max_retries=max_retries, token=token)
            if target != sha:
                raise HubPushError(
                    f"tag '{tag}' on '{repo_id}' already points to commit {str(target)[:7]}, not to the commit just "
                    f"pushed ({sha[:7]}). Another run is pushing to this repo; delete the tag or use another repo."
                ) from None

    with_retries(create, f"tagging {tag}", max_retries=max_retries, token=token)


def push_adapter_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision_tag: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    model_card: str | None = None,
    endpoint: str | None = None,
    max_retries: int = 5,
    label: str | None = None,
) -> str:
    """Upload a PEFT adapter folder to a Hub repo in one commit (its files and a model card).

    ``LoraAdapter.push_to_hub(repo_id, **kwargs)`` saves the adapter to a temporary folder and
    calls this. The result loads with ``PeftModel.from_pretrained(base, repo_id, revision=revision_tag)``.

    Args:
        folder: the adapter folder (``adapter_config.json``, ``adapter_model.safetensors``, optional
            ``fedlora_provenance.json``); hidden files and a ``README.md`` are not uploaded.
        repo_id: ``"user/name"``; created if missing.
        revision_tag: tag the commit (e.g. ``"round-0003"``); it must not exist yet.
        commit_message: default ``"Upload LoRA adapter"``.
        private: create the repo private (an existing repo keeps its visibility).
        token: Hub token (default: the logged-in one or ``HF_TOKEN``); never logged.
        model_card: ``README.md`` text; default: a card generated from the config and provenance.
        endpoint: Hub URL (default: ``HF_ENDPOINT`` or https://huggingface.co).
        max_retries: retries for connection errors, timeouts and 408/429/5xx answers.
        label: how messages name the adapter (default: the folder).

    Returns:
        The commit sha.

    Raises:
        AdapterNotFoundError, AdapterFormatError: ``folder`` is not a PEFT LoRA adapter folder.
        HubPushError: the push failed (the message says which step and why), or ``revision_tag``
            already exists.
    """
    folder = Path(folder)
    label = label or str(folder)
    config, provenance = read_adapter_folder(folder, label)
    files: dict[str, Path | bytes] = dict(collect_files(folder))
    card_args: dict[str, Any] = {"config": config, "provenance": provenance}
    card = model_card if model_card is not None else build_model_card(repo_id, **card_args)
    files[MODEL_CARD_NAME] = card.encode("utf-8")
    plain = (
        None
        if model_card is not None
        else build_model_card(repo_id, link_hub_repos=False, **card_args).encode()
    )
    message = commit_message or ("Upload LoRA adapter" + (f" ({revision_tag})" if revision_tag else ""))
    sha = _push_files(
        repo_id,
        files,
        tag=revision_tag,
        commit_message=message,
        private=private,
        token=token,
        endpoint=endpoint,
        max_retries=max_retries,
        what=f"adapter {label!r}",
        local=None,
        skip_if_tagged=False,
        plain_card=plain,
    )
    assert sha is not None
    return sha


def push_round(
    round_dir: str | os.PathLike,
    repo_id: str,
    round_index: int,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    endpoint: str | None = None,
    card_info: Mapping[str, Any] | None = None,
    metrics_history: Sequence[Mapping[str, Any]] | None = None,
    max_retries: int = 5,
) -> str | None:
    """Push one federation round: the folder's files and a generated ``README.md`` in ONE commit,
    then the tag ``round-NNNN`` on that commit.

    If the tag already exists the round is skipped (logged, ``None`` returned): a resumed run
    never pushes a round twice. If a previous attempt committed but crashed before tagging, the
    retry finds every file unchanged, makes no new commit and tags the existing one.

    Args:
        round_dir: the round's PEFT adapter folder (``adapter_config.json``,
            ``adapter_model.safetensors``, ``fedlora_provenance.json``, other files); hidden
            files are not uploaded. It is only read.
        repo_id: ``"user/name"``; created if missing.
        round_index: the round number; the tag is ``round_tag(round_index)``.
        token: Hub token (default: the logged-in one or ``HF_TOKEN``); never logged.
        private: create the repo private (an existing repo keeps its visibility).
        endpoint: Hub URL (default: ``HF_ENDPOINT`` or https://huggingface.co).
        card_info: facts for the model card (``base_model``, ``strategy``, ``num_clients``,
            ``clients_per_round``, ``rank_distribution``, ``task``, ``dataset``); the adapter's
            config and provenance fill in what is missing.
        metrics_history: one dict per round so far, e.g. ``{"round": 1, "eval_accuracy": 0.8}``.
        max_retries: retries for connection errors, timeouts and 408/429/5xx answers.

    Returns:
        The commit sha, or ``None`` when the round was already tagged.

    Raises:
        AdapterNotFoundError, AdapterFormatError: ``round_dir`` is not a PEFT adapter folder.
        HubPushError: the push failed; the message names the step, the cause and the local folder.
    """
    tag = round_tag(round_index)
    folder = Path(round_dir)
    config, provenance = read_adapter_folder(folder, f"round {round_index} ('{folder}')")
    files: dict[str, Path | bytes] = dict(collect_files(folder))
    card_args: dict[str, Any] = {
        "round_index": round_index,
        "config": config,
        "provenance": provenance,
        "card_info": card_info,
        "metrics_history": metrics_history,
    }
    files[MODEL_CARD_NAME] = build_model_card(repo_id, **card_args).encode("utf-8")
    plain_card = build_model_card(repo_id, link_hub_repos=False, **card_args).encode("utf-8")
    strategy = (card_info or {}).get("strategy") or provenance.get("strategy")
    message = f"Round {round_index}: global adapter" + (f" ({strategy})" if strategy else "")
    return _push_files(
        repo_id,
        files,
        tag=tag,
        commit_message=message,
        private=private,
        token=token,
        endpoint=endpoint,
        max_retries=max_retries,
        what=f"round {round_index} ('{folder}')",
        local=folder,
        skip_if_tagged=True,
        plain_card=plain_card,
    )


__all__ = ["existing_tag", "push_adapter_folder", "push_round", "round_tag"]
