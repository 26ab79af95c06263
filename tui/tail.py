"""Following a growing events.jsonl: what re-attaching to a detached run is built on.

`EventTail.read_new()` returns the events appended since the last call. An incomplete last line is held back
until its newline arrives; a line torn by a killed writer (and then glued to the first line a resumed writer
appends) is recovered from the last event start it contains, so at most the torn event itself is lost.
If the file shrinks or is replaced, reading starts again from the top.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ft_desk.trainer.events import parse_line

_EVENT_START = b'{"v":'
_CHUNK = 1 << 20


def parse_recovering(line: bytes) -> dict[str, Any] | None:
    event = parse_line(line)
    if event is None:
        cut = line.rfind(_EVENT_START)
        if cut > 0:
            event = parse_line(line[cut:])
    return event


class EventTail:
    """Incremental, restartable reader of one events file (not thread-safe: one reader thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pos = 0
        self._pending = b""
        self._ident: tuple[int, int] | None = None

    def read_new(self, limit: int = _CHUNK * 8) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                ident = (st.st_dev, st.st_ino)
                if ident != self._ident or st.st_size < self._pos:
                    self._ident, self._pos, self._pending = ident, 0, b""
                f.seek(self._pos)
                data = f.read(limit)
        except FileNotFoundError:
            return []
        if not data:
            return []
        self._pos += len(data)
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        events = []
        for line in lines:
            if line.strip():
                event = parse_recovering(line)
                if event is not None:
                    events.append(event)
        return events

    @property
    def caught_up(self) -> bool:
        try:
            return self.path.stat().st_size <= self._pos
        except OSError:
            return True
