"""What a run does with its options besides parsing them: the fingerprint ``--resume`` checks, the
options saved in ``state.json``, the command that reproduces a run, and the flat view for trackers.
The ``*Arguments`` groups themselves are in :mod:`.config`."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, fields
from typing import Any

RESUMABLE_OPTIONS = frozenset(
    (
        "rounds",
        "output_dir",
        "resume",
        "overwrite_output_dir",
        "report_to",
        "push_to_hub",
        "hub_model_id",
        "hub_private",
        "hub_token",
        "threads",
        "save_client_adapters",
        "keep_client_adapters",
    )
)
"""Options a ``--resume`` may change: they do not change the result of the rounds already run."""


def _default(f: Any) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def resume_fingerprint(*groups: Any) -> dict[str, Any]:
    """The options of the argument groups that must not change on resume, as JSON values."""
    values = {k: v for group in groups for k, v in asdict(group).items() if k not in RESUMABLE_OPTIONS}
    return json.loads(json.dumps(values))


def run_arguments(*groups: Any) -> dict[str, Any]:
    """Every option of the run as JSON values, saved in ``state.json`` for ``--resume`` (the Hub
    token and the output folder's own options left out)."""
    skip = ("hub_token", "resume", "overwrite_output_dir", "output_dir")
    return json.loads(json.dumps({k: v for g in groups for k, v in asdict(g).items() if k not in skip}))


def option_defaults(*groups: Any) -> dict[str, Any]:
    """Each option's default value, as :func:`resume_fingerprint` writes values (a run saved before
    an option existed resumes as if it had the default)."""
    defaults = {
        f.name: _default(f)
        for group in groups
        for f in fields(group)
        if f.default is not MISSING or f.default_factory is not MISSING
    }
    return json.loads(json.dumps(defaults, default=str))


def reproduce_command(*groups: Any, script: str = "recipes/fed_glue.py") -> str:
    """A command line that reproduces the run: ``script`` with every option whose value differs from its default."""
    parts = [f"accelerate launch {script}"]
    for group in groups:
        for f in fields(group):
            value = getattr(group, f.name)
            if f.name in ("hub_token", "resume", "overwrite_output_dir") or value == _default(f):
                continue
            shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
            parts.append(
                f"--{f.name} {shown}"
                if " " not in shown or isinstance(value, list)
                else f"--{f.name} '{shown}'"
            )
    return " \\\n    ".join(parts)


def tracker_config(*groups: Any) -> dict[str, Any]:
    """The options as flat scalars for experiment trackers (the Hub token left out)."""
    flat: dict[str, Any] = {}
    for group in groups:
        for key, value in asdict(group).items():
            if key != "hub_token":
                flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


__all__ = [
    "RESUMABLE_OPTIONS",
    "option_defaults",
    "reproduce_command",
    "resume_fingerprint",
    "run_arguments",
    "tracker_config",
]
