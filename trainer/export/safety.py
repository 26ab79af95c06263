"""Where an export is written, and the promises kept around it.

- The target folder must be new or empty. A non-empty folder, or a symlink, is refused unless `--force`.
- Even with `--force`, ft-desk never deletes or overwrites a file it did not write. The files an earlier ft-desk
  export wrote are listed in that folder's manifest (`.ft-desk-export.json`) and may be replaced; a clash with any
  other file is refused before anything in the folder is touched. A forced symlink is written through, to the
  folder it points at; the link itself is left alone.
- Everything is written into a hidden temporary sibling first and moved into place at the end, so a crash or
  Ctrl-C never leaves a half export under the target's name.
- Disk full (ENOSPC, EDQUOT) is a `UserError` saying how much space the export needs, and the partial output is
  removed. The space is also checked before writing starts.
Stdlib only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ft_desk.trainer.atomic import write_text
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.errors import is_disk_full as _is_disk_full
from ft_desk.trainer.events import format_bytes
from ft_desk.trainer.limits import folder_problem

MANIFEST = ".ft-desk-export.json"
# Note: headroom asked for on top of the estimated size (file system metadata, the manifest, fidelity.json).
SPACE_MARGIN_BYTES = 64 * 1024 * 1024
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@dataclass
class OutputTarget:
    """The checked destination of one export."""

    requested: Path
    """The folder the user named (may be a symlink)."""
    folder: Path
    """The real folder files end up in."""
    exists: bool
    ours: set[str] = field(default_factory=set)
    """Files (relative paths) an earlier ft-desk export wrote there; only these may be replaced."""


def _read_manifest(folder: Path) -> set[str]:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    files = data.get("files") if isinstance(data, dict) else None
    return {str(f) for f in files} if isinstance(files, list) else set()


def check_target(path: Path, force: bool) -> OutputTarget:
    """Refuse a target we must not write into; resolve where the files will go."""
    requested = Path(path).expanduser()
    folder = requested
    if requested.is_symlink():
        if not force:
            raise UserError(
                f"{requested} is a symbolic link; ft-desk does not write through links unless asked",
                hint="choose another --out folder, or pass --force to write into the folder the link points to",
            )
        folder = requested.resolve()
        if not folder.is_dir():
            raise UserError(f"{requested} points to {folder}, which is not a folder",
                            hint="choose another --out folder")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder", hint="choose another --out folder")
    if not folder.exists():
        return OutputTarget(requested=requested, folder=folder.absolute(), exists=False)
    entries = list(folder.iterdir())
    if entries and not force:
        raise UserError(
            f"{folder} is not empty ({len(entries)} entries); an export goes into a new or empty folder",
            hint="choose a new --out folder, or pass --force to add the export beside those files "
                 "(ft-desk never deletes files it did not write)",
        )
    return OutputTarget(requested=requested, folder=folder.absolute(), exists=True, ours=_read_manifest(folder))


def disk_full_error(folder: Path, needed: int) -> UserError:
    try:
        free = shutil.disk_usage(_existing_parent(folder)).free
        have = f", {format_bytes(free)} free"
    except OSError:
        have = ""
    return UserError(
        f"not enough disk space in {folder}: the export needs about {format_bytes(needed)}{have}; "
        "the partial output was removed",
        hint="free some space or choose another --out folder on a larger disk",
    )


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT as an OSError, or wrapped by a library that keeps only the words (safetensors, a child)."""
    return (isinstance(exc, OSError) and exc.errno in _DISK_FULL) or _is_disk_full(exc)


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def export_lock(folder: Path) -> Iterator[None]:
    """One export at a time into `folder`: a second one is refused with a UserError, not left to crash on the
    first one's files. The lock is a hidden file beside the folder, removed when the export ends."""
    from filelock import FileLock, Timeout  # a dependency already (hub/download.py); flock/msvcrt underneath

    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise folder_problem(exc, folder.parent, "the export's parent folder", "--out") from None
    path = folder.parent / f".{folder.name}.ft-desk-export.lock"
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"another export is writing into {folder} right now",
                        hint="wait for it to finish, or choose another --out folder") from None
    except OSError as exc:
        raise folder_problem(exc, folder.parent, "the export's parent folder", "--out") from None
    try:
        yield
    finally:
        lock.release()
        with contextlib.suppress(OSError):
            path.unlink()


class Staging:
    """A hidden temporary sibling of the target; `commit()` moves what was written into place.

    Use as a context manager: on any exception the temporary folder (everything in it was written by us) is
    removed, and a disk-full OSError is turned into a UserError naming the space needed.
    """

    def __init__(self, target: OutputTarget, needed_bytes: int) -> None:
        self.target = target
        self.needed = int(needed_bytes)
        parent = target.folder.parent
        self.path = parent / f".{target.folder.name}.partial-{uuid.uuid4().hex[:8]}"
        self.work = parent / f".{target.folder.name}.work-{uuid.uuid4().hex[:8]}"
        self.committed: list[str] = []

    def __enter__(self) -> "Staging":
        parent = self.target.folder.parent
        parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(parent).free
        if free < self.needed + SPACE_MARGIN_BYTES:
            raise UserError(
                f"not enough disk space in {parent}: the export needs about {format_bytes(self.needed)}, "
                f"{format_bytes(free)} free",
                hint="free some space or choose another --out folder on a larger disk",
            )
        self.sweep_leftovers()
        self.path.mkdir()
        self.work.mkdir()
        return self

    def sweep_leftovers(self) -> list[Path]:
        """Remove the hidden staging folders an earlier export of this same folder left when it was killed.
        Staging runs under export_lock, so no live export owns a sibling with this folder's name."""
        name = self.target.folder.name
        gone = []
        for kind in ("partial", "work"):
            for folder in self.target.folder.parent.glob(f".{name}.{kind}-*"):
                if folder.is_dir() and len(folder.name) == len(f".{name}.{kind}-") + 8:
                    shutil.rmtree(folder, ignore_errors=True)
                    gone.append(folder)
        return gone

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.cleanup()
        if exc is not None and is_disk_full(exc):
            raise disk_full_error(self.target.folder, self.needed) from None
        return False

    def cleanup(self) -> None:
        """Remove the temporary folders (only ever files this export wrote)."""
        for folder in (self.path, self.work):
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())

    def commit(self, provenance: dict) -> list[str]:
        """Move the staged files into the target; returns the relative paths written."""
        files = [f for f in self.files() if f != MANIFEST]
        folder = self.target.folder
        manifest = {**provenance, "files": files}
        if not self.target.exists or not any(folder.iterdir()):
            write_text(self.path / MANIFEST, json.dumps(manifest, indent=2))
            try:
                if self.target.exists:
                    folder.rmdir()  # empty: nothing of the user's is lost
                os.rename(self.path, folder)
            except OSError as exc:  # the folder was made, or filled, by someone else meanwhile
                if not folder.exists():
                    raise
                raise UserError(f"{folder} was created or filled by another program while exporting; "
                                "nothing in it was changed", hint="export again into a new --out folder") from exc
        else:
            clashes = [f for f in files if (folder / f).exists() and f not in self.target.ours]
            if clashes:
                raise UserError(
                    f"{folder} already has {clashes[0]}"
                    + (f" and {len(clashes) - 1} more file(s)" if len(clashes) > 1 else "")
                    + " that ft-desk did not write; it will not overwrite them, even with --force",
                    hint="choose a new --out folder",
                )
            # The manifest first: it is the one write here that needs space, so a full disk stops the export
            # before any file is moved, and every file moved in is already listed as ft-desk's.
            manifest["files"] = sorted(set(files) | (self.target.ours & {f for f in self.target.ours
                                                                           if (folder / f).exists()}))
            write_text(folder / MANIFEST, json.dumps(manifest, indent=2))
            for rel in files:
                dest = folder / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.path / rel, dest)
        self.committed = files
        return files
