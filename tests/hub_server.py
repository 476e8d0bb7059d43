"""A loopback Hugging Face Hub-compatible server for offline tests (stdlib only).

It implements just what ``huggingface_hub`` needs to create repos, upload folders (preupload, the LFS batch
API with basic and multipart transfers, the ndjson commit endpoint), resolve/download files
(``hf_hub_download``, ``timm``'s ``hf-hub:``), read repo info, and what ``datasets`` / ``HfFileSystem``
need to stream a dataset repo (``tree`` with ``recursive``, ``paths-info``, ``Range`` requests on resolve
and storage). ``add_files`` seeds a repo directly; every request records the body bytes it sent, so tests
can count what a client downloads (``bytes_served``). Xet is never advertised, so clients must run
with ``HF_HUB_DISABLE_XET=1`` (with ``hf_xet`` installed, ``upload_folder`` would otherwise go straight to a
Xet CAS server).

Two listeners on 127.0.0.1: the API (``url``, what ``HF_ENDPOINT`` points to) and a separate "storage"
origin (``storage_url``) playing the CDN/S3 role for LFS blobs, so ``huggingface_hub`` treats LFS
downloads and uploads as off-Hub and must not send the token there (recorded in ``requests``).

    with FakeHub(token="hf_testtoken123") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", ...}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["FakeHub", "RequestRecord"]

LFS_SUFFIXES = (".safetensors", ".parquet", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz",
                ".arrow", ".zip", ".gz", ".tar", ".png", ".jpg", ".jpeg")
_REPO_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub uses as ETag of regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FileEntry:
    size: int
    data: bytes | None = None  # regular (git) file
    lfs_oid: str | None = None  # sha256 of an LFS object

    @property
    def etag(self) -> str:
        return self.lfs_oid or git_blob_sha1(self.data or b"")


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, FileEntry]] = field(default_factory=dict)  # commit sha -> tree


@dataclass
class RequestRecord:
    origin: str  # "api" or "storage"
    method: str
    path: str
    status: int
    had_authorization: bool
    body_bytes: int = 0  # bytes of the response body sent


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: FakeHub, origin: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self.origin = origin


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = body or {}


class FakeHub:
    """The loopback Hub. ``token`` is the only accepted write token; ``url`` is the API origin."""

    def __init__(
        self,
        token: str = "hf_testtoken123",
        *,
        user: str = "test-user",
        lfs_threshold: int = 10 * 1024 * 1024,
        multipart_threshold: int = 8 * 1024 * 1024,
        chunk_size: int = 4 * 1024 * 1024,
        max_body: int = 512 * 1024 * 1024,
    ) -> None:
        self.token, self.user = token, user
        self.lfs_threshold, self.multipart_threshold, self.chunk_size = lfs_threshold, multipart_threshold, chunk_size
        self.max_body = max_body
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.parts: dict[tuple[str, int], bytes] = {}
        self.requests: list[RequestRecord] = []
        self.unhandled: list[str] = []
        self.fail: set[str] = set()  # endpoint names ("commit", "preupload", "lfs", "create") that answer 500
        self.lock = threading.RLock()
        self._commit_counter = 0
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        for origin in ("api", "storage"):
            server = _Server(self, origin)
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def storage_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    # -- inspection ----------------------------------------------------------------------------------------

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """The content of every file at a revision."""
        repo = self.repo(repo_id, repo_type)
        tree = repo.commits[repo.branches.get(revision, revision)]
        return {p: (e.data if e.lfs_oid is None else self.lfs[e.lfs_oid]) or b"" for p, e in tree.items()}

    def add_files(self, repo_id: str, files: dict[str, bytes], repo_type: str = "dataset") -> str:
        """Commit ``files`` straight into a (new or existing, public) repo, without the upload API; returns the sha."""
        with self.lock:
            repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_type, repo_id, private=False))
            tree = dict(repo.commits[repo.branches["main"]]) if "main" in repo.branches else {}
            for path, data in files.items():
                if self.is_lfs(path, len(data), data[:512]):
                    oid = hashlib.sha256(data).hexdigest()
                    self.lfs[oid] = data
                    tree[path] = FileEntry(len(data), lfs_oid=oid)
                else:
                    tree[path] = FileEntry(len(data), data=data)
            sha = self.new_commit_sha(repo, f"add {len(files)} files")
            repo.commits[sha] = tree
            repo.branches["main"] = sha
        return sha

    def bytes_served(self, path_contains: str = "") -> int:
        """Response body bytes sent so far (by both origins), for requests whose path contains ``path_contains``."""
        with self.lock:
            return sum(r.body_bytes for r in self.requests if path_contains in r.path)

    # -- helpers -------------------------------------------------------------------------------------------

    def authorized(self, headers: Any) -> bool:
        return headers.get("Authorization", "") == f"Bearer {self.token}"

    def new_commit_sha(self, repo: Repo, message: str) -> str:
        self._commit_counter += 1
        return hashlib.sha1(f"{repo.repo_id}:{self._commit_counter}:{message}".encode()).hexdigest()

    def is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        return size >= self.lfs_threshold or path.lower().endswith(LFS_SUFFIXES) or b"\0" in sample


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds per socket operation: a stuck client cannot hold a thread forever
    server: _Server

    # silence the default stderr logging (requests are recorded in hub.requests instead)
    def log_message(self, format: str, *args: Any) -> None:
        return

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    # -- plumbing ------------------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > self.hub.max_body:
                    raise _HTTPError(413, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body:
            raise _HTTPError(413, "request body too large")
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        try:
            return json.loads(self._read_body() or b"{}")
        except json.JSONDecodeError as e:
            raise _HTTPError(400, f"invalid JSON body: {e}") from e

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            self._sent = len(body)
        self._status = status

    def _send_file(self, data: bytes, headers: dict[str, str]) -> None:
        """A file's bytes, or the part a ``Range`` header asks for (206, like the Hub's resolve and its CDN)."""
        headers = {**headers, "Accept-Ranges": "bytes"}
        part = _byte_range(self.headers.get("Range"), len(data))
        if part is None:
            self._send(200, data, headers, content_type="application/octet-stream")
            return
        start, stop = part
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        self._send(206, data[start:stop], headers, content_type="application/octet-stream")

    def _send_json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self) -> None:
        self._status = self._sent = 0
        split = urlsplit(self.path)
        self._query = parse_qs(split.query)
        segments = [unquote(s) for s in split.path.strip("/").split("/")] if split.path.strip("/") else []
        try:
            handled = (self._route_storage if self.server.origin == "storage" else self._route_api)(segments)
            if not handled:
                self.hub.unhandled.append(f"{self.server.origin} {self.command} {self.path}")
                raise _HTTPError(404, f"not implemented by the test server: {self.command} {split.path}")
        except _HTTPError as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message
            headers["Connection"] = "close"  # the request body may be unread: do not reuse the connection
            self.close_connection = True
            self._send_json({"error": e.message, **e.body}, e.status, headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            return
        with self.hub.lock:
            self.hub.requests.append(RequestRecord(
                self.server.origin, self.command, split.path, self._status, "Authorization" in self.headers,
                self._sent,
            ))

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # -- API origin ----------------------------------------------------------------------------------------

    def _require_auth(self) -> None:
        if not self.hub.authorized(self.headers):
            raise _HTTPError(401, "Invalid credentials in Authorization header")

    def _maybe_fail(self, name: str) -> None:
        if name in self.hub.fail:
            raise _HTTPError(500, f"injected failure of the {name} endpoint")

    def _get_repo(self, repo_type: str, repo_id: str, *, write: bool = False) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self.hub.authorized(self.headers)):
            raise _HTTPError(404, "Repository not found", "RepoNotFound")
        if write:
            self._require_auth()
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise _HTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _route_api(self, seg: list[str]) -> bool:
        cmd = self.command
        if seg[:2] == ["api", "agent-harnesses"] and cmd == "GET":
            self._send_json({"standardEnvVars": [], "harnesses": {}})
        elif seg[:2] == ["api", "whoami-v2"] and cmd == "GET":
            self._require_auth()
            self._send_json({"type": "user", "name": self.hub.user, "orgs": [], "auth": {"type": "access_token"}})
        elif seg[:3] == ["api", "repos", "create"] and cmd == "POST":
            self._create_repo()
        elif seg[:2] == ["api", "validate-yaml"] and cmd == "POST":
            self._validate_yaml()
        elif len(seg) >= 4 and seg[0] == "api" and seg[1] in _PLURAL:
            return self._route_repo_api(_PLURAL[seg[1]], f"{seg[2]}/{seg[3]}", seg[4:])
        elif ".git" in "/".join(seg):
            return self._route_lfs(seg)
        elif "resolve" in seg and cmd in ("GET", "HEAD"):
            self._resolve(seg)
        else:
            return False
        return True

    def _route_repo_api(self, repo_type: str, repo_id: str, rest: list[str]) -> bool:
        cmd = self.command
        if not rest and cmd == "GET":
            self._repo_info(repo_type, repo_id, "main")
        elif rest[:1] == ["revision"] and len(rest) >= 2 and cmd == "GET":
            self._repo_info(repo_type, repo_id, "/".join(rest[1:]))
        elif rest[:1] == ["preupload"] and cmd == "POST":
            self._preupload(repo_type, repo_id, "/".join(rest[1:]) or "main")
        elif rest[:1] == ["commit"] and cmd == "POST":
            self._commit(repo_type, repo_id, "/".join(rest[1:]) or "main")
        elif rest[:1] == ["branch"] and cmd == "POST":
            self._create_branch(repo_type, repo_id, "/".join(rest[1:]))
        elif rest[:1] == ["tree"] and cmd == "GET":
            self._tree(repo_type, repo_id, rest[1] if len(rest) > 1 else "main", "/".join(rest[2:]))
        elif rest[:1] == ["paths-info"] and cmd == "POST":
            self._paths_info(repo_type, repo_id, "/".join(rest[1:]) or "main")
        else:
            return False
        return True

    def _create_repo(self) -> None:
        self._require_auth()
        self._maybe_fail("create")
        body = self._json_body()
        name, org = body.get("name"), body.get("organization") or self.hub.user
        repo_type = body.get("type") or "model"
        if not name or repo_type not in _REPO_PREFIX:
            raise _HTTPError(400, "invalid repo name or type")
        repo_id = f"{org}/{name}"
        url = f"{self.hub.url}/{_REPO_PREFIX[repo_type]}{repo_id}"
        with self.hub.lock:
            if (repo_type, repo_id) in self.hub.repos:
                raise _HTTPError(409, f"You already created this {repo_type} repo", body={"url": url})
            repo = Repo(repo_type, repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
            gitattributes = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
            sha = self.hub.new_commit_sha(repo, "initial commit")
            repo.commits[sha] = {".gitattributes": FileEntry(len(gitattributes), data=gitattributes)}
            repo.branches["main"] = sha
            self.hub.repos[(repo_type, repo_id)] = repo
        self._send_json({"url": url, "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]})

    def _validate_yaml(self) -> None:
        body = self._json_body()
        errors = _validate_card(str(body.get("content", "")), body.get("repoType") or "model")
        if errors:
            self._send_json({"errors": [{"message": m} for m in errors], "warnings": []}, 400)
        else:
            self._send_json({"errors": [], "warnings": []})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._get_repo(repo_type, repo_id)
        sha = self._commit_of(repo, revision)
        tree = repo.commits[sha]
        card = {}
        if "README.md" in tree:
            card = _front_matter(tree["README.md"].data or b"") or {}
        info: dict[str, Any] = {
            "id": repo_id, "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "author": repo_id.split("/")[0],
            "sha": sha, "private": repo.private, "disabled": False, "gated": False,
            "tags": list(card.get("tags") or []), "cardData": card,
            "siblings": [{"rfilename": p} for p in sorted(tree)],
        }
        if repo_type == "model":
            info.update(library_name=card.get("library_name"), pipeline_tag=card.get("pipeline_tag"))
        self._send_json(info)

    def _tree(self, repo_type: str, repo_id: str, revision: str, prefix: str) -> None:
        """``GET /api/{type}s/{repo}/tree/{rev}/{path}?recursive=``: the files and folders under ``path``
        (direct children unless recursive), like the Hub (404 for a path that is not a folder)."""
        repo = self._get_repo(repo_type, repo_id)
        tree = repo.commits[self._commit_of(repo, revision)]
        recursive = self._query.get("recursive", ["false"])[0].lower() in ("1", "true")
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if base and not any(p.startswith(base) for p in tree):
            raise _HTTPError(404, f"Entry not found: {prefix}", "EntryNotFound")
        items: dict[str, dict[str, Any]] = {}
        for path in sorted(tree):
            if not path.startswith(base):
                continue
            parts = path[len(base):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if recursive or depth == 1:
                    folder = base + "/".join(parts[:depth])
                    items.setdefault(folder, _folder_item(folder))
            if recursive or len(parts) == 1:
                items[path] = _file_item(path, tree[path])
        self._send_json(list(items.values()))

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        """``POST /api/{type}s/{repo}/paths-info/{rev}`` (form ``paths=...``): the entries that exist."""
        repo = self._get_repo(repo_type, repo_id)
        tree = repo.commits[self._commit_of(repo, revision)]
        body = self._read_body().decode()
        form = parse_qs(body) if "json" not in self.headers.get("Content-Type", "") else json.loads(body or "{}")
        paths = form.get("paths") or []
        items = []
        for path in [paths] if isinstance(paths, str) else paths:
            path = path.strip("/")
            if path in tree:
                items.append(_file_item(path, tree[path]))
            elif any(p.startswith(path + "/") for p in tree):
                items.append(_folder_item(path))
        self._send_json(items)

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        repo = self._get_repo(repo_type, repo_id, write=True)
        body = self._json_body()
        with self.hub.lock:
            if branch in repo.branches:
                raise _HTTPError(409, f"Reference refs/heads/{branch} already exists")
            repo.branches[branch] = self._commit_of(repo, body.get("startingPoint") or "main")
        self._send_json({})

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._get_repo(repo_type, repo_id, write=True)
        self._maybe_fail("preupload")
        tree = repo.commits[self._commit_of(repo, revision)]
        files = []
        for f in self._json_body().get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = self.hub.is_lfs(f["path"], int(f["size"]), sample)
            entry = tree.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": entry.etag if entry else None})
        self._send_json({"files": files, "commitOid": repo.branches.get(revision)})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._get_repo(repo_type, repo_id, write=True)
        self._maybe_fail("commit")
        if self.headers.get("Content-Encoding"):
            raise _HTTPError(400, "compressed commit payloads are not supported by the test server")
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HTTPError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        with self.hub.lock:
            parent = self._commit_of(repo, revision)
            if header.get("parentCommit") and header["parentCommit"] != parent:
                raise _HTTPError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[parent])
            for op in lines[1:]:
                key, value = op.get("key"), op.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    data = base64.b64decode(value["content"])
                    tree[path] = FileEntry(len(data), data=data)
                elif key == "lfsFile":
                    oid = value["oid"]
                    if oid not in self.hub.lfs:
                        raise _HTTPError(422, f"LFS object {oid} of {path} was never uploaded")
                    tree[path] = FileEntry(len(self.hub.lfs[oid]), lfs_oid=oid)
                elif key == "deletedFile":
                    if tree.pop(path, None) is None:
                        raise _HTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    for p in [p for p in tree if p.startswith(path.rstrip("/") + "/")]:
                        del tree[p]
                else:
                    raise _HTTPError(400, f"unknown commit operation {key!r}")
            if "README.md" in tree and (errors := _validate_card((tree["README.md"].data or b"").decode(), repo_type)):
                raise _HTTPError(400, "Invalid metadata in README.md: " + "; ".join(errors))
            sha = self.hub.new_commit_sha(repo, header.get("summary", ""))
            repo.commits[sha] = tree
            repo.branches[revision] = sha
        url = f"{self.hub.url}/{_REPO_PREFIX[repo_type]}{repo_id}/commit/{sha}"
        self._send_json({"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    def _route_lfs(self, seg: list[str]) -> bool:
        path = "/".join(seg)
        m = re.fullmatch(r"(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify)", path)
        if not m or self.command != "POST":
            return False
        repo_type = _PLURAL.get(m.group(1) or "models", "model")
        repo = self._get_repo(repo_type, m.group(2), write=True)
        self._maybe_fail("lfs")
        body = self._json_body()
        if m.group(3) == "verify":
            if self.hub.lfs.get(body.get("oid"), b"") == b"" or len(self.hub.lfs[body["oid"]]) != body.get("size"):
                raise _HTTPError(422, "LFS object missing or of the wrong size")
            self._send_json({})
            return True
        if body.get("operation") != "upload":
            raise _HTTPError(400, "the test server only supports LFS uploads through the batch API")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs:
                href = f"{self.hub.storage_url}/lfs/{oid}"
                header: dict[str, str] = {}
                if size > self.hub.multipart_threshold:
                    n = -(-size // self.hub.chunk_size)
                    header = {"chunk_size": str(self.hub.chunk_size)}
                    header.update({str(i): f"{href}/part/{i}" for i in range(1, n + 1)})
                verify = f"{self.hub.url}/{_REPO_PREFIX[repo.repo_type]}{repo.repo_id}.git/info/lfs/objects/verify"
                entry["actions"] = {"upload": {"href": href, "header": header}, "verify": {"href": verify}}
            objects.append(entry)
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})
        return True

    def _resolve(self, seg: list[str]) -> None:
        i = seg.index("resolve")
        prefix, rest = seg[:i], seg[i + 1:]
        repo_type = "model"
        if prefix and prefix[0] in _PLURAL and len(prefix) == 3:
            repo_type, prefix = _PLURAL[prefix[0]], prefix[1:]
        if len(prefix) != 2 or len(rest) < 2:
            raise _HTTPError(404, "Repository not found", "RepoNotFound")
        repo = self._get_repo(repo_type, "/".join(prefix))
        sha = self._commit_of(repo, rest[0])
        path = "/".join(rest[1:])
        entry = repo.commits[sha].get(path)
        headers = {"X-Repo-Commit": sha}
        if entry is None:
            raise _HTTPError(404, "Entry not found", "EntryNotFound", headers)
        if entry.lfs_oid is None:
            headers["ETag"] = f'"{entry.etag}"'
            self._send_file(entry.data or b"", headers)
            return
        # LFS: redirect to the storage origin, with the linked object's etag and size (like the Hub's CDN)
        headers.update({
            "ETag": f'"{git_blob_sha1(entry.lfs_oid.encode())}"',
            "X-Linked-Etag": f'"{entry.lfs_oid}"',
            "X-Linked-Size": str(entry.size),
            "Location": f"{self.hub.storage_url}/lfs/{entry.lfs_oid}",
        })
        self._send(302, b"", headers)

    # -- storage origin --------------------------------------------------------------------------------------

    def _route_storage(self, seg: list[str]) -> bool:
        if len(seg) < 2 or seg[0] != "lfs" or not re.fullmatch(r"[0-9a-f]{64}", seg[1]):
            return False
        oid, cmd = seg[1], self.command
        if len(seg) == 2 and cmd in ("GET", "HEAD"):
            data = self.hub.lfs.get(oid)
            if data is None:
                raise _HTTPError(404, "no such object")
            self._send_file(data, {"ETag": f'"{oid}"'})
        elif len(seg) == 2 and cmd == "PUT":
            self._store(oid, self._read_body())
            self._send(200)
        elif len(seg) == 4 and seg[2] == "part" and cmd == "PUT":
            data = self._read_body()
            with self.hub.lock:
                self.hub.parts[(oid, int(seg[3]))] = data
            self._send(200, headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})
        elif len(seg) == 2 and cmd == "POST":  # multipart completion
            body = self._json_body()
            with self.hub.lock:
                numbers = [int(p["partNumber"]) for p in body.get("parts", [])]
                try:
                    data = b"".join(self.hub.parts.pop((oid, n)) for n in sorted(numbers))
                except KeyError as e:
                    raise _HTTPError(400, f"missing part {e}") from e
            self._store(oid, data)
            self._send_json({})
        else:
            return False
        return True

    def _store(self, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            raise _HTTPError(400, "uploaded content does not match its sha256 oid")
        with self.hub.lock:
            self.hub.lfs[oid] = data


def _file_item(path: str, entry: FileEntry) -> dict[str, Any]:
    oid = git_blob_sha1(entry.data or b"") if entry.lfs_oid is None else hashlib.sha1(entry.lfs_oid.encode()).hexdigest()
    item: dict[str, Any] = {"type": "file", "path": path, "size": entry.size, "oid": oid}
    if entry.lfs_oid:
        item["lfs"] = {"oid": entry.lfs_oid, "size": entry.size, "pointerSize": 134}
    return item


def _folder_item(path: str) -> dict[str, Any]:
    return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range: bytes=a-b`` / ``a-`` / ``-n`` -> ``(start, stop)``; None without a (single) range."""
    m = _RANGE.match((header or "").strip())
    if not m or m.group(1) == m.group(2) == "":
        return None
    if m.group(1) == "":
        return max(0, size - int(m.group(2))), size
    start = int(m.group(1))
    stop = size if m.group(2) == "" else min(size, int(m.group(2)) + 1)
    if start >= size or stop <= start:
        raise _HTTPError(416, "requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, stop


def _front_matter(content: bytes | str) -> dict | None:
    text = content.decode() if isinstance(content, bytes) else content
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not m:
        return None
    data = yaml.safe_load(m.group(1))
    return data if isinstance(data, dict) else None


def _validate_card(content: str, repo_type: str) -> list[str]:
    """A subset of the Hub's metadata checks: YAML mapping, list fields, and a well-formed model-index."""
    try:
        meta = _front_matter(content)
    except yaml.YAMLError as e:
        return [f"invalid YAML: {e}"]
    if meta is None:
        return [] if not content.startswith("---") else ["metadata is not a YAML mapping"]
    errors = []
    for key in ("tags", "datasets", "metrics"):
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(v, str) for v in meta[key])):
            errors.append(f"'{key}' must be a list of strings")
    for key in ("license", "library_name", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f"'{key}' must be a string")
    if repo_type == "model" and "model-index" in meta:
        index = meta["model-index"]
        if not isinstance(index, list) or not index:
            return errors + ["'model-index' must be a non-empty list"]
        for entry in index:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                errors.append("each model-index entry needs a 'name'")
                continue
            for result in entry.get("results") or []:
                if not isinstance((result.get("task") or {}).get("type"), str):
                    errors.append("model-index result needs task.type")
                dataset = result.get("dataset") or {}
                if not (isinstance(dataset.get("type"), str) and isinstance(dataset.get("name"), str)):
                    errors.append("model-index result needs dataset.type and dataset.name")
                for metric in result.get("metrics") or []:
                    if not isinstance(metric.get("type"), str) or not isinstance(metric.get("value"), (int, float)):
                        errors.append("model-index metric needs a string type and a numeric value")
    return errors
