"""Publishing a finished round to the Hub from the round loop, without ever failing the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .config import FederationArguments


def push_round_safely(
    fed_args: FederationArguments, folder: Path, round_index: int, card: dict[str, Any], records: list[dict[str, Any]]
) -> dict[str, Any]:
    """Push a written round with ``hf_fedlora.hub.push_round``; a failure is logged and returned, never raised.

    The round folder is only read, so a failed push loses nothing; the returned dict goes into the
    round's ``metrics.jsonl`` line (``{"ok": False, "error": ...}`` with the token redacted).
    """
    from accelerate.logging import get_logger

    try:
        from ..hub import push_round

        history = [
            {"round": r["round"], **{f"eval_{k}": v for k, v in r["eval"].items() if k != "score"},
             "mean_loss": float(np.mean([c["loss"] for c in r["clients"]])), "cumulative_mb": r["cumulative_bytes"] / 1e6}
            for r in records
        ]
        info = {k: card[k] for k in ("base_model", "strategy", "num_clients", "clients_per_round", "task", "dataset")}
        commit = push_round(
            folder, fed_args.hub_model_id, round_index, token=fed_args.hub_token, private=fed_args.hub_private,
            card_info={**info, "rank_distribution": card["ranks"]}, metrics_history=history,
        )
        return {"ok": True, "commit": commit, "skipped": commit is None}
    except Exception as exc:  # a network or auth failure must not lose the local round
        message = f"{type(exc).__name__}: {exc}"
        if fed_args.hub_token:
            message = message.replace(fed_args.hub_token, "***")
        get_logger(__name__).error(
            f"pushing round {round_index} to '{fed_args.hub_model_id}' failed ({message}); the round is saved in "
            f"'{folder}' and training continues. Push it later with `hf-fedlora push`."
        )
        return {"ok": False, "error": message}


__all__ = ["push_round_safely"]
