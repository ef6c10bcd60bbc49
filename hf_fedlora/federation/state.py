"""Resumable run state: what a killed federation needs to continue exactly where it stopped.

A round is *complete* once its global adapter folder, its JSONL line and ``state.json`` are all
written, in that order. ``state.json`` is replaced atomically, so it always names a complete round;
on resume, JSONL lines of later (incomplete) rounds are dropped and the round is redone. Because
every client's training is seeded from ``(seed, round, client)`` and the previous global adapter
is read back from disk, the resumed run ends with the same result as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .guard import LOCK_NAME
from .rounds import METRICS_NAME, atomic_write_text

STATE_NAME = "state.json"
EXCHANGE_DIR = "_exchange"


class CorruptRunError(ValueError):
    """A run's ``state.json`` or ``metrics.jsonl`` cannot be read back (truncated, garbage, or edited)."""


def _corrupt(path: Path, what: str) -> CorruptRunError:
    return CorruptRunError(
        f"'{path}' is not a valid {what}; pass `--overwrite_output_dir` to start over, or choose another "
        "`--output_dir`."
    )


@dataclass
class RunState:
    """Everything besides the adapters that the next round depends on.

    Attributes:
        completed_round (`int`): last complete round (0: only the initial adapter exists).
        ranks (`list[int]`): current rank of every client id.
        scores (`dict[str, float]`): quality scores collected for the rank upgrade, by client id.
        cumulative_bytes (`int`): bytes sent up and down so far.
        fingerprint (`dict`): the options that must not change on resume.
        arguments (`dict`): every option of the run (the Hub token left out), so that ``--resume``
            with only ``--output_dir`` continues the same run.
    """

    completed_round: int = 0
    ranks: list[int] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    cumulative_bytes: int = 0
    fingerprint: dict[str, Any] = field(default_factory=dict)
    arguments: dict[str, Any] = field(default_factory=dict)

    def save(self, output_dir: str | os.PathLike) -> None:
        """Write ``state.json`` atomically (temp file + ``os.replace``)."""
        atomic_write_text(
            Path(output_dir) / STATE_NAME, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"
        )

    @classmethod
    def load(cls, output_dir: str | os.PathLike) -> RunState | None:
        """The saved state, or ``None`` when ``output_dir`` has none.

        Raises:
            CorruptRunError: ``state.json`` is truncated, not JSON, or not a run state (names the file).
        """
        path = Path(output_dir) / STATE_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            state = cls(**data)
        except (ValueError, TypeError, UnicodeDecodeError):
            raise _corrupt(path, "run state (it is truncated or not the JSON a run writes)") from None
        if not isinstance(state.completed_round, int) or not isinstance(state.ranks, list):
            raise _corrupt(path, "run state (`completed_round` or `ranks` has the wrong type)")
        return state

    def check_resumable(
        self,
        fingerprint: dict[str, Any],
        output_dir: str | os.PathLike,
        defaults: dict[str, Any] | None = None,
    ) -> None:
        """Refuse to resume with options that would change the result.

        An option the saved run does not list (it was added to the recipe later) counts as having
        been at its value in ``defaults``, so a run saved by an older version resumes as long as
        the new option stays at its default.

        Raises:
            ValueError: listing each option whose value differs from the saved run's.
        """
        missing = object()
        saved = {
            **{k: v for k, v in (defaults or {}).items() if k not in self.fingerprint},
            **self.fingerprint,
        }
        changed = {
            k: (saved.get(k, missing), v) for k, v in fingerprint.items() if saved.get(k, missing) != v
        }
        changed = {k: ("(absent)" if old is missing else old, new) for k, (old, new) in changed.items()}
        if changed:
            detail = ", ".join(
                f"`{k}`: saved {old!r}, now {new!r}" for k, (old, new) in sorted(changed.items())
            )
            raise ValueError(
                f"cannot resume the run in '{output_dir}' with different options ({detail}); use the saved options "
                "or a new `output_dir`."
            )


def saved_arguments(output_dir: str | os.PathLike) -> dict[str, Any]:
    """The options a run in ``output_dir`` saved (``{}`` when it has no ``state.json``); a run saved
    before the options were (``arguments`` empty) gives its fingerprint, the options that must not change.

    Raises:
        CorruptRunError: its ``state.json`` cannot be read back.
    """
    state = RunState.load(output_dir)
    if state is None:
        return {}
    return dict(state.arguments or state.fingerprint)


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[str]:
    """Delete the hidden temporary files and folders a killed run left behind; returns their names.

    Rounds and state files are written to ``.<name>.*`` temporaries and renamed into place, so a
    kill can leave such a temporary but never a half-written round; this sweeps them on restart.
    """
    removed = []
    for path in Path(output_dir).glob(".*"):
        if (
            any(path.name.startswith(f".{name}.") for name in (STATE_NAME, METRICS_NAME))
            or ".tmp-" in path.name
        ):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path.name)
    return removed


def clear_output_dir(out: Path, keep: str) -> None:
    """Delete everything in ``out`` but the file named ``keep`` (the lock this run holds)."""
    for path in out.iterdir():
        if path.name == keep:
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def prepare_output_dir(out: Path, fed_args: Any, accelerator: Any) -> RunState | None:
    """Check the output folder (every process), clear it if asked (main), and return a saved state
    (``fed_args``: the run's ``FederationArguments``).

    ``--overwrite_output_dir`` clears the folder without reading it, so it also clears a corrupt
    ``state.json``; without it a corrupt one is a :class:`CorruptRunError` naming the file."""
    if fed_args.overwrite_output_dir:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and out.is_dir():
            clear_output_dir(out, keep=LOCK_NAME)
        accelerator.wait_for_everyone()
        return None
    state = RunState.load(out)
    if state is not None and fed_args.resume:
        check_records(out)
    if state is not None and not fed_args.resume:
        raise FileExistsError(
            f"'{out}' already holds a run (round {state.completed_round} complete); pass `--resume` to continue "
            "it, `--overwrite_output_dir` to start over, or choose another `--output_dir`."
        )
    return state


def check_records(out: Path) -> None:
    """Refuse to resume over a ``metrics.jsonl`` with garbage before its last line (a torn last line
    is what a kill leaves, and resuming drops it)."""
    path = out / METRICS_NAME
    if not path.is_file():
        return
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise _corrupt(path, "metrics file (not UTF-8 text)") from None
    for number, line in enumerate(lines[:-1], start=1):
        try:
            data = json.loads(line)
            ok = isinstance(data, dict) and isinstance(data.get("round"), int)
        except ValueError:
            ok = False
        if not ok:
            raise _corrupt(path, f"metrics file (line {number} is not a round's JSON object)")


__all__ = [
    "EXCHANGE_DIR",
    "STATE_NAME",
    "CorruptRunError",
    "RunState",
    "check_records",
    "clear_output_dir",
    "prepare_output_dir",
    "remove_stale_temporaries",
    "saved_arguments",
]
