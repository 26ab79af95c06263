"""Following one run from a background thread: new events, and the end of its trainer process.

`RunWatcher` polls RUN_DIR/events.jsonl (EventTail) a few times a second and hands new events to `on_events` in batches
- one call per poll, however many steps arrived - so a fast run cannot flood the UI. The first batch is the history
already on disk (`replay=True`, so old errors are not announced again). It notices the end of the trainer either from
the process it was given (a run this app started) or from the pid in state.json (a run it re-attached to), drains the
file once more, calls `on_end(exit_code)` (None when the code is unknown) and stops. Callbacks run on the watcher
thread.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ft_desk.trainer import run_folder
from ft_desk.tui.runs import LIVE
from ft_desk.tui.tail import EventTail

EventsCallback = Callable[[list[dict[str, Any]], bool], None]
EndCallback = Callable[["int | None"], None]


class RunWatcher:
    def __init__(self, run_dir: Path, on_events: EventsCallback, on_end: EndCallback,
                 process: subprocess.Popen | None = None, poll_s: float = 0.25, liveness_s: float = 1.0) -> None:
        self.run_dir = run_dir
        self.tail = EventTail(run_folder.events_path(run_dir))
        self.on_events = on_events
        self.on_end = on_end
        self.process = process
        self.poll_s = poll_s
        self.liveness_s = liveness_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{run_dir.name}", daemon=True)
        self.ended = False
        try:
            self._had_history = self.tail.path.stat().st_size > 0
        except OSError:
            self._had_history = False

    def start(self) -> "RunWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _exit_code(self) -> tuple[bool, int | None]:
        """(finished, exit code) of the trainer."""
        if self.process is not None:
            code = self.process.poll()
            return code is not None, code
        state = run_folder.read_state(self.run_dir)
        if not state:
            return True, None  # nothing to follow: not a run folder
        status = run_folder.judged_status(state, self.run_dir)
        if status != LIVE:
            # A crashed trainer never wrote its exit code; a finished one did.
            return True, state.get("exit_code") if status != run_folder.CRASHED else None
        return False, None

    def _run(self) -> None:
        first = True
        next_check = 0.0
        while not self._stop.is_set():
            events = self.tail.read_new()
            if events or first:
                self.on_events(events, first and self._had_history)
                first = False
                if events and not self.tail.caught_up:
                    continue  # a long history: keep reading without sleeping
            now = time.monotonic()
            if now >= next_check:
                next_check = now + self.liveness_s
                done, code = self._exit_code()
                if done:
                    rest = self.tail.read_new()
                    while rest:
                        self.on_events(rest, False)
                        rest = self.tail.read_new()
                    self.ended = True
                    self.on_end(code)
                    return
            self._stop.wait(self.poll_s)
