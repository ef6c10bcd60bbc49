"""Reading files a client controls, within bounds (leaf module: constants and errors only).

A client controls its files: their kind (a FIFO blocks a reader forever), their size and the
depth of their JSON. Each check runs before the read or the parse it guards and raises the
client's :class:`~hf_fedlora.errors.AdapterError` naming the file. Used by the adapter readers and
by the Hub layer's check of a folder before a push.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from .constants import MAX_JSON_BYTES, MAX_JSON_DEPTH
from .errors import AdapterFormatError, AdapterNotFoundError


def open_regular(path: Path, where: str, max_bytes: int | None = None) -> int:
    """Open ``path`` read-only after checking it is a regular file no larger than ``max_bytes``.

    The kind is checked with ``os.stat`` before opening and again on the open descriptor (opened
    non-blocking, so a FIFO swapped in between cannot block us). Returns the file descriptor.

    Raises:
        AdapterNotFoundError: no such file. AdapterFormatError: not a regular file, a symlink
        loop, unreadable, or too large.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise AdapterNotFoundError(f"{where}: file '{path.name}' is missing from '{path.parent}'.") from exc
    except OSError as exc:  # ELOOP (symlink loop), EACCES, ENAMETOOLONG
        raise AdapterFormatError(f"{where}, file '{path.name}': cannot be opened ({exc.strerror}).") from exc
    _check_kind(info, path, where, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise AdapterFormatError(f"{where}, file '{path.name}': cannot be opened ({exc.strerror}).") from exc
    try:
        _check_kind(os.fstat(fd), path, where, max_bytes)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_kind(info: os.stat_result, path: Path, where: str, max_bytes: int | None) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise AdapterFormatError(
            f"{where}, file '{path.name}': is not a regular file (a FIFO, device, socket or folder); "
            "refusing to read it."
        )
    if max_bytes is not None and info.st_size > max_bytes:
        raise AdapterFormatError(
            f"{where}, file '{path.name}': is {info.st_size:,} bytes, over the limit of {max_bytes:,} bytes "
            "for this file; a PEFT adapter's JSON files are a few kilobytes."
        )


def read_small_text(path: Path, where: str, max_bytes: int = MAX_JSON_BYTES) -> str:
    """A regular file of at most ``max_bytes`` as UTF-8 text."""
    fd = open_regular(path, where, max_bytes)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise AdapterFormatError(f"{where}, file '{path.name}': grew over {max_bytes:,} bytes while read.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterFormatError(f"{where}, file '{path.name}': cannot be read as text ({exc}).") from exc


def json_nesting(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON ``text`` (strings skipped), without parsing it."""
    depth = deepest = 0
    for match in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', text):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


def parse_json(text: str, where: str, what: str, name: str) -> Any:
    """``json.loads`` with the nesting depth bounded first (a 100k-deep file is refused, not a
    ``RecursionError``) and huge numbers refused rather than raising ``ValueError`` deep inside."""
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and json_nesting(text) > MAX_JSON_DEPTH:
        raise AdapterFormatError(
            f"{where}, file '{name}': {what} is nested deeper than {MAX_JSON_DEPTH} levels; refusing to parse it."
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(
            f"{where}, file '{name}': {what} is not valid JSON ({exc.msg} at line {exc.lineno})."
        ) from exc
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
        raise AdapterFormatError(f"{where}, file '{name}': {what} cannot be parsed ({exc}).") from exc


__all__ = ["json_nesting", "open_regular", "parse_json", "read_small_text"]
