"""A small Hugging Face Hub-compatible HTTP server for tests: serves in-memory model repos on 127.0.0.1.

It answers what huggingface_hub 2.x and ft-desk ask, the way the Hub does:
  GET  /api/models?search=&filter=&pipeline_tag=&sort=&limit=&expand=   listing, Link: <...>; rel="next" pages
  GET  /api/models/{repo}[/revision/{rev}][?blobs=true]                 model info (siblings, safetensors, gated)
  GET  /api/models/{repo}/tree/{rev}[/{path}][?recursive=true]          file listing at a commit
  HEAD/GET /{repo}/resolve/{rev}/{path}                                 file bytes: X-Repo-Commit, quoted ETag (git
        blob sha1, or sha256 + X-Linked-Etag/X-Linked-Size for LFS files), Content-Length, Range -> 206
  GET  /api/agent-harnesses                                            the client's once-a-day registry fetch
Misses are 404s with X-Error-Code EntryNotFound (+ X-Repo-Commit), RevisionNotFound or RepoNotFound; a gated repo
answers 401 (no token) or 403 (a token without access) with X-Error-Code GatedRepo on file downloads.

Every request is recorded (method, path, headers) so tests can assert what was - or was not - asked. `cut_once`
makes the first GET of a file send half its bytes and drop the connection, to exercise resume with Range;
`slow` trickles a file out, so a test can cancel a download half-way; `ignore_range` answers a Range request for a
file with the whole file (200), like some proxies and CDNs.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx", ".gguf", ".model")
# Tokens the gated test repo knows: one with access, one without.
TOKEN_GRANTED = "hf_GrantedAccessTokenForTests0123456789"
TOKEN_DENIED = "hf_DeniedAccessTokenForTests00000000000"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    files: dict[str, bytes]
    gated: str | bool = False  # False, "auto" or "manual"
    granted_tokens: set[str] = field(default_factory=set)
    downloads: int = 0
    likes: int = 0
    last_modified: str = "2024-01-01T00:00:00.000Z"
    license: str = "apache-2.0"
    pipeline_tag: str = "text-generation"
    library_name: str = "transformers"
    extra_tree_paths: list[str] = field(default_factory=list)  # listed but not served (hostile names)

    @property
    def sha(self) -> str:
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + git_blob_sha1(self.files[path]).encode())
        return digest.hexdigest()

    def tags(self) -> list[str]:
        tags = [self.library_name, self.pipeline_tag, f"license:{self.license}"]
        if any(p.endswith(".safetensors") for p in self.files):
            tags.append("safetensors")
        return tags

    def safetensors_info(self) -> dict | None:
        params: dict[str, int] = {}
        for path, data in self.files.items():
            if not path.endswith(".safetensors") or path.startswith("consolidated"):
                continue
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + header_len])
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                params[entry["dtype"]] = params.get(entry["dtype"], 0) + count
        return {"parameters": params, "total": sum(params.values())} if params else None

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES) or len(self.files[path]) > 10_000_000


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


class FakeHub:
    """The server. `url` is the endpoint to point huggingface_hub at; `requests` records every request."""

    def __init__(self, page_size: int = 3) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.page_size = page_size
        self.cut_once: set[tuple[str, str]] = set()
        self.slow: dict[tuple[str, str], float] = {}  # (repo, path) -> seconds to wait between 16 KB pieces
        self.trickled: dict[tuple[str, str], int] = {}  # (repo, path) -> bytes of a slow file sent so far
        self.ignore_range: set[tuple[str, str]] = set()
        self.connections: set = set()  # open client sockets (keep-alive), closed by stop()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- control -------------------------------------------------------------------------------------------
    def add(self, repo: Repo) -> Repo:
        self.repos[repo.repo_id] = repo
        return repo

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every kept-alive connection, like a server that went away."""
        import socket

        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            connections, self.connections = list(self.connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def file_requests(self, path_suffix: str, method: str = "GET") -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == method and "/resolve/" in r.path
                    and r.path.endswith("/" + path_suffix)]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # http.server otherwise stalls ~40 ms per response (Nagle + delayed ACK)

    def log_message(self, format, *args) -> None:  # quiet test output
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake.connections.add(self.connection)

    def finish(self) -> None:
        with self.fake._lock:
            self.fake.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    # -- plumbing --------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._json({"error": message}, status, headers)

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        self.fake.record(Request(self.command, path, query, {k.lower(): v for k, v in self.headers.items()}))
        if path == "/api/agent-harnesses":
            return self._json({"standardEnvVars": [], "harnesses": {}})
        if path == "/api/models":
            return self._list(query)
        if path.startswith("/api/models/"):
            return self._api_model(path[len("/api/models/"):], query)
        if "/resolve/" in path:
            return self._resolve(parts.path)
        self._error(404, "RepoNotFound", "not found")

    def _find(self, rest: str) -> tuple[Repo | None, str]:
        segments = rest.split("/")
        repo = self.fake.repos.get("/".join(segments[:2]))
        return repo, "/".join(segments[2:])

    def _revision_ok(self, repo: Repo, rev: str) -> bool:
        return rev in ("main", repo.sha)

    # -- listing ---------------------------------------------------------------------------------------------
    def _list(self, query: dict[str, list[str]]) -> None:
        search = (query.get("search") or [""])[0].lower()
        filters = query.get("filter") or []
        pipeline = (query.get("pipeline_tag") or [None])[0]
        sort = (query.get("sort") or ["downloads"])[0]
        limit = int((query.get("limit") or ["1000"])[0])
        offset = int((query.get("cursor") or ["0"])[0])
        expand = query.get("expand") or []
        repos = [r for r in self.fake.repos.values()
                 if search in r.repo_id.lower() and all(f in r.tags() for f in filters)
                 and (pipeline is None or r.pipeline_tag == pipeline)]
        key = {"downloads": lambda r: r.downloads, "likes": lambda r: r.likes,
               "lastModified": lambda r: r.last_modified}.get(sort, lambda r: r.downloads)
        repos.sort(key=key, reverse=True)
        page_len = min(limit, self.fake.page_size)
        page = repos[offset:offset + page_len]
        headers = {}
        if offset + page_len < len(repos):
            next_query = {k: v for k, v in query.items() if k != "cursor"}
            next_query["cursor"] = [str(offset + page_len)]
            headers["Link"] = f'<{self.fake.url}/api/models?{urlencode(next_query, doseq=True)}>; rel="next"'
        self._json([self._info(r, expand=expand) for r in page], headers=headers)

    def _info(self, repo: Repo, expand: list[str] | None = None, blobs: bool = False) -> dict:
        full = {
            "_id": repo.sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
            "sha": repo.sha, "lastModified": repo.last_modified, "createdAt": "2023-06-01T00:00:00.000Z",
            "private": False, "disabled": False, "gated": repo.gated, "downloads": repo.downloads,
            "likes": repo.likes, "tags": repo.tags(), "pipeline_tag": repo.pipeline_tag,
            "library_name": repo.library_name, "cardData": {"license": repo.license},
            "safetensors": repo.safetensors_info(),
        }
        if full["safetensors"] is None:
            del full["safetensors"]
        siblings = []
        for path in sorted(repo.files) + repo.extra_tree_paths:
            entry: dict = {"rfilename": path}
            if blobs:
                data = repo.files.get(path, b"")
                entry.update(size=len(data), blobId=git_blob_sha1(data))
                if path in repo.files and repo.is_lfs(path):
                    entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(entry)
        full["siblings"] = siblings
        if expand:
            return {"_id": full["_id"], "id": repo.repo_id,
                    **{k: full[k] for k in expand if k in full}}
        return full

    # -- /api/models/{repo}... -------------------------------------------------------------------------------
    def _api_model(self, rest: str, query: dict[str, list[str]]) -> None:
        repo, tail = self._find(rest)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        blobs = (query.get("blobs") or ["false"])[0].lower() == "true"
        if tail == "":
            return self._json(self._info(repo, blobs=blobs))
        kind, _, rest_rev = tail.partition("/")
        if kind == "revision":
            if not self._revision_ok(repo, rest_rev):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rest_rev}")
            return self._json(self._info(repo, blobs=blobs))
        if kind == "tree":
            rev, _, sub = rest_rev.partition("/")
            if not self._revision_ok(repo, rev):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return self._tree(repo, sub.strip("/"), (query.get("recursive") or ["false"])[0].lower() == "true")
        self._error(404, "RepoNotFound", "not found")

    def _tree(self, repo: Repo, sub: str, recursive: bool) -> None:
        prefix = sub + "/" if sub else ""
        paths = [p for p in sorted(repo.files) + repo.extra_tree_paths if p.startswith(prefix)]
        if sub and not paths:
            return self._error(404, "EntryNotFound", f"{sub} does not exist on main", repo.sha)
        entries, folders = [], set()
        for path in paths:
            rel = path[len(prefix):]
            if "/" in rel and not recursive:
                folders.add(prefix + rel.split("/")[0])
                continue
            if recursive:
                bits = rel.split("/")[:-1]
                for i in range(1, len(bits) + 1):
                    if ".." not in bits[:i]:
                        folders.add(prefix + "/".join(bits[:i]))
            data = repo.files.get(path, b"x")
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
            if path in repo.files and repo.is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                    for f in sorted(folders)]
        self._json(entries)

    # -- /{repo}/resolve/{rev}/{path} --------------------------------------------------------------------------
    def _resolve(self, raw_path: str) -> None:
        before, _, after = raw_path.lstrip("/").partition("/resolve/")
        repo = self.fake.repos.get(unquote(before))
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        rev, _, file_path = after.partition("/")
        rev, file_path = unquote(rev), unquote(file_path)
        if not self._revision_ok(repo, rev):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if repo.gated:
            auth = self.headers.get("Authorization", "")
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
            if token is None:
                return self._error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. "
                                   "You must have access to it and be authenticated to access it. Please log in.")
            if token not in repo.granted_tokens:
                return self._error(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are "
                                   "not in the authorized list.")
        data = repo.files.get(file_path)
        if data is None:
            return self._error(404, "EntryNotFound", f"{file_path} does not exist on {rev}", repo.sha)
        headers = {"X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes"}
        if repo.is_lfs(file_path):
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{git_blob_sha1(data)}"'
        status, body = 200, data
        key = (repo.repo_id, file_path)
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes=") and key not in self.fake.ignore_range:
            start_text, _, end_text = range_header[len("bytes="):].partition("-")
            start = int(start_text)
            end = int(end_text) if end_text else len(data) - 1
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        if self.command == "GET" and status == 200 and key in self.fake.cut_once:
            self.fake.cut_once.discard(key)
            return self._cut(body, headers)
        if self.command == "GET" and key in self.fake.slow:
            return self._trickle(key, status, body, headers, self.fake.slow[key])
        self._send(status, body, headers, content_type="application/octet-stream")

    def _trickle(self, key: tuple[str, str], status: int, body: bytes, headers: dict[str, str],
                 pause: float) -> None:
        """Send a file slowly (a slow link), so a test can interrupt the transfer half-way."""
        import time

        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for start in range(0, len(body), 16 * 1024):
                self.wfile.write(body[start:start + 16 * 1024])
                self.wfile.flush()
                self.fake.trickled[key] = start + len(body[start:start + 16 * 1024])
                time.sleep(pause)
        except OSError:  # the client went away
            self.close_connection = True

    def _cut(self, body: bytes, headers: dict[str, str]) -> None:
        """Promise the whole file, send half, and drop the connection (a network cut mid-transfer)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True
        try:
            import socket

            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
