"""``hf-fedlora push DIR REPO``: publish an adapter folder (or a federation round) to the Hub.

hf-fedlora push out/round-0003 user/fed-sst2 --round 3      # one commit + tag round-0003
hf-fedlora push global user/my-adapter --tag v1 --private
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

from ..adapters import LoraAdapter
from ..errors import AdapterError
from ..hub import push_round, round_tag


def add_push_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``push`` subcommand on the ``hf-fedlora`` parser."""
    p = sub.add_parser(
        "push",
        help="upload an adapter folder or a federation round to the Hugging Face Hub",
        description="Upload a PEFT adapter folder to a Hub repo in one commit with a model card. With --round N "
        "the commit is tagged round-NNNN and skipped if that tag exists already (safe to rerun).",
    )
    p.add_argument("directory", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("repo_id", help="Hub repo, user/name (created if missing)")
    p.add_argument(
        "--round",
        type=int,
        dest="round_index",
        help="federation round: tag round-NNNN, skip if already pushed",
    )
    p.add_argument("--tag", help="tag the commit (without --round); must not exist yet")
    p.add_argument("--message", help="commit message (without --round)")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private")
    p.add_argument(
        "--token-file", help="file holding the Hub token (default: HF_TOKEN, else the logged-in token)"
    )
    p.add_argument("--token", help=argparse.SUPPRESS)  # deprecated: visible in `ps` and shell history
    p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument(
        "--card-info", help="JSON object of model card facts (base_model, strategy, num_clients, ...)"
    )
    p.add_argument(
        "--metrics", help="metrics.jsonl with one JSON object per round, for the model card's table"
    )
    p.add_argument(
        "--max-retries", type=int, default=5, help="retries on connection errors and 5xx (default: 5)"
    )
    p.set_defaults(handler=run_push)
    return p


def _read_metrics(path: str | None) -> list[dict] | None:
    if not path:
        return None
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise AdapterError(f"--metrics '{path}', line {number}: not JSON ({exc.msg}).") from exc
    return rows


def read_token(args: argparse.Namespace) -> str | None:
    """The Hub token: ``--token-file``, else ``HF_TOKEN`` / the logged-in token (``None`` lets
    huggingface_hub find them); ``--token`` still works, with a warning."""
    if getattr(args, "token", None):
        warnings.warn(
            "`hf-fedlora push --token` puts the token in your shell history and the process list; use "
            "HF_TOKEN or --token-file instead (--token will be removed).",
            FutureWarning,
            stacklevel=2,
        )
        return args.token
    if getattr(args, "token_file", None):
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise AdapterError(
                f"--token-file '{args.token_file}' cannot be read ({type(exc).__name__})."
            ) from None
        if not token or len(token.split()) != 1:
            raise AdapterError(f"--token-file '{args.token_file}' must hold the token alone on one line.")
        return token
    return None


def run_push(args: argparse.Namespace) -> int:
    """Handler of ``hf-fedlora push``; returns the exit status (0 pushed or already there)."""
    if not os.path.isdir(args.directory):
        raise AdapterError(f"'{args.directory}' is not a folder; pass the adapter folder to push.")
    token = read_token(args)
    card_info = None
    if args.card_info:
        try:
            card_info = json.loads(args.card_info)
        except json.JSONDecodeError as exc:
            raise AdapterError(f"--card-info is not a JSON object ({exc.msg}).") from exc
    if args.round_index is not None:
        sha = push_round(
            args.directory,
            args.repo_id,
            args.round_index,
            token=token,
            private=args.private,
            endpoint=args.endpoint,
            card_info=card_info,
            metrics_history=_read_metrics(args.metrics),
            max_retries=args.max_retries,
        )
        tag = round_tag(args.round_index)
        if sha is None:
            print(f"{args.repo_id}: {tag} is already on the Hub; nothing pushed")
        else:
            print(f"pushed {args.directory} to {args.repo_id}: commit {sha[:7]}, tag {tag}")
        return 0
    # read and check in full, then pushed as LoraAdapter.push_to_hub writes it
    sha = LoraAdapter.from_pretrained(args.directory).push_to_hub(
        args.repo_id,
        revision_tag=args.tag,
        commit_message=args.message,
        private=args.private,
        token=token,
        endpoint=args.endpoint,
        max_retries=args.max_retries,
    )
    print(
        f"pushed {args.directory} to {args.repo_id}: commit {sha[:7]}"
        + (f", tag {args.tag}" if args.tag else "")
    )
    return 0


__all__ = ["add_push_parser", "run_push"]
