"""Starting, stopping and resuming training as a detached child process.

The child is `python -m ft_desk.trainer.cli.main train ... --events jsonl` in its own session (start_new_session), so
closing the app, a dropped SSH connection (SIGHUP) or Ctrl-C in the app's terminal never reaches it. The app
names the run folder itself (`--set output.run_name=...`, by run_folder.py's naming rule) so it can follow
RUN_DIR/events.jsonl from the first line without talking to the child; the child's stdout is discarded
(events.jsonl has every event) and its stderr - where a bad-config error appears before any run folder exists -
goes to a launch log.
Stop is SIGINT: the trainer finishes its step, saves a checkpoint and exits with code 3.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ft_desk.trainer import run_folder
from ft_desk.trainer.config import RunConfig
from ft_desk.trainer.paths import cache_home, runs_home
from ft_desk.tui.commands import child_env, cli_argv


@dataclass
class Launch:
    """A child the app started: its process, its run folder (may not exist yet) and its stderr log."""

    process: subprocess.Popen
    run_dir: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            text = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def launch_dir() -> Path:
    folder = cache_home() / "launches"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def pick_run_dir(cfg: RunConfig, now: datetime | None = None) -> Path:
    """A run folder that does not exist yet, named like the trainer names them."""
    name = cfg.output.run_name or run_folder.default_run_name(cfg.model.name, cfg.train.method, now)
    return run_folder.unused_run_dir(runs_home(cfg.output.runs_dir), name)


def _spawn(args: list[str], stderr_path: Path) -> subprocess.Popen:
    stderr_path.parent.mkdir(parents=True, exist_ok=True)
    with open(stderr_path, "ab") as err:
        return subprocess.Popen(
            cli_argv(*args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=child_env(),
            start_new_session=True,  # its own session: no SIGHUP/SIGINT from our terminal
            close_fds=True,
        )


def start_training(train_args: list[str], cfg: RunConfig) -> Launch:
    """Start `ft-desk train TRAIN_ARGS` detached; `cfg` is the config those arguments resolve to."""
    run_dir = pick_run_dir(cfg)
    args = ["train", *train_args, "--set", f"output.run_name={run_dir.name}", "--events", "jsonl"]
    stderr_path = launch_dir() / f"{run_dir.name}.stderr.log"
    return Launch(_spawn(args, stderr_path), run_dir, stderr_path)


def resume_training(run_dir: Path) -> Launch:
    stderr_path = launch_dir() / f"{run_dir.name}.resume.stderr.log"
    return Launch(_spawn(["train", "--resume", str(run_dir), "--events", "jsonl"], stderr_path), run_dir, stderr_path)


def stop_training(pid: int, force: bool = False) -> None:
    """Ask the trainer to stop: one SIGINT finishes the step and saves a checkpoint; `force` sends a second one,
    which the trainer takes as "stop right now" (no final checkpoint)."""
    os.kill(pid, signal.SIGINT)
    if force:
        os.kill(pid, signal.SIGINT)
