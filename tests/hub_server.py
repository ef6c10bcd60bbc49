"""A local Hub-compatible HTTP server for tests (test support code, not part of the package).

It speaks the part of the Hugging Face Hub's HTTP surface that ``huggingface_hub`` 2.x uses to
create repos, commit files, tag revisions, list refs/trees/commits and download files (see
``docs/hub-protocol.md`` in the shared docs). Blobs live on disk under ``root``; repos, commits
and refs live in memory. Every request is logged, and faults can be injected::

    hub = LocalHub(tmp_path, token="hf_test_secret").start()
    hub.fail("POST", r"/commit/", status=500, times=1)     # the next commit answers 500
    hub.fail("POST", r"/commit/", status="drop")            # ... or the connection is closed
    HfApi(endpoint=hub.url, token="hf_test_secret").create_repo("user/repo")
    hub.count("POST", "/commit/")                           # how many commit requests arrived

Every file is answered ``"regular"`` at preupload, so content travels base64 inside the commit
and neither LFS nor Xet is ever involved (no ``HF_HUB_DISABLE_XET`` needed).

Pointing the client at it: ``HfApi(endpoint=hub.url)`` is enough for writes and for
``snapshot_download(..., endpoint=hub.url)``. Code that takes no endpoint (``hf_hub_download``
inside PEFT, ``huggingface_hub.file_exists``) reads module state fixed at import, so the
``hub_env`` fixture below patches ``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``,
the module-level ``huggingface_hub.hf_api.api.endpoint`` and turns ``HF_HUB_OFFLINE`` off.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

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
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


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
        self._lock = threading.RLock()
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
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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
        with self._lock:
            self.faults.append(Fault(method.upper(), re.compile(path_regex), status, times, after))

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def requests(self, method: str | None = None, contains: str = "") -> list[LoggedRequest]:
        """Logged requests, filtered by method and a substring of the path."""
        with self._lock:
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
        entry = repo.commits[self._resolve(repo, revision)].files[path]
        return (self.blob_dir / entry.sha256).read_bytes()

    # -- storage -------------------------------------------------------------------------------
    def _store_blob(self, data: bytes) -> Entry:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_dir / sha256
        if not path.exists():
            tmp = path.with_suffix(f".tmp{next(self._counter)}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return Entry(git_blob_sha1(data), sha256, len(data))

    def _new_commit(
        self, repo: Repo, parent: str | None, files: dict[str, Entry], title: str, message: str
    ) -> str:
        seed = json.dumps(
            [repo.repo_id, parent, sorted((p, e.sha1) for p, e in files.items()), title, next(self._counter)]
        )
        sha = hashlib.sha1(seed.encode()).hexdigest()
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        repo.commits[sha] = Commit(sha, parent, files, title, message, date)
        return sha

    def _resolve(self, repo: Repo, revision: str) -> str:
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


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _take_fault(self, method: str, path: str) -> Fault | None:
        hub = self.hub
        with hub._lock:
            for fault in hub.faults:
                if fault.method == method and fault.pattern.search(path):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            hub.faults.remove(fault)
                    return fault
        return None

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
        fault = self._take_fault(method, path)
        if fault is not None and not fault.after:
            self._inject(method, path, fault)
            return
        try:
            with self.hub._lock:
                status, payload, headers = self._route(method, path, query, body)
            if fault is not None:
                self._inject(method, path, fault)
                return
        except HubError as exc:
            self._log(method, path, exc.status)
            self._send(
                exc.status, {"error": exc.message}, code=exc.code, message=exc.message, headers=exc.headers
            )
            return
        except Exception as exc:  # a bug in the test server: answer 500 and say so
            self._log(method, path, 500)
            self._send(500, {"error": f"local hub crashed: {exc!r}"})
            raise
        self._log(method, path, status)
        self._send(status, payload, headers=headers, head=method == "HEAD")

    def _inject(self, method: str, path: str, fault: Fault) -> None:
        self._log(method, path, fault.status)
        if fault.status == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._send(int(fault.status), {"error": "injected fault"}, message="injected fault")

    def _log(self, method: str, path: str, status: int | str) -> None:
        with self.hub._lock:
            self.hub.log.append(LoggedRequest(method, path, status))

    def _send(self, status, payload, *, code=None, message=None, headers=None, head=False) -> None:
        if isinstance(payload, (bytes, bytearray)):
            data, ctype = bytes(payload), "application/octet-stream"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if code:
            self.send_header("X-Error-Code", code)
        if message:
            self.send_header("X-Error-Message", message)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    # -- auth ----------------------------------------------------------------------------------
    def _authorized(self) -> bool:
        token = self.hub.token
        return token is None or self.headers.get("Authorization", "") == f"Bearer {token}"

    def _check_write(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header", "Unauthorized")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            raise HubError(404 if repo is None else 401, "Repository not found", "RepoNotFound")
        return repo

    # -- routing -------------------------------------------------------------------------------
    _API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<action>[a-z-]+)(?:/(?P<rest>.*))?)?$")
    _RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")

    def _route(self, method: str, path: str, query: dict, body: bytes):
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if method == "DELETE" and path == "/api/repos/delete":
            self._check_write()
            data = json.loads(body or b"{}")
            self.hub.repos.pop(f"{data.get('organization') or self.hub.namespace}/{data['name']}", None)
            return 200, {}, None
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}").get("content", ""))
        if method == "GET" and path == "/api/whoami-v2":
            self._check_write()
            return (
                200,
                {
                    "type": "user",
                    "name": self.hub.namespace,
                    "orgs": [],
                    "auth": {"accessToken": {"role": "write"}},
                },
                None,
            )
        match = self._RESOLVE.match(path)
        if match and method in ("GET", "HEAD"):
            return self._resolve_file(match["repo"], match["rev"], unquote(match["file"]), method)
        match = self._API.match(path)
        if match is None:
            raise HubError(404, f"no route for {method} {path}")
        repo = self._repo(match["repo"])
        action, rest = match["action"], match["rest"] or ""
        if action is None and method == "GET":
            return self._info(repo, "main")
        if action == "revision" and method == "GET":
            return self._info(repo, rest)
        if action == "refs" and method == "GET":
            return self._refs(repo)
        if action == "tree" and method == "GET":
            rev, _, sub = rest.partition("/")
            return self._tree(
                repo, rev, unquote(sub), query.get("recursive", ["false"])[0].lower() in ("1", "true")
            )
        if action == "paths-info" and method == "POST":
            return self._paths_info(repo, rest, parse_qs(body.decode()).get("paths", []))
        if action == "commits" and method == "GET":
            return self._commits(repo, rest)
        if action == "preupload" and method == "POST":
            return self._preupload(repo, rest, json.loads(body))
        if action == "commit" and method == "POST":
            return self._commit(repo, rest, body)
        if action == "tag" and method == "POST":
            return self._tag(repo, rest, json.loads(body or b"{}"))
        if action == "tag" and method == "DELETE":
            self._check_write()
            if repo.tags.pop(unquote(rest), None) is None:
                raise HubError(404, f"Tag {unquote(rest)} not found", "RevisionNotFound")
            return 200, {}, None
        if action == "branch" and method == "POST":
            self._check_write()
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.branches[unquote(rest)] = self.hub._resolve(repo, start)
            return 200, {}, None
        raise HubError(404, f"no route for {method} {path}")

    # -- write path ----------------------------------------------------------------------------
    def _create_repo(self, data: dict):
        self._check_write()
        repo_id = f"{data.get('organization') or self.hub.namespace}/{data['name']}"
        url = {"url": f"{self.hub.url}/{repo_id}", "name": repo_id}
        if repo_id in self.hub.repos:
            return 409, {**url, "error": "You already created this model repo"}, None
        repo = Repo(repo_id, bool(data.get("private")) or data.get("visibility") == "private")
        files = {".gitattributes": self.hub._store_blob(GITATTRIBUTES)}
        repo.branches["main"] = self.hub._new_commit(repo, None, files, "initial commit", "")
        self.hub.repos[repo_id] = repo
        return 200, url, None

    def _validate_yaml(self, content: str):
        match = re.search(r"^base_model:\s*(\S+)\s*$", content.split("\n---", 1)[0], re.MULTILINE)
        known = self.hub.known_models
        if match and known is not None and match[1] not in known:
            message = f'"base_model" with value "{match[1]}" is not valid. Use a model id from https://hf.co/models.'
            return 400, {"errors": [{"message": message}], "warnings": []}, None
        return 200, {"errors": [], "warnings": []}, None

    def _preupload(self, repo: Repo, rev: str, data: dict):
        self._check_write()
        files = repo.commits[self.hub._resolve(repo, rev)].files if unquote(rev) in repo.branches else {}
        answer = []
        for item in data.get("files", []):
            existing = files.get(item["path"])
            answer.append(
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": existing.sha1 if existing else None,
                }
            )
        return 200, {"files": answer, "commitOid": repo.branches.get(unquote(rev))}, None

    def _commit(self, repo: Repo, rev: str, body: bytes):
        self._check_write()
        branch = unquote(rev)
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        head = repo.branches[branch]
        files = dict(repo.commits[head].files)
        header: dict = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "only base64 file content is supported")
                files[_check_repo_path(value["path"])] = self.hub._store_blob(
                    base64.b64decode(value["content"])
                )
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: e for p, e in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(
                    400, f"unsupported commit operation {key!r} (this local hub only takes regular files)"
                )
        parent = header.get("parentCommit")
        if parent and parent != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        sha = self.hub._new_commit(
            repo, head, files, header.get("summary", ""), header.get("description", "")
        )
        repo.branches[branch] = sha
        prefix = f"{self.hub.url}/{repo.repo_id}"
        return 200, {"commitUrl": f"{prefix}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}, None

    def _tag(self, repo: Repo, rev: str, data: dict):
        self._check_write()
        tag = data["tag"]
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists", None)
        repo.tags[tag] = self.hub._resolve(repo, rev)
        return 200, {}, None

    # -- read path -----------------------------------------------------------------------------
    def _info(self, repo: Repo, rev: str):
        sha = self.hub._resolve(repo, rev)
        commit = repo.commits[sha]
        info = {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": sha,
            "private": repo.private,
            "lastModified": commit.date,
            "tags": [],
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }
        return 200, info, None

    def _refs(self, repo: Repo):
        branches = [
            {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in sorted(repo.branches.items())
        ]
        tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in sorted(repo.tags.items())]
        return 200, {"branches": branches, "tags": tags, "converts": [], "pullRequests": []}, None

    @staticmethod
    def _entry_json(path: str, entry: Entry) -> dict:
        return {"type": "file", "path": path, "size": entry.size, "oid": entry.sha1}

    def _tree(self, repo: Repo, rev: str, sub: str, recursive: bool):
        files = repo.commits[self.hub._resolve(repo, rev)].files
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        out, dirs = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix) :]
            if "/" in rel and not recursive:
                dirs.add(prefix + rel.split("/")[0])
                continue
            parts = rel.split("/")
            for i in range(1, len(parts)):
                dirs.add(prefix + "/".join(parts[:i]))
            out.append(self._entry_json(path, files[path]))
        out += [
            {"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()}
            for d in sorted(dirs)
        ]
        if prefix and not out:
            raise HubError(404, f"{sub} does not exist", "EntryNotFound")
        out += self.hub.tree_overrides.get(repo.repo_id, [])
        return 200, out, None

    def _paths_info(self, repo: Repo, rev: str, paths: list[str]):
        files = repo.commits[self.hub._resolve(repo, rev)].files
        return 200, [self._entry_json(p, files[p]) for p in paths if p in files], None

    def _commits(self, repo: Repo, rev: str):
        out, sha = [], self.hub._resolve(repo, rev)
        while sha is not None:
            c = repo.commits[sha]
            out.append(
                {
                    "id": c.sha,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": self.hub.namespace}],
                    "date": c.date,
                }
            )
            sha = c.parent
        return 200, out, None

    def _resolve_file(self, repo_id: str, rev: str, filename: str, method: str):
        repo = self._repo(repo_id)
        sha = self.hub._resolve(repo, rev)
        entry = repo.commits[sha].files.get(filename)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        data = (self.hub.blob_dir / entry.sha256).read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.sha1}"', "Accept-Ranges": "bytes"}
        byte_range = self.headers.get("Range")
        if byte_range and method == "GET":
            match = re.match(r"bytes=(\d+)-(\d*)", byte_range)
            if match:
                start = int(match[1])
                end = int(match[2]) if match[2] else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return 206, data[start : end + 1], headers
        return 200, data, headers


def _check_repo_path(path: str) -> str:
    if path.startswith("/") or ".." in path.split("/"):
        raise HubError(400, f"invalid path {path!r}")
    return path


# -- pytest fixtures (import them by name into a test module) -------------------------------------

HUB_TOKEN = "hf_localhubSECRETtoken0123456789"


@pytest.fixture
def local_hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """A running :class:`LocalHub` that requires ``HUB_TOKEN`` for writes and private reads; the
    client's retry backoff is cut to 10 ms so that injected faults cost no test time."""
    monkeypatch.setattr("hf_fedlora.hub._retry._BASE_WAIT", 0.01)
    hub = LocalHub(tmp_path_factory.mktemp("local_hub"), token=HUB_TOKEN).start()
    try:
        yield hub
    finally:
        hub.stop()
        shutil.rmtree(hub.root, ignore_errors=True)


@pytest.fixture
def hub_env(local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch) -> LocalHub:
    """``local_hub``, plus the process pointed at it for code that takes no ``endpoint``
    (PEFT's ``hf_hub_download``, ``huggingface_hub.file_exists``) and offline mode off."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", local_hub.url)
    monkeypatch.setattr(constants, "ENDPOINT", local_hub.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", local_hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", local_hub.url)
    # conftest's HF_HOME/HF_HUB_CACHE env vars come after huggingface_hub read them at import
    cache = local_hub.root / "client_cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(local_hub.root / "client_home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(local_hub.root / "client_home" / "token"))
    monkeypatch.setattr(
        constants, "HF_STORED_TOKENS_PATH", str(local_hub.root / "client_home" / "stored_tokens")
    )
    return local_hub


def quote_rev(revision: str) -> str:
    return quote(revision, safe="")
