"""Starting, stopping and resuming training as a detached child process, and what it leaves in the launch folder.

The child is `python -m ft_desk.trainer.cli.main train ... --events jsonl` in its own session (start_new_session), so
closing the app, a dropped SSH connection (SIGHUP) or Ctrl-C in the app's terminal never reaches it. The app
names the run folder itself (`--set output.run_name=...`, by run_folder.py's naming rule) so it can follow
RUN_DIR/events.jsonl from the first line without talking to the child.
Stop is SIGINT: the trainer finishes its step, saves a checkpoint and exits with code 3.

Two launch files per start, in cache_home()/launches/, named after the run folder:
- `NAME.stdout.jsonl` (`NAME.resume.stdout.jsonl`): the child's stdout, i.e. its events. A child that fails before
  it has a run folder (a bad `--set`, a missing preset, a resume of a run that is still training) says why only
  here, as a final `command_failed` event with error and hint; `Launch.final_event()` reads it, so the app never
  has to parse stderr for it. Once the trainer has its run folder sinks, its first event (run_started, or
  run_finished for a run that fails during setup) names the run folder, and every event it prints is in
  RUN_DIR/events.jsonl too, which always ends with run_finished: from then on the copy is redundant.
- `NAME.stderr.log` (`NAME.resume.stderr.log`, appended across resumes): diagnostics and tracebacks; the log
  viewer shows it next to run.log, and it is the fallback for a child that dies before main() could report.

Keeping them bounded: the stdout copy is a new file at each start (never an older attempt's final event).
The app removes it as soon as it is redundant (the run's events reached events.jsonl: `drop_stdout_if_redundant`)
and once the child has exited and its final event was read (`drop_stdout`). Removing a file the child still
writes is safe on POSIX: its last events go to the unlinked file, freed when it exits. What an app closed or killed
mid-run leaves behind is pruned when the next run starts (`prune_launch_files`): a stdout copy whose first event
names a run folder that has an events.jsonl, and any launch file not written for a week (KEEP_S).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ft_desk.trainer import run_folder
from ft_desk.trainer.config import RunConfig
from ft_desk.trainer.events import parse_line
from ft_desk.trainer.paths import cache_home, runs_home
from ft_desk.tui.commands import child_env, cli_argv

STDOUT_SUFFIX = ".stdout.jsonl"
STDERR_SUFFIX = ".stderr.log"
KEEP_S = 7 * 24 * 3600  # launch files not written for a week are pruned when a run starts
# Note: the final event is the last line; reading this much of the end is plenty for one event and keeps a
# long run's copy (if it was never dropped) from being read whole on the UI thread.
FINAL_EVENT_TAIL_BYTES = 64 * 1024


@dataclass
class Launch:
    """A child the app started: its process, its run folder (may not exist yet), its stderr log and its stdout
    copy (None for a child whose stdout went nowhere)."""

    process: subprocess.Popen
    run_dir: Path
    stderr_path: Path
    stdout_path: Path | None = None
    events_in_run_folder: bool = False
    """Set once the child's events were found in RUN_DIR/events.jsonl (and its stdout copy dropped)."""

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            text = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def final_event(self) -> dict[str, Any] | None:
        """The last event the child printed on stdout (its command_failed when it failed before its run folder
        events), or None when it printed none or the copy is gone."""
        if self.stdout_path is None:
            return None
        return last_event(self.stdout_path)

    def drop_stdout_if_redundant(self) -> bool:
        """Remove the stdout copy when its events are in RUN_DIR/events.jsonl too; True once it is gone."""
        if self.stdout_path is None:
            return True
        if copied_into_run_folder(self.stdout_path):
            self.events_in_run_folder = True
            self.drop_stdout()
            return True
        return False

    def drop_stdout(self) -> None:
        if self.stdout_path is not None:
            with suppress(OSError):
                self.stdout_path.unlink(missing_ok=True)
            self.stdout_path = None


def first_event(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            return parse_line(f.readline())
    except OSError:
        return None


def last_event(path: Path) -> dict[str, Any] | None:
    """The last complete event line of a JSON-lines file (a torn last line is skipped)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - FINAL_EVENT_TAIL_BYTES))
            chunk = f.read()
    except OSError:
        return None
    for line in reversed(chunk.splitlines()):
        event = parse_line(line)
        if event is not None:
            return event
    return None


def copied_into_run_folder(stdout_path: Path) -> bool:
    """Whether a stdout copy repeats a run folder's events.jsonl: its first event names the run folder (the
    trainer prints nothing before its run folder sinks exist but a final command_failed, which has no run_dir)."""
    event = first_event(stdout_path)
    run_dir = event.get("run_dir") if event else None
    return isinstance(run_dir, str) and run_folder.events_path(Path(run_dir)).is_file()


def launch_dir() -> Path:
    folder = cache_home() / "launches"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def prune_launch_files(now: float | None = None) -> list[Path]:
    """Remove launch files nobody needs any more (see the module docstring); returns what was removed."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    for path in sorted(launch_dir().iterdir()):
        is_stdout = path.name.endswith(STDOUT_SUFFIX)
        if not (is_stdout or path.name.endswith(STDERR_SUFFIX)) or not path.is_file():
            continue
        try:
            stale = now - path.stat().st_mtime > KEEP_S
        except OSError:
            continue
        if stale or (is_stdout and copied_into_run_folder(path)):
            with suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def pick_run_dir(cfg: RunConfig, now: datetime | None = None) -> Path:
    """A run folder that does not exist yet, named like the trainer names them."""
    name = cfg.output.run_name or run_folder.default_run_name(cfg.model.name, cfg.train.method, now)
    return run_folder.unused_run_dir(runs_home(cfg.output.runs_dir), name)


def _spawn(args: list[str], run_dir: Path, stem: str) -> Launch:
    """Start the CLI detached, stdout to `STEM.stdout.jsonl` (afresh) and stderr to `STEM.stderr.log` (appended)."""
    folder = launch_dir()
    with suppress(OSError):
        prune_launch_files()  # housekeeping must never stop a run from starting
    stdout_path, stderr_path = folder / f"{stem}{STDOUT_SUFFIX}", folder / f"{stem}{STDERR_SUFFIX}"
    # A new file, not the old one truncated: an earlier child may still hold the old one open (a resume refused
    # because the run is still training must not write into that trainer's copy, nor it into ours).
    with suppress(OSError):
        stdout_path.unlink(missing_ok=True)
    with open(stdout_path, "wb") as out, open(stderr_path, "ab") as err:
        process = subprocess.Popen(
            cli_argv(*args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=child_env(),
            start_new_session=True,  # its own session: no SIGHUP/SIGINT from our terminal
            close_fds=True,
        )
    return Launch(process, run_dir, stderr_path, stdout_path)


def start_training(train_args: list[str], cfg: RunConfig) -> Launch:
    """Start `ft-desk train TRAIN_ARGS` detached; `cfg` is the config those arguments resolve to."""
    run_dir = pick_run_dir(cfg)
    args = ["train", *train_args, "--set", f"output.run_name={run_dir.name}", "--events", "jsonl"]
    return _spawn(args, run_dir, run_dir.name)


def resume_training(run_dir: Path) -> Launch:
    return _spawn(["train", "--resume", str(run_dir), "--events", "jsonl"], run_dir, f"{run_dir.name}.resume")


def stop_training(pid: int, force: bool = False) -> None:
    """Ask the trainer to stop: one SIGINT finishes the step and saves a checkpoint; `force` sends a second one,
    which the trainer takes as "stop right now" (no final checkpoint)."""
    os.kill(pid, signal.SIGINT)
    if force:
        os.kill(pid, signal.SIGINT)
