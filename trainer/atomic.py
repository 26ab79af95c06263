"""Writing a file so that a crash leaves the old version or the new one, never half of either. Stdlib only.

The data goes to a hidden temporary file in the same folder (`.NAME.tmp`, so the rename never crosses a file
system), is fsynced, replaces the target with os.replace, and then the folder is fsynced so the rename itself
survives a power cut. A temporary file torn by an earlier crash is simply overwritten; readers never look at it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


def temp_path(path: Path) -> Path:
    """Where the next version of `path` is written before it replaces `path`."""
    return path.with_name(f".{path.name}.tmp")


def fsync_folder(folder: Path) -> None:
    """Make the folder's entries (a rename, a new file) durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open a folder; NTFS journals the rename itself
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (network, FUSE) refuse fsync on a folder; the data itself is already synced
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file directly in `folder`, then the folder: done before a staged folder is renamed in place."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_folder(folder)


def write_chunks(path: Path | str, chunks: Iterable[bytes]) -> Path:
    """Write the chunks, in order, as the new content of `path`, atomically and durably."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def write_bytes(path: Path | str, data: bytes) -> Path:
    return write_chunks(path, [data])


def write_text(path: Path | str, text: str) -> Path:
    return write_chunks(path, [text.encode("utf-8")])


def write_lines(path: Path | str, lines: Iterable[str]) -> Path:
    """Each string as it comes (streamed, so a large file is never held in memory twice), UTF-8."""
    return write_chunks(path, (line.encode("utf-8") for line in lines))


def write_json(path: Path | str, data: Any, indent: int | None = 1, **dumps: Any) -> Path:
    """`data` as JSON (json.dumps keyword arguments pass through: ensure_ascii, default...)."""
    return write_text(path, json.dumps(data, indent=indent, **dumps))
