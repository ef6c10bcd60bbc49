"""What the local Hub stores: repos, commits and their file entries (blobs sit on disk by sha256)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Entry:
    """A file in a commit's tree."""

    sha1: str
    sha256: str
    size: int


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Entry]
    title: str
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int | str  # an HTTP status, or "drop" to close the connection without answering
    times: int | None  # None: forever
    after: bool = False  # True: handle the request first, then fail (the answer is lost)


@dataclass
class LoggedRequest:
    method: str
    path: str
    status: int | str


class HubError(Exception):
    """An error answer of the Hub: HTTP status, message, ``X-Error-Code`` and extra headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
