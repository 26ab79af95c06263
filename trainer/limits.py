"""What ft-desk accepts from a user, checked once, where it enters, before anything is written. Stdlib only.

- Names that become a file or folder name (a run name, an export's model name) are plain names: no path
  separator, no `..`, no leading dot, no control character, a bounded length - so nothing is ever written outside
  the folder the user named.
- An Ollama model name is `[namespace/]name[:tag]` in Ollama's own alphabet.
- Free text that becomes a path or a model id (`--out`, `data.train_file`, `model.name`) has no control
  characters (a newline in a path is always a paste accident) and no token-shaped string (a pasted access token
  must never land in a run folder).
- A data file is a regular file (not a named pipe, a device or a folder) of bounded size whose lines are bounded,
  so a 200 MB single-line file is refused in a second instead of eating memory.
- A folder ft-desk must write into (the runs folder, FT_DESK_HOME) is a writable folder, said in one sentence.
Every bound is in the message that refuses it.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from ft_desk.trainer.errors import DataError, UserError
from ft_desk.trainer.redaction import has_token, redact_tokens

MAX_NAME_CHARS = 100
"""Longest run or export name (file systems allow 255 bytes; names get suffixes like `-f16.gguf`)."""
MAX_TEXT_CHARS = 4096
"""Longest path or model id typed on a command line or in a preset."""
MAX_NEW_TOKENS = 32768
"""Longest generation anywhere (eval samples, `ft-desk eval`, chat)."""
MAX_MICRO_BATCHES = 2_000_000
"""Longest training schedule (micro-batches of one run): it is planned up front, a few hundred bytes each."""
MAX_DATA_FILE_BYTES = 8 * 1024**3
"""Largest data file (.jsonl, .csv, .parquet); a bigger one is split or sampled first."""
MAX_JSON_FILE_BYTES = 512 * 1024**2
"""Largest .json data file: it is parsed whole, so beyond this it must be JSON Lines."""
MAX_LINE_BYTES = 16 * 1024**2
"""Longest line of a .jsonl or .csv data file (a row far longer than any data.max_length can use)."""

_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_OLLAMA_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _shown(value: str) -> str:
    """A value as quoted in a message: redacted, and cut when very long."""
    text = redact_tokens(value)
    return repr(text if len(text) <= 80 else text[:77] + "...")


def check_plain_name(value: object, what: str, hint: str = "", kind: str = "file or folder name") -> str:
    """`value` if it is a plain file/folder name, else a UserError naming `what` and the rule."""
    name = str(value)
    why = None
    if not name.strip():
        why = "is empty"
    elif _CONTROL.search(name):
        why = "contains a control character (a newline or tab)"
    elif "/" in name or "\\" in name:
        why = "contains a path separator"
    elif name in (".", "..") or ".." in name:
        why = "contains '..'"
    elif name.startswith("."):
        why = "starts with a dot (hidden)"
    elif name != name.strip():
        why = "starts or ends with a space"
    elif len(name) > MAX_NAME_CHARS:
        why = f"is {len(name)} characters long (at most {MAX_NAME_CHARS})"
    elif name.split(".")[0].lower() in _RESERVED:
        why = "is a name Windows reserves for a device"
    elif has_token(name):
        why = "looks like an access token"
    if why:
        raise UserError(f"{what} must be a plain {kind}, but {_shown(name)} {why}",
                        hint=hint or f"choose a name like my-run-1 for {what}")
    return name


def check_run_name(value: object) -> str:
    return check_plain_name(value, "output.run_name", hint="set a plain name, e.g. --set output.run_name=support-v2",
                            kind="folder name")


def check_ollama_name(value: object) -> str:
    """An export's model name as Ollama takes it, `[namespace/]name[:tag]`, or a UserError. Anything that could
    make a path - a control character, a backslash, '..', more than one '/', an empty part - is refused; within
    the parts, other characters are folded the friendly way (`Support Desk` -> `support-desk`)."""
    name = str(value)
    rule = ("an Ollama model name is [namespace/]name[:tag] made of letters, digits, '_', '-' and '.' "
            f"(at most {MAX_NAME_CHARS} characters)")
    base, _, tag = name.partition(":")
    parts = base.split("/") + ([tag] if ":" in name else [])
    folded = [re.sub(r"[^A-Za-z0-9_.-]+", "-", p.strip()).strip("-.").lower() for p in parts]
    why = None
    if _CONTROL.search(name):
        why = "it contains a control character (a newline or tab)"
    elif "\\" in name or ".." in name or name.count(":") > 1 or base.count("/") > 1:
        why = "it has a path in it"
    elif not name.strip() or not all(folded):
        why = "a part of it is empty"
    elif len(name) > MAX_NAME_CHARS:
        why = f"it is {len(name)} characters long"
    elif has_token(name):
        why = "it looks like an access token"
    if why:
        raise UserError(f"--name {_shown(name)} is not a usable model name ({why}): {rule}",
                        hint="pass e.g. --name support-desk or --name me/support-desk:v2")
    namespaced = "/".join(folded[: len(base.split("/"))])
    return f"{namespaced}:{folded[-1]}" if ":" in name else namespaced


def export_file_stem(name: str) -> str:
    """The file-name part of an export named `name` (an Ollama name's namespace and tag become '-')."""
    return re.sub(r"[/:]", "-", name)


def check_text(value: object, key: str, what: str = "a path or name") -> str:
    """Free text that becomes a path or an id: bounded, no control characters, no pasted token."""
    text = str(value)
    if len(text) > MAX_TEXT_CHARS:
        raise UserError(f"{key} is {len(text)} characters long; {what} is at most {MAX_TEXT_CHARS}",
                        hint=f"check what was pasted into {key}")
    if _CONTROL.search(text):
        raise UserError(f"{key} {_shown(text)} contains a control character (a newline or tab)",
                        hint=f"check what was pasted into {key}")
    if has_token(text):
        raise UserError(f"{key} {_shown(text)} looks like an access token, not {what}",
                        hint=f"put the model id or file in {key}; log in with `hf auth login` (or HF_TOKEN) "
                             "for gated models - ft-desk never stores tokens")
    return text


def check_data_file(path: Path) -> Path:
    """A data file ft-desk can read safely: a regular file, bounded in size, with bounded lines."""
    try:
        info = path.stat()
    except OSError as exc:
        raise DataError(str(path), f"cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISFIFO(info.st_mode) or stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) or \
            stat.S_ISSOCK(info.st_mode):
        kind = "a named pipe" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
        raise DataError(str(path), f"is {kind}, not a regular file",
                        "save the data to a file first (ft-desk reads each file more than once)")
    if not stat.S_ISREG(info.st_mode):
        raise DataError(str(path), "is not a regular file", "name a .jsonl, .json, .csv or .parquet file")
    suffix = path.suffix.lower()
    limit = MAX_JSON_FILE_BYTES if suffix == ".json" else MAX_DATA_FILE_BYTES
    if info.st_size > limit:
        hint = ("convert it to JSON Lines (.jsonl, one row a line)" if suffix == ".json"
                else "split it, or sample the rows you need into a smaller file")
        raise DataError(str(path), f"is {_size(info.st_size)}; ft-desk reads {suffix or 'data'} files of at most "
                        f"{_size(limit)}", hint)
    if suffix in (".jsonl", ".csv", ".tsv", ".txt"):
        line, length = longest_line(path)
        if length > MAX_LINE_BYTES:
            raise DataError(f"{path}:{line}", f"the line is longer than {_size(MAX_LINE_BYTES)}, the most one row "
                            "may be",
                            "one row per line: check that the file has line breaks between rows")
    return path


def longest_line(path: Path, chunk: int = 1024 * 1024) -> tuple[int, int]:
    """(line number, length in bytes) of the first line longer than MAX_LINE_BYTES, else of the longest line.
    Streams the file, so memory stays at one chunk whatever the file holds."""
    best_line, best, line_no, current = 1, 0, 1, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            start = 0
            while True:
                cut = block.find(b"\n", start)
                if cut < 0:
                    current += len(block) - start
                    break
                current += cut - start
                if current > best:
                    best_line, best = line_no, current
                line_no, current, start = line_no + 1, 0, cut + 1
            if current > MAX_LINE_BYTES:
                return line_no, current
    if current > best:
        best_line, best = line_no, current
    return best_line, best


def _size(n: int) -> str:
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def folder_problem(exc: OSError, folder: Path, what: str, setting: str) -> UserError:
    """One sentence for an OSError met while making or writing `folder` (a file in the way, read-only...)."""
    code = exc.errno
    where = Path(exc.filename) if getattr(exc, "filename", None) else folder
    blocker = _file_in_the_way(where)
    if blocker is not None and code in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT, None):
        reason = f"{blocker} is a file, not a folder"
    elif code == errno.EROFS:
        reason = f"{where} is on a read-only file system"
    elif code in (errno.EACCES, errno.EPERM):
        reason = f"{where} is not writable (permission denied)"
    elif code == errno.ENOSPC:
        reason = f"the disk holding {where} is full"
    else:
        reason = f"{where} cannot be written ({exc.strerror or exc})"
    return UserError(f"cannot use {folder} as {what}: {reason}",
                     hint=f"point {setting} at a writable folder")


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest part of `path` (itself or a parent) that exists and is not a folder, if any."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def ensure_folder(folder: Path, what: str, setting: str) -> Path:
    """Make `folder` (and its parents) if needed and check that ft-desk can write in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise folder_problem(exc, folder, what, setting) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and bool(os.statvfs(folder).f_flag & getattr(os, "ST_RDONLY", 1))
        code = errno.EROFS if read_only else errno.EACCES
        raise folder_problem(OSError(code, os.strerror(code), str(folder)), folder, what, setting)
    return folder


def int_arg(low: int, high: int):
    """An argparse `type=` for an int flag bounded to [low, high], refused with the bound in the message."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int from {low} to {high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an int from {low} to {high}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def float_arg(low: float, high: float):
    """An argparse `type=` for a finite float flag in [low, high]."""
    import argparse
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be a number from {low} to {high}, got {text!r}")
        return value

    parse.__name__ = "float"
    return parse
