"""The HTTP side of the local Hub: one handler class that routes the Hub's endpoints to the
``LocalHub`` it is bound to (``handler.hub``) and answers in the Hub's JSON shapes and headers."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from .storage import GITATTRIBUTES, Entry, Fault, HubError, LoggedRequest, Repo

if TYPE_CHECKING:
    from .server import LocalHub


class Handler(BaseHTTPRequestHandler):
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

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
        fault = self.hub.take_fault(method, path)
        if fault is not None and not fault.after:
            self._inject(method, path, fault)
            return
        try:
            with self.hub.lock:
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
        with self.hub.lock:
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
            repo.branches[unquote(rest)] = self.hub.resolve(repo, start)
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
        files = {".gitattributes": self.hub.store_blob(GITATTRIBUTES)}
        repo.branches["main"] = self.hub.new_commit(repo, None, files, "initial commit", "")
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
        files = repo.commits[self.hub.resolve(repo, rev)].files if unquote(rev) in repo.branches else {}
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
                files[_check_repo_path(value["path"])] = self.hub.store_blob(
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
        sha = self.hub.new_commit(repo, head, files, header.get("summary", ""), header.get("description", ""))
        repo.branches[branch] = sha
        prefix = f"{self.hub.url}/{repo.repo_id}"
        return 200, {"commitUrl": f"{prefix}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}, None

    def _tag(self, repo: Repo, rev: str, data: dict):
        self._check_write()
        tag = data["tag"]
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists", None)
        repo.tags[tag] = self.hub.resolve(repo, rev)
        return 200, {}, None

    # -- read path -----------------------------------------------------------------------------
    def _info(self, repo: Repo, rev: str):
        sha = self.hub.resolve(repo, rev)
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
        files = repo.commits[self.hub.resolve(repo, rev)].files
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
        files = repo.commits[self.hub.resolve(repo, rev)].files
        return 200, [self._entry_json(p, files[p]) for p in paths if p in files], None

    def _commits(self, repo: Repo, rev: str):
        out, sha = [], self.hub.resolve(repo, rev)
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
        sha = self.hub.resolve(repo, rev)
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
