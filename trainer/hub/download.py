"""Downloading a base model from the Hub into the standard Hugging Face cache: only what training needs, safely,
resumable across processes.

Order of a download (nothing is written before step 4):
  1. resolve the revision to a commit (`/api/models/{id}/revision/{rev}`), list that commit's files (tree API);
  2. reject the whole repo if any listed name could escape the download folder (`../x`, `/x`, `C:x`, `a\\b`);
  3. read config.json / tokenizer_config.json / the weight index in memory and decide: remote code is refused unless
     `trust_remote_code` (then the commit is the pin), pickle-only weights are refused unless `allow_pickle`;
  4. fetch each chosen file at that commit (below), reporting `download_progress` events (bytes, rate, ETA);
  5. check the snapshot is whole (sizes from the listing, safetensors headers) and point refs/<branch> at the commit.

Fetching one file: ft-desk does the HTTP itself, through huggingface_hub's session, headers (token) and HEAD
(`get_hf_file_metadata`: ETag, size, commit, CDN location), because huggingface_hub 2.x writes each transfer to a
process-unique temporary file and deletes it when the process is interrupted. Here the bytes go to
blobs/<etag>.ftdesk-partial in the repo's cache folder; when it exists, the GET asks `Range: bytes=N-` and appends, so a
cancelled (SIGTERM/Ctrl-C) or killed download continues from its last byte in the next process. A server that answers
the Range with the whole file (200) starts the file over. A cut connection is retried the same way in-process. The
finished file must hash to its ETag - sha256 for LFS files, the git blob sha1 (sha1 of "blob <size>\\0" + content) for
small git files - or it is deleted and the download fails with the fix; then it is renamed to blobs/<etag> and linked
from snapshots/<commit>/<path> exactly as huggingface_hub lays out its cache (relative symlink; the file itself where
symlinks are impossible), so huggingface_hub, transformers (offline too) and hub/cache.py read it as theirs. The
partial never carries a blob's name, so nothing mistakes it for a complete file.

While a file is fetched ft-desk holds huggingface_hub's own lock for that blob (.locks/<repo>/<etag>.lock): a second
ft-desk refuses with "another download ... is running" instead of interleaving writes, and `hf download` waits. Before
fetching, huggingface_hub's own `*.incomplete` leftovers of killed processes in the repo's blobs/ are deleted when
untouched for STALE_INCOMPLETE_S and unlocked; the result says how many bytes that freed.

Which files: config, generation config, tokenizer and chat-template files, and the weights transformers would load -
the safetensors shards named by model.safetensors.index.json (or model.safetensors); *.bin only when a repo has no
safetensors at all and the user allowed pickle. Never ONNX, GGUF, TF/Flax, `original/` or duplicate consolidated files.
Files already in the cache at that commit are not fetched again. Files come over plain HTTPS (the Hub serves
Xet-stored files through its bridge too), not through hf_xet, whose partial file huggingface_hub also discards.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ft_desk.trainer.errors import ModelError, UserError
from ft_desk.trainer.events import EventSink, make_event
from ft_desk.trainer.hub.cache import PARTIAL_SUFFIX, find_snapshot, folder_status, repo_dir
from ft_desk.trainer.hub.folder_check import (
    check_model_folder,
    code_files_for,
    foreign_code_refs,
    pick_weight_files,
    remote_code_reason,
)
from ft_desk.trainer.hub.names import COMMIT_RE, check_repo_id, model_page_url
from ft_desk.trainer.hub.remote import api, fetch_repo_json, hub_error, offline, offline_error

# Files a fine-tuning run reads besides the weights (exact names at the repo root).
TRAINING_FILES = frozenset({
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
    "chat_template.jinja", "chat_template.json",
})
TEMPLATE_DIR = "additional_chat_templates/"
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_ETAG_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")  # it becomes a file name in blobs/

# Note: huggingface_hub's *.incomplete files untouched this long (and unlocked) are orphans of a killed process. A
# live huggingface_hub download writes every few seconds and gives up after about a minute without data, so this
# is safe even where file locks silently do nothing (some network filesystems).
STALE_INCOMPLETE_S = 600.0
# Note: a cut or stalled transfer is retried from its byte offset, after RETRY_WAIT_S, up to this many times in a
# row without receiving a byte (huggingface_hub uses 5 and 1 s too).
MAX_STALLED_RETRIES = 5
RETRY_WAIT_S = 1.0


def unsafe_name(name: str) -> bool:
    """True for a repo file name that could land outside the folder it is downloaded into."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/") or _DRIVE_RE.match(name):
        return True
    return any(part in ("", ".", "..") for part in name.split("/"))


def is_training_file(name: str) -> bool:
    return name in TRAINING_FILES or (name.startswith(TEMPLATE_DIR) and name.endswith(".jinja"))


@dataclass
class PlannedFile:
    path: str
    size: int
    sha256: str | None = None  # LFS files: the content hash the Hub published
    blob_id: str | None = None  # the git blob id from the listing (for a small file, its ETag)

    @property
    def etag(self) -> str | None:
        """The ETag the Hub will give this file (and the name of its blob in the cache)."""
        return self.sha256 or self.blob_id


@dataclass
class DownloadPlan:
    repo_id: str
    revision: str | None
    commit: str
    files: list[PlannedFile]
    weights_format: str
    remote_code: str | None = None
    gated: bool = False
    skipped: list[str] = field(default_factory=list)  # listed files that training does not need

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict:
        return {
            "repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
            "files": [{"path": f.path, "size": f.size} for f in self.files], "total_bytes": self.total_bytes,
            "weights_format": self.weights_format, "remote_code": self.remote_code, "gated": self.gated,
            "skipped_files": len(self.skipped),
        }


def plan_download(repo_id: str, revision: str | None = None, *, allow_pickle: bool = False,
                  trust_remote_code: bool = False) -> DownloadPlan:
    """Decide what to fetch (and whether to fetch at all) from the Hub's listing and the small JSON files."""
    if offline():
        raise offline_error(f"download {repo_id}")
    hub = api()
    try:
        info = hub.model_info(repo_id, revision=revision)
        commit = info.sha or ""
        if not COMMIT_RE.match(commit):
            raise ModelError(f"the Hub did not name a commit for {repo_id} at {revision or 'main'}")
        entries = list(hub.list_repo_tree(repo_id, revision=commit, recursive=True))
    except Exception as exc:
        raise hub_error(exc, repo_id, revision) from None

    bad = [e.path for e in entries if unsafe_name(e.path)]
    if bad:
        raise ModelError(
            f"the file list of {repo_id} contains a name that would escape the download folder ({bad[0]!r}); "
            "nothing was downloaded",
            hint="do not use this repo; report it to its owner or the Hub",
        )
    from huggingface_hub.hf_api import RepoFile

    listed = {e.path: e for e in entries if isinstance(e, RepoFile)}
    names = set(listed)
    if "config.json" not in names:
        raise ModelError(f"{repo_id} has no config.json, so it is not a transformers model",
                         hint=f"see {model_page_url(repo_id)}")

    def read(name: str) -> dict:
        try:
            return fetch_repo_json(repo_id, name, commit)
        except UserError:
            raise
        except Exception as exc:
            raise hub_error(exc, repo_id, revision) from None

    config = read("config.json")
    tokenizer_config = read("tokenizer_config.json") if "tokenizer_config.json" in names else None
    foreign = foreign_code_refs(config, tokenizer_config)
    if foreign:
        raise ModelError(f"{repo_id} loads code from another repo ({foreign[0]}), which cannot be pinned",
                         hint="pick a model that transformers supports natively")
    reason = remote_code_reason(config, tokenizer_config)
    code_files: list[str] = []
    if reason:
        if not trust_remote_code:
            raise ModelError(
                f"{repo_id} needs to run Python code shipped with the model: {reason}",
                hint=f"review the code at {model_page_url(repo_id)}/tree/{commit}; to accept it, download with "
                     f"--trust-remote-code, which pins commit {commit}",
            )
        needed = code_files_for(config, tokenizer_config)
        missing = [f for f in needed if f not in names]
        if missing:
            raise ModelError(f"{repo_id} needs {missing[0]}, which is not in the repo at {commit[:12]}")
        # Modules import their siblings, so every root .py of the reviewed commit comes along.
        code_files = sorted(set(needed) | {n for n in names if "/" not in n and n.endswith(".py")})

    weights = pick_weight_files(names, read)
    if weights.format == "none":
        raise ModelError(f"{repo_id} has no weights transformers can load (no *.safetensors or pytorch_model*.bin)")
    if weights.format == "pickle" and not allow_pickle:
        raise ModelError(
            f"{repo_id} has only pickle weights ({weights.files[0]}), which can run code when they are loaded",
            hint="pick a model with safetensors weights, or pass --allow-pickle if you trust its author",
        )
    missing = [w for w in weights.files if w not in names]
    if missing:
        raise ModelError(f"{repo_id}: its weight index lists {missing[0]}, which is not in the repo")

    wanted = {n for n in names if is_training_file(n)} | set(weights.files) | set(code_files)
    if weights.index:
        wanted.add(weights.index)
    files = []
    for name in sorted(wanted, key=lambda n: (n != "config.json", listed[n].size or 0, n)):
        entry = listed[name]
        sha = getattr(entry.lfs, "sha256", None) if entry.lfs else None
        files.append(PlannedFile(name, int(entry.size or 0), sha, getattr(entry, "blob_id", None)))
    gated = bool(getattr(info, "gated", False))
    return DownloadPlan(repo_id, revision, commit, files, weights.format, reason, gated,
                        sorted(names - wanted))


class DownloadProgress:
    """Bytes, rate and ETA over a whole download; emits `download_progress` at most every `interval` seconds.

    Bytes found on disk (files already cached, the resumed part of a partial file) count as done but not as
    transferred, so the rate and the ETA reflect this session's speed.
    """

    def __init__(self, sink: EventSink | None, repo_id: str, total_bytes: int, files_total: int,
                 clock: Callable[[], float] = time.monotonic, interval: float = 0.25) -> None:
        self.sink, self.repo_id, self.clock, self.interval = sink, repo_id, clock, interval
        self.total_bytes, self.files_total = total_bytes, files_total
        self.bytes_done = 0
        self.transferred = 0  # bytes received in this process (cached files do not count towards the rate)
        self.resumed = 0  # bytes of partial files left by an earlier, interrupted download, continued here
        self.files_done = 0
        self.file: str | None = None
        self.started = clock()
        self._last_emit = float("-inf")
        self._window: collections.deque[tuple[float, int]] = collections.deque()

    def rate(self) -> float | None:
        now = self.clock()
        self._window.append((now, self.transferred))
        while len(self._window) > 2 and now - self._window[0][0] > 5.0:
            self._window.popleft()
        t0, b0 = self._window[0]
        if now - t0 >= 0.2:
            return (self.transferred - b0) / (now - t0)
        elapsed = now - self.started
        return self.transferred / elapsed if elapsed >= 0.2 and self.transferred else None

    def add(self, n: int, transferred: bool = True) -> None:
        self.bytes_done += n
        if transferred:
            self.transferred += n
        self.emit()

    def resume(self, n: int) -> None:
        """`n` bytes of a partial file from an earlier download are kept."""
        self.resumed += n
        self.add(n, transferred=False)

    def discard(self, n: int, resumed: int) -> None:
        """`n` bytes of the file in flight were thrown away (the server restarted it); `resumed` of them were kept."""
        self.resumed -= resumed
        self.add(-n, transferred=False)

    def file_started(self, path: str) -> None:
        self.file = path
        self.emit(force=True)

    def file_finished(self) -> None:
        self.files_done += 1
        self.emit(force=True)

    def emit(self, force: bool = False) -> None:
        now = self.clock()
        if self.sink is None or (not force and now - self._last_emit < self.interval):
            return
        self._last_emit = now
        rate = self.rate()
        left = max(self.total_bytes - self.bytes_done, 0)
        eta = left / rate if rate else (0.0 if not left else None)
        self.sink.emit(make_event(
            "download_progress", repo_id=self.repo_id, file=self.file, files_done=self.files_done,
            files_total=self.files_total, bytes_done=self.bytes_done, bytes_total=self.total_bytes,
            bytes_resumed=self.resumed, rate_bytes_per_s=round(rate, 1) if rate is not None else None,
            eta_s=round(eta, 1) if eta is not None else None, elapsed_s=round(now - self.started, 2),
        ))


# ---------------------------------------------------------------------------------------------------------------
# checksums

def content_hasher(etag: str, size: int):
    """A hashlib object that ends equal to `etag` for the right bytes, or None when the ETag is not a checksum.

    The Hub's ETag of an LFS file is the sha256 of its content; of a small git file, the git blob id:
    sha1(b"blob <size>\\0" + content).
    """
    if _SHA256_RE.match(etag):
        return hashlib.sha256()
    if _SHA1_RE.match(etag):
        return hashlib.sha1(b"blob %d\0" % size)
    return None


def _checksum_kind(etag: str) -> str | None:
    return "sha256" if _SHA256_RE.match(etag) else "git-sha1" if _SHA1_RE.match(etag) else None


def _hash_prefix(hasher, path: Path, length: int) -> None:
    with open(path, "rb") as f:
        while length > 0:
            block = f.read(min(length, 8 << 20))
            if not block:
                break
            hasher.update(block)
            length -= len(block)


def file_matches(path: Path, etag: str, size: int) -> bool | None:
    """Whether the file's content hashes to `etag` (None: the ETag is not a checksum, nothing to compare)."""
    hasher = content_hasher(etag, size)
    if hasher is None:
        return None
    _hash_prefix(hasher, path, size + 1)
    return hasher.hexdigest() == etag


# ---------------------------------------------------------------------------------------------------------------
# the cache layout huggingface_hub uses: blobs/<etag>, snapshots/<commit>/<path> -> ../../blobs/<etag>, .locks/

def partial_path(folder: Path, etag: str) -> Path:
    return folder / "blobs" / (etag + PARTIAL_SUFFIX)


def _lock_path(folder: Path, etag: str) -> Path:
    # The same lock file huggingface_hub takes for this blob, so neither tool writes it while the other does.
    return folder.parent / ".locks" / folder.name / f"{etag}.lock"


@contextlib.contextmanager
def _exclusive(folder: Path, etag: str, what: str, repo_id: str):
    from filelock import FileLock, Timeout  # huggingface_hub's own dependency; flock/msvcrt under the hood

    path = _lock_path(folder, etag)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), mode=0o664)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ModelError(
            f"another download of {what} of {repo_id} is running, so this one stopped rather than write into the "
            "same file",
            hint=f"let the other download finish (or stop it), then run: ft-desk models download {repo_id}",
        ) from None
    try:
        yield
    finally:
        lock.release()


def _symlinks_supported() -> bool:
    from huggingface_hub import constants
    from huggingface_hub.file_download import are_symlinks_supported  # probes the cache folder once per process

    return are_symlinks_supported(constants.HF_HUB_CACHE)


def _place(blob: Path, pointer: Path, source: Path | None = None) -> None:
    """Make snapshots/<commit>/<path> point at the blob, from `source` (a verified partial) or an existing blob.

    A relative symlink, like huggingface_hub; where symlinks are not possible (Windows without developer mode,
    HF_HUB_DISABLE_SYMLINKS), the file itself sits in the snapshot and no blob is kept, as huggingface_hub does.
    """
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    if _symlinks_supported():
        if source is not None:
            os.replace(source, blob)
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    elif source is not None:
        os.replace(source, pointer)
    else:
        shutil.copyfile(blob, pointer)


def _tag_cache_dir(cache: Path) -> None:
    """CACHEDIR.TAG (bford.info/cachedir), as huggingface_hub writes it: backup tools skip the cache."""
    tag = cache / "CACHEDIR.TAG"
    if not tag.exists():
        try:
            tag.write_text("Signature: 8a477f597d28d172789f06886806bc55\n"
                           "# Hugging Face model cache (written by ft-desk). See https://bford.info/cachedir/\n",
                           encoding="utf-8")
        except OSError:
            pass


def remove_stale_incomplete(folder: Path, now: float | None = None) -> int:
    """Delete huggingface_hub's `*.incomplete` files in `folder`/blobs left by killed downloads; returns bytes freed.

    A file counts as orphaned when nobody wrote to it for STALE_INCOMPLETE_S and its download lock is free (a live
    huggingface_hub download holds it and writes continuously). ft-desk's own partial files are kept: they resume.
    """
    from filelock import FileLock, Timeout

    blobs = folder / "blobs"
    if not blobs.is_dir():
        return 0
    now = time.time() if now is None else now
    freed = 0
    for path in blobs.glob("*.incomplete"):
        try:
            stat = path.stat()
        except OSError:
            continue
        if now - stat.st_mtime < STALE_INCOMPLETE_S:
            continue
        lock_path = _lock_path(folder, path.name.split(".")[0])
        lock = FileLock(str(lock_path), mode=0o664)
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire(timeout=0)
        except (Timeout, OSError):
            continue
        try:
            path.unlink()
            freed += stat.st_size
        except OSError:
            pass
        finally:
            lock.release()
    return freed


def _write_ref(repo_id: str, revision: str | None, commit: str) -> None:
    """Point refs/<branch or tag> at the commit, so offline lookups by name (and other tools) find the snapshot."""
    if revision and COMMIT_RE.match(revision):
        return
    ref = repo_dir(repo_id) / "refs" / (revision or "main")
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.is_file() or ref.read_text(encoding="utf-8").strip() != commit:
        ref.write_text(commit, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# fetching one file, resumably

@dataclass
class _Fetch:
    """One file of a plan being fetched into a repo's cache folder."""

    repo_id: str
    revision: str | None
    commit: str
    planned: PlannedFile
    folder: Path
    progress: DownloadProgress
    kept: int = field(default=0, init=False)  # bytes of the partial file kept from an earlier process
    received: int = field(default=0, init=False)  # bytes received by the current GET
    hasher: object = field(default=None, init=False)

    def metadata(self):
        """huggingface_hub's HEAD of the file at the commit: ETag, size, commit and where the bytes are."""
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

        return get_hf_file_metadata(hf_hub_url(self.repo_id, self.planned.path, revision=self.commit),
                                    timeout=constants.HF_HUB_ETAG_TIMEOUT)

    def run(self) -> str | None:
        """Fetch, check and place the file; returns the checksum it was verified with (None: size only)."""
        name, size = self.planned.path, self.planned.size
        meta = self.metadata()
        etag = meta.etag or ""
        if not _ETAG_NAME_RE.match(etag):
            raise ModelError(f"the Hub sent no usable ETag for {name} of {self.repo_id}, so it cannot be cached "
                             "safely", hint="check that HF_ENDPOINT points to the Hugging Face Hub or a mirror of it")
        if meta.commit_hash and meta.commit_hash != self.commit:
            raise ModelError(f"the Hub served {name} of {self.repo_id} from commit {meta.commit_hash[:12]} instead of "
                             f"{self.commit[:12]}", hint="run the download again; if it persists, report it")
        if meta.size is not None and meta.size != size:
            raise ModelError(f"the Hub lists {name} of {self.repo_id} as {size} bytes but serves {meta.size}",
                             hint="run the download again in a minute")
        blob = self.folder / "blobs" / etag
        pointer = self.folder / "snapshots" / self.commit / name
        blob.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.folder, etag, name, self.repo_id):
            if blob.is_file() and blob.stat().st_size == size:
                # Fetched before (another revision shares it, or another tool put it there): only the link is missing.
                _place(blob, pointer)
                self.progress.add(size, transferred=False)
                return None
            partial = partial_path(self.folder, etag)
            hasher = self.transfer(meta.location, partial, etag)
            if hasher is not None and hasher.hexdigest() != etag:
                partial.unlink(missing_ok=True)
                raise ModelError(
                    f"{name} of {self.repo_id} does not match the checksum the Hub published "
                    f"({_checksum_kind(etag)} {etag[:12]}...): its bytes were damaged on the way or on disk (for "
                    "example by a crash during an earlier download), so the partial file was deleted",
                    hint=f"run the download again to fetch this file from the start: "
                         f"ft-desk models download {self.repo_id}",
                )
            _place(blob, pointer, source=partial)
        return _checksum_kind(etag)

    def transfer(self, location: str | None, partial: Path, etag: str):
        """Append the missing bytes to `partial` (Range: bytes=N-), retrying cut transfers; returns the hasher."""
        import httpx2  # huggingface_hub's HTTP client

        size = self.planned.size
        self.kept = _size(partial)
        if self.kept > size:  # not a prefix of this file: start over
            self.kept = 0
        self.hasher = content_hasher(etag, size)
        if self.kept and self.hasher is not None:
            _hash_prefix(self.hasher, partial, self.kept)  # the kept part is checked too, with the rest, at the end
        self.progress.resume(self.kept)
        stalled = 0
        with open(partial, "r+b" if partial.is_file() else "wb") as out:
            out.seek(self.kept)
            out.truncate()
            while out.tell() < size:
                self.received = 0
                failure: BaseException | None = None
                try:
                    if location is None:  # after a failure: ask again, a signed CDN link may have expired
                        location = self.metadata().location
                    self._get(location, out, etag)
                except httpx2.TransportError as exc:  # cut, reset, timeout: continue from what arrived
                    failure = exc
                if out.tell() >= size:
                    break
                stalled = 0 if self.received else stalled + 1
                if stalled > MAX_STALLED_RETRIES:
                    if failure is not None:
                        raise failure
                    raise ModelError(f"the Hub stopped sending {self.planned.path} of {self.repo_id} at byte "
                                     f"{out.tell()} of {size}", hint=f"run ft-desk models download {self.repo_id} "
                                     "again later: it continues from there")
                time.sleep(RETRY_WAIT_S)
                location = None
            out.flush()
            os.fsync(out.fileno())  # on disk before it gets the blob's name: a crash cannot leave a named torn file
        return self.hasher

    def _get(self, location: str, out, etag: str) -> None:
        """One GET from the end of `out`, appending what arrives (and hashing it)."""
        from urllib.parse import urlsplit

        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        size, offset = self.planned.size, out.tell()
        headers = build_hf_headers()
        headers["Accept-Encoding"] = "identity"  # byte offsets must be offsets into the file itself
        if offset:
            headers["Range"] = f"bytes={offset}-"
        hub_url = hf_hub_url(self.repo_id, self.planned.path, revision=self.commit)
        if urlsplit(location).netloc != urlsplit(hub_url).netloc:
            headers.pop("authorization", None)  # a CDN link is signed; the token stays with the Hub
        with get_session().stream("GET", location, headers=headers,
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            if response.status_code >= 400 and not (offset and response.status_code == 416):
                response.read()  # so the error can say what the Hub answered
                hf_raise_for_status(response)
            if offset and not (response.status_code == 206 and _range_start(response) == offset):
                # The server sent the file from its start (it ignores Range): start this file over.
                self.progress.discard(offset, resumed=self.kept)
                self.kept = 0
                out.seek(0)
                out.truncate()
                self.hasher = content_hasher(etag, size)
                if response.status_code != 200:  # another range, or none it can serve: ask for the whole file
                    return
            for chunk in response.iter_bytes():
                if out.tell() + len(chunk) > size:
                    raise ModelError(f"the Hub sent more than the {size} bytes it lists for {self.planned.path} "
                                     f"of {self.repo_id}", hint="run the download again in a minute")
                out.write(chunk)
                if self.hasher is not None:
                    self.hasher.update(chunk)
                self.received += len(chunk)
                self.progress.add(len(chunk))


def _range_start(response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------------------------

def download_model(repo_id: str, revision: str | None = None, *, allow_pickle: bool = False,
                   trust_remote_code: bool = False, sink: EventSink | None = None,
                   verify_hashes: bool = False, clock: Callable[[], float] = time.monotonic) -> dict:
    """Fetch what training needs from `repo_id` into the HF cache; returns what `download_finished` reports.

    `verify_hashes` also re-checks the checksum of files that were already in the cache (fetched files always are).
    """
    check_repo_id(repo_id)
    folder = repo_dir(repo_id)
    if offline():
        snapshot = find_snapshot(repo_id, revision)
        if snapshot is not None and folder_status(snapshot)["complete"]:
            return _finished(sink, repo_id, snapshot, snapshot.name, 0, 0, 0.0, cached=True,
                             pinned=trust_remote_code, stale_partials_freed_bytes=remove_stale_incomplete(folder))
        raise offline_error(f"download {repo_id}")
    started = clock()
    plan = plan_download(repo_id, revision, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    snapshot = folder / "snapshots" / plan.commit
    missing = {f.path for f in plan.files if not _present(snapshot / f.path, f.size)}
    resumable = sum(_size(partial_path(folder, f.etag)) for f in plan.files if f.path in missing and f.etag)
    if sink is not None:
        sink.emit(make_event("download_started", **plan.to_dict(), resumable_bytes=resumable))
    freed = remove_stale_incomplete(folder)
    progress = DownloadProgress(sink, repo_id, plan.total_bytes, len(plan.files), clock=clock)
    if missing:
        snapshot.mkdir(parents=True, exist_ok=True)  # huggingface_hub's cache scan needs the folder to exist
        _tag_cache_dir(folder.parent)
    checked = 0
    for planned in plan.files:
        progress.file_started(planned.path)
        if planned.path in missing:
            try:
                checksum = _Fetch(repo_id, revision, plan.commit, planned, folder, progress).run()
            except KeyboardInterrupt:
                raise  # the partial file stays; the next download continues from its last byte
            except Exception as exc:
                raise hub_error(exc, repo_id, revision) from None
            checked += checksum is not None
        else:
            progress.add(planned.size, transferred=False)
            if verify_hashes and planned.etag:
                if file_matches(snapshot / planned.path, planned.etag, planned.size) is False:
                    raise ModelError(f"{repo_id}: {planned.path} does not match the checksum the Hub published",
                                     hint=f"remove it and download again: ft-desk models rm {repo_id} --yes")
                checked += 1
        progress.file_finished()

    for planned in plan.files:
        target = snapshot / planned.path
        size = target.stat().st_size if target.is_file() else -1
        if size != planned.size:
            raise ModelError(f"{repo_id}: {planned.path} is {size} bytes after the download, the Hub lists "
                             f"{planned.size}", hint=f"run the download again: ft-desk models download {repo_id}")
    check_model_folder(snapshot, name=repo_id, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                       pinned_revision=plan.commit, hub_model=True)
    _write_ref(repo_id, revision, plan.commit)
    return _finished(sink, repo_id, snapshot, plan.commit, plan.total_bytes, progress.transferred,
                     clock() - started, cached=not missing, pinned=bool(plan.remote_code),
                     weights_format=plan.weights_format, files=len(plan.files), bytes_resumed=progress.resumed,
                     files_hash_checked=checked, stale_partials_freed_bytes=freed)


def _present(path: Path, size: int) -> bool:
    # A file that is there with the wrong size (cut off, damaged) is fetched again, not trusted.
    return path.is_file() and path.stat().st_size == size


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _finished(sink, repo_id: str, snapshot: Path, commit: str, total: int, transferred: int, elapsed: float,
              cached: bool, pinned: bool, **extra) -> dict:
    result = {
        "repo_id": repo_id, "commit": commit, "path": str(snapshot), "bytes_total": total,
        "bytes_downloaded": transferred, "elapsed_s": round(elapsed, 2), "already_cached": cached,
        # A model that runs repo code is only usable at the commit that was reviewed: this is the value to pin.
        "pinned_revision": commit if pinned else None, **extra,
    }
    if sink is not None:
        sink.emit(make_event("download_finished", **result))
    return result
