"""``LocalHub``: the server's lifecycle, its storage operations and the controls tests use."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import unquote

from .protocol import Handler
from .storage import Commit, Entry, Fault, HubError, LoggedRequest, Repo, git_blob_sha1


class LocalHub:
    """A Hub-compatible server on ``127.0.0.1`` with a free port. Use as a context manager or
    call :meth:`start` / :meth:`stop`."""

    def __init__(self, root: str | Path, *, token: str | None = None, namespace: str = "user"):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.namespace = namespace
        self.repos: dict[str, Repo] = {}
        self.log: list[LoggedRequest] = []
        self.faults: list[Fault] = []
        self.tree_overrides: dict[str, list[dict]] = {}  # repo_id -> extra tree entries (hostile names)
        self.known_models: set[str] | None = None  # when set, validate-yaml refuses other base_model values
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        handler = type("BoundHandler", (Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test controls -------------------------------------------------------------------------
    def fail(
        self,
        method: str,
        path_regex: str,
        *,
        status: int | str = 500,
        times: int | None = 1,
        after: bool = False,
    ) -> None:
        """Make the next ``times`` requests matching ``method`` and ``path_regex`` fail with
        ``status`` (an HTTP code, or ``"drop"``: the connection closes without an answer).
        ``times=None`` fails them forever. ``after=True`` handles the request first (the commit
        or tag is made) and then fails, as when the answer is lost on the way back."""
        with self.lock:
            self.faults.append(Fault(method.upper(), re.compile(path_regex), status, times, after))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def take_fault(self, method: str, path: str) -> Fault | None:
        """The fault that applies to this request, if any (counting it down)."""
        with self.lock:
            for fault in self.faults:
                if fault.method == method and fault.pattern.search(path):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self.faults.remove(fault)
                    return fault
        return None

    def requests(self, method: str | None = None, contains: str = "") -> list[LoggedRequest]:
        """Logged requests, filtered by method and a substring of the path."""
        with self.lock:
            return [
                r for r in self.log if (method is None or r.method == method.upper()) and contains in r.path
            ]

    def count(self, method: str | None = None, contains: str = "") -> int:
        return len(self.requests(method, contains))

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """The commits of ``branch``, newest first."""
        repo = self.repos[repo_id]
        out, sha = [], repo.branches.get(branch)
        while sha is not None:
            out.append(repo.commits[sha])
            sha = repo.commits[sha].parent
        return out

    def file_bytes(self, repo_id: str, revision: str, path: str) -> bytes:
        repo = self.repos[repo_id]
        entry = repo.commits[self.resolve(repo, revision)].files[path]
        return (self.blob_dir / entry.sha256).read_bytes()

    # -- storage -------------------------------------------------------------------------------
    def store_blob(self, data: bytes) -> Entry:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_dir / sha256
        if not path.exists():
            tmp = path.with_suffix(f".tmp{next(self._counter)}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return Entry(git_blob_sha1(data), sha256, len(data))

    def new_commit(
        self, repo: Repo, parent: str | None, files: dict[str, Entry], title: str, message: str
    ) -> str:
        seed = json.dumps(
            [repo.repo_id, parent, sorted((p, e.sha1) for p, e in files.items()), title, next(self._counter)]
        )
        sha = hashlib.sha1(seed.encode()).hexdigest()
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        repo.commits[sha] = Commit(sha, parent, files, title, message, date)
        return sha

    def resolve(self, repo: Repo, revision: str) -> str:
        """The commit sha a branch, tag or sha names."""
        revision = unquote(revision)
        revision = revision.removeprefix("refs/heads/")
        revision = revision.removeprefix("refs/tags/")
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
