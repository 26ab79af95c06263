"""The run the app is following, and the messages its watcher thread sends to the UI.

A `RunSession` ties a run folder to its `RunHistory`, its `RunWatcher` thread and - when this app started it -
the child process. The watcher's callbacks post `RunEvents` / `RunEnded` (posting is thread-safe); the app folds
events into the history on the UI thread and then sends the visible screen one `RunUpdated`, which `can_replace`
an older one still queued: however fast a run logs, a screen redraws at most once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textual.message import Message

from ft_desk.trainer import run_folder
from ft_desk.tui.history import RunHistory
from ft_desk.tui.launch import Launch
from ft_desk.tui.watch import RunWatcher


class RunEvents(Message):
    """A batch of events read from RUN_DIR/events.jsonl (`replay`: history that was on disk already)."""

    def __init__(self, run_dir: Path, events: list[dict[str, Any]], replay: bool) -> None:
        super().__init__()
        self.run_dir, self.events, self.replay = run_dir, events, replay


class RunEnded(Message):
    """The trainer process is gone; `exit_code` is None when it was not our child."""

    def __init__(self, run_dir: Path, exit_code: int | None) -> None:
        super().__init__()
        self.run_dir, self.exit_code = run_dir, exit_code


class RunUpdated(Message):
    """The followed run has new data; screens redraw from `app.session.history`."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, RunUpdated)


@dataclass
class RunSession:
    run_dir: Path
    launch: Launch | None = None
    history: RunHistory = field(default_factory=RunHistory)
    watcher: RunWatcher | None = None
    ended: bool = False
    exit_code: int | None = None
    stop_requested: bool = False

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def pid(self) -> int | None:
        if self.launch is not None:
            return self.launch.pid
        pid = run_folder.read_state(self.run_dir).get("pid")
        return pid if isinstance(pid, int) else None

    @property
    def status(self) -> str:
        """What the top bar and the Train screen say about the run."""
        if self.history.finished:
            return self.history.status
        if self.ended:
            return "crashed"
        if self.stop_requested:
            return "stopping"
        return "running" if self.history.started else "starting"

    @property
    def live(self) -> bool:
        return not self.ended and not self.history.finished

    def log_files(self) -> list[Path]:
        files = [run_folder.log_path(self.run_dir)]
        if self.launch is not None:
            files.append(self.launch.stderr_path)
        return files

    def state(self) -> dict[str, Any]:
        return run_folder.read_state(self.run_dir)

    def stop_watching(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
