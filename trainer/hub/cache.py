"""The local Hugging Face cache: which models are there, how big, whether each snapshot is whole, and removing one.

ft-desk shares the standard cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub) with every other tool, so a model
downloaded by `hf download` or transformers is reused, and the other way round. Nothing here touches the network.
The cache folder is read from huggingface_hub's constants at call time (tests point it at a temporary folder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ft_desk.trainer.errors import ModelError, UserError
from ft_desk.trainer.hub.folder_check import check_model_folder
from ft_desk.trainer.hub.names import COMMIT_RE

# Note: ft-desk's resumable partial file is blobs/<etag> + this suffix; huggingface_hub never uses the name (its own
# are <etag>.<uuid>.incomplete, deleted by `hf cache prune`), and it is never the name of a complete file.
PARTIAL_SUFFIX = ".ftdesk-partial"


def hf_cache_dir() -> Path:
    from huggingface_hub import constants  # read at call time, never cached in this module

    return Path(constants.HF_HUB_CACHE)


def repo_dir(repo_id: str) -> Path:
    return hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def find_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder for `repo_id` at `revision` (commit, branch or tag; None = main), or None.

    With no revision and no `main` ref (a model downloaded only at a pinned commit), the newest snapshot is used.
    """
    folder = repo_dir(repo_id)
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return None
    if revision and ".." in revision:
        return None
    if revision and COMMIT_RE.match(revision):
        snap = snapshots / revision
        return snap if snap.is_dir() else None
    ref = folder / "refs" / (revision or "main")
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        snap = snapshots / commit
        return snap if COMMIT_RE.match(commit) and snap.is_dir() else None
    if revision:
        return None
    candidates = [d for d in snapshots.iterdir() if d.is_dir() and COMMIT_RE.match(d.name)]
    return max(candidates, key=lambda d: d.stat().st_mtime) if candidates else None


def folder_status(path: Path) -> dict:
    """Completeness and safety facts about a model folder, without refusing anything (for listings)."""
    try:
        # Listing only: nothing is loaded or executed here, so the opt-ins just stop the check from refusing;
        # the report's remote_code field still tells the listing that the model needs code.
        report = check_model_folder(path, trust_remote_code=True, allow_pickle=True)
    except UserError as err:
        return {"complete": False, "problem": err.message, "weights_format": None, "remote_code": None,
                "params": None}
    return {"complete": True, "problem": None, "weights_format": report.weights_format,
            "remote_code": report.remote_code, "params": report.params}


@dataclass
class CachedRevision:
    commit: str
    refs: list[str]
    path: Path
    size_bytes: int
    last_modified: float
    status: dict

    def to_dict(self) -> dict:
        return {"commit": self.commit, "refs": self.refs, "path": str(self.path), "size_bytes": self.size_bytes,
                "last_modified": self.last_modified, **self.status}


@dataclass
class CachedModel:
    repo_id: str
    size_bytes: int
    last_accessed: float
    last_modified: float
    revisions: list[CachedRevision] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return any(r.status["complete"] for r in self.revisions)

    def to_dict(self) -> dict:
        return {"repo_id": self.repo_id, "size_bytes": self.size_bytes, "last_accessed": self.last_accessed,
                "last_modified": self.last_modified, "complete": self.complete,
                "revisions": [r.to_dict() for r in self.revisions]}


def _scan():
    from huggingface_hub import scan_cache_dir  # local only: reads the cache folder
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan_cache_dir(hf_cache_dir())
    except CacheNotFound:
        return None


def cached_models(check: bool = True) -> list[CachedModel]:
    """Every model repo in the cache, largest first; `check` also verifies each snapshot (reads headers only)."""
    info = _scan()
    if info is None:
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        revisions = sorted(
            (CachedRevision(r.commit_hash, sorted(r.refs), r.snapshot_path, r.size_on_disk, r.last_modified,
                            folder_status(r.snapshot_path) if check else {})
             for r in repo.revisions),
            key=lambda r: (("main" not in r.refs), -r.last_modified),
        )
        out.append(CachedModel(repo.repo_id, repo.size_on_disk, repo.last_accessed, repo.last_modified, revisions))
    return sorted(out, key=lambda m: (-m.size_bytes, m.repo_id))


def partial_download_bytes() -> int:
    """Bytes of unfinished downloads left in the cache by killed processes (huggingface_hub's *.incomplete files)."""
    root = hf_cache_dir()
    if not root.is_dir():
        return 0
    return sum(f.stat().st_size for f in root.glob("models--*/blobs/*.incomplete") if f.is_file())


def resumable_downloads() -> dict[str, int]:
    """Repo id -> bytes already fetched by an unfinished `ft-desk models download` (it continues from there)."""
    root = hf_cache_dir()
    found: dict[str, int] = {}
    if root.is_dir():
        for f in root.glob(f"models--*/blobs/*{PARTIAL_SUFFIX}"):
            if f.is_file():
                repo_id = f.parent.parent.name[len("models--"):].replace("--", "/")
                found[repo_id] = found.get(repo_id, 0) + f.stat().st_size
    return found


def cached_ids() -> set[str]:
    """Ids of models with at least one snapshot in the cache (cheap: folder names only)."""
    root = hf_cache_dir()
    if not root.is_dir():
        return set()
    return {d.name[len("models--"):].replace("--", "/") for d in root.iterdir()
            if d.name.startswith("models--") and (d / "snapshots").is_dir()}


def removal_plan(repo_id: str, revision: str | None = None):
    """(strategy, bytes freed, commits) for deleting `repo_id` (or one revision of it) from the cache."""
    info = _scan()
    repo = next((r for r in (info.repos if info else ()) if r.repo_type == "model" and r.repo_id == repo_id), None)
    if repo is None:
        raise ModelError(f"{repo_id} is not in the Hugging Face cache ({hf_cache_dir()})",
                         hint="see what is there with: ft-desk models list")
    commits = [r.commit_hash for r in repo.revisions]
    if revision:
        chosen = [r.commit_hash for r in repo.revisions if revision in r.refs or r.commit_hash.startswith(revision)]
        if not chosen:
            cached = ", ".join(c[:12] for c in commits)
            raise ModelError(f"{repo_id} has no cached revision {revision!r}; cached: {cached}")
        commits = chosen
    strategy = info.delete_revisions(*commits)
    return strategy, strategy.expected_freed_size, commits


def remove_model(repo_id: str, revision: str | None = None) -> int:
    """Delete `repo_id` (or one revision) from the cache; returns the bytes freed."""
    strategy, freed, _ = removal_plan(repo_id, revision)
    strategy.execute()
    folder = repo_dir(repo_id)
    if not revision and folder.is_dir() and not any((folder / "snapshots").glob("*")):
        import shutil

        shutil.rmtree(folder, ignore_errors=True)  # leftover refs/.no_exist of a fully removed repo
    return freed
