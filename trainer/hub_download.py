"""Downloading a base model from the Hub into the standard Hugging Face cache: only what training needs, safely.

Order of a download (nothing is written before step 4):
  1. resolve the revision to a commit (`/api/models/{id}/revision/{rev}`), list that commit's files (tree API);
  2. reject the whole repo if any listed name could escape the download folder (`../x`, `/x`, `C:x`, `a\\b`);
  3. read config.json / tokenizer_config.json / the weight index in memory and decide: remote code is refused unless
     `trust_remote_code` (then the commit is the pin), pickle-only weights are refused unless `allow_pickle`;
  4. fetch the chosen files one by one at that commit with huggingface_hub (which retries a cut transfer with an HTTP
     Range request), reporting `download_progress` events (bytes, rate, ETA);
  5. check the snapshot is whole (sizes from the listing, safetensors headers) and point refs/<branch> at the commit.

Which files: config, generation config, tokenizer and chat-template files, and the weights transformers would load -
the safetensors shards named by model.safetensors.index.json (or model.safetensors); *.bin only when a repo has no
safetensors at all and the user allowed pickle. Never ONNX, GGUF, TF/Flax, `original/` or duplicate consolidated files.
Files already in the cache at that commit are not fetched again, so re-running an interrupted download continues
with the files that are missing. (huggingface_hub 2.x discards the partial file of a transfer that is killed, so
the file in flight when the process stopped starts over.)
"""

from __future__ import annotations

import collections
import functools
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import ModelError, UserError
from .events import EventSink, make_event
from .hub import (COMMIT_RE, check_model_folder, check_repo_id, code_files_for, foreign_code_refs, model_page_url,
                  pick_weight_files, remote_code_reason)
from .hub_cache import find_snapshot, folder_status, repo_dir
from .hub_remote import api, fetch_repo_json, hub_error, offline, offline_error

# Files a fine-tuning run reads besides the weights (exact names at the repo root).
TRAINING_FILES = frozenset({
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
    "chat_template.jinja", "chat_template.json",
})
TEMPLATE_DIR = "additional_chat_templates/"
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


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
        files.append(PlannedFile(name, int(entry.size or 0), sha))
    gated = bool(getattr(info, "gated", False))
    return DownloadPlan(repo_id, revision, commit, files, weights.format, reason, gated,
                        sorted(names - wanted))


class DownloadProgress:
    """Bytes, rate and ETA over a whole download; emits `download_progress` at most every `interval` seconds."""

    def __init__(self, sink: EventSink | None, repo_id: str, total_bytes: int, files_total: int,
                 clock: Callable[[], float] = time.monotonic, interval: float = 0.25) -> None:
        self.sink, self.repo_id, self.clock, self.interval = sink, repo_id, clock, interval
        self.total_bytes, self.files_total = total_bytes, files_total
        self.bytes_done = 0
        self.transferred = 0  # bytes received in this process (cached files do not count towards the rate)
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
            rate_bytes_per_s=round(rate, 1) if rate is not None else None,
            eta_s=round(eta, 1) if eta is not None else None, elapsed_s=round(now - self.started, 2),
        ))


class _FileBar:
    """The progress object huggingface_hub drives for one file (it accepts any class with tqdm's update/close).

    A retry after a cut transfer reuses the same bar; a server that ignores the Range header makes it call
    update(-n) to roll back, which `add` handles as a negative delta.
    """

    def __init__(self, progress: DownloadProgress, total=None, initial=0, **_ignored) -> None:
        self.progress = progress
        self.n = initial or 0
        if initial:
            progress.add(initial)

    def update(self, n: int = 1) -> None:
        self.n += n
        self.progress.add(n)

    def update_transfer(self, n: int = 1) -> None:  # Xet transfers report wire bytes here; bytes come via update
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_ref(repo_id: str, revision: str | None, commit: str) -> None:
    """Point refs/<branch or tag> at the commit, so offline lookups by name (and other tools) find the snapshot."""
    if revision and COMMIT_RE.match(revision):
        return
    ref = repo_dir(repo_id) / "refs" / (revision or "main")
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.is_file() or ref.read_text(encoding="utf-8").strip() != commit:
        ref.write_text(commit, encoding="utf-8")


def download_model(repo_id: str, revision: str | None = None, *, allow_pickle: bool = False,
                   trust_remote_code: bool = False, sink: EventSink | None = None,
                   verify_hashes: bool = False, clock: Callable[[], float] = time.monotonic) -> dict:
    """Fetch what training needs from `repo_id` into the HF cache; returns what `download_finished` reports."""
    check_repo_id(repo_id)
    if offline():
        snapshot = find_snapshot(repo_id, revision)
        if snapshot is not None and folder_status(snapshot)["complete"]:
            return _finished(sink, repo_id, snapshot, snapshot.name, 0, 0, 0.0, cached=True,
                             pinned=trust_remote_code)
        raise offline_error(f"download {repo_id}")
    started = clock()
    plan = plan_download(repo_id, revision, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    snapshot = repo_dir(repo_id) / "snapshots" / plan.commit
    if sink is not None:
        sink.emit(make_event("download_started", **plan.to_dict()))
    progress = DownloadProgress(sink, repo_id, plan.total_bytes, len(plan.files), clock=clock)

    from huggingface_hub import hf_hub_download  # heavy-ish; only for an actual download

    for planned in plan.files:
        progress.file_started(planned.path)
        target = snapshot / planned.path
        present = target.is_file() and target.stat().st_size == planned.size
        if present:
            progress.add(planned.size, transferred=False)
        else:
            # A file that is there with the wrong size (cut off, damaged) is fetched again, not trusted.
            damaged = target.is_file() or target.is_symlink()
            try:
                hf_hub_download(repo_id, planned.path, revision=plan.commit, force_download=damaged,
                                tqdm_class=functools.partial(_FileBar, progress))  # type: ignore[arg-type]
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                raise hub_error(exc, repo_id, revision) from None
        progress.file_finished()

    for planned in plan.files:
        target = snapshot / planned.path
        size = target.stat().st_size if target.is_file() else -1
        if size != planned.size:
            raise ModelError(f"{repo_id}: {planned.path} is {size} bytes after the download, the Hub lists "
                             f"{planned.size}", hint=f"run the download again: ft-desk models download {repo_id}")
        if verify_hashes and planned.sha256 and _sha256(target) != planned.sha256:
            raise ModelError(f"{repo_id}: {planned.path} does not match the checksum the Hub published",
                             hint=f"remove it and download again: ft-desk models rm {repo_id} --yes")
    check_model_folder(snapshot, name=repo_id, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                       pinned_revision=plan.commit, hub_model=True)
    _write_ref(repo_id, revision, plan.commit)
    return _finished(sink, repo_id, snapshot, plan.commit, plan.total_bytes, progress.transferred,
                     clock() - started, cached=progress.transferred == 0,
                     pinned=bool(plan.remote_code), weights_format=plan.weights_format, files=len(plan.files))


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
