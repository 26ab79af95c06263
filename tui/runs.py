"""Run folders as the app sees them: Home screen rows, whether a run's trainer is still alive, deleting one.

The layout, the state file and how a status is judged are the trainer's contract (trainer/run_folder.py, stdlib
only); this module only turns them into rows. A run whose state says "running" but whose process is gone
(machine rebooted, process killed with SIGKILL) is shown as "crashed": it can be resumed from its last checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ft_desk.trainer import run_folder
from ft_desk.trainer.paths import runs_home

LIVE = run_folder.RUNNING
RESUMABLE = run_folder.RESUMABLE


@dataclass(frozen=True)
class RunSummary:
    """One row of the Home screen."""

    run_dir: Path
    run_name: str
    status: str
    model_name: str = ""
    method: str = ""
    best_val_loss: float | None = None
    step: int = 0
    total_steps: int = 0
    created: float = 0.0
    error: str = ""

    @property
    def live(self) -> bool:
        return self.status == LIVE

    @property
    def resumable(self) -> bool:
        return self.status in RESUMABLE

    @property
    def trained(self) -> bool:
        """Has an adapter or checkpoint worth evaluating/exporting."""
        return run_folder.has_weights(self.run_dir)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None when it is missing or half-written."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _created(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            pass
    return 0.0


def from_row(row: dict[str, Any]) -> RunSummary:
    """A RunSummary from one row of `ft-desk runs --json`."""
    best = row.get("best_val_loss")
    return RunSummary(
        run_dir=Path(row["run_dir"]),
        run_name=str(row.get("run_name") or Path(row["run_dir"]).name),
        status=str(row.get("status") or "unknown"),
        model_name=str(row.get("model_name") or ""),
        method=str(row.get("method") or ""),
        best_val_loss=float(best) if isinstance(best, (int, float)) else None,
        step=int(row.get("step") or 0),
        total_steps=int(row.get("total_steps") or 0),
        created=_created(row.get("created")),
        error=str(row.get("error") or ""),
    )


def list_runs(runs_dir: str | None = None) -> list[RunSummary]:
    """Every run, newest first: the rows of `ft-desk runs --json`, read in-process (the code is light)."""
    return [from_row(row) for row in run_folder.list_runs(runs_home(runs_dir))]


def is_live(run_dir: Path) -> bool:
    """The run's state says running and its trainer process is alive."""
    return run_folder.is_live(run_dir)


def delete_run(run: RunSummary) -> None:
    """Remove a run folder (the user confirmed). A live run is refused: stop it first."""
    if is_live(run.run_dir):
        raise RuntimeError(f"run {run.run_name} is still training; stop it before deleting it")
    if not run_folder.is_run_folder(run.run_dir):
        raise RuntimeError(f"{run.run_dir} does not look like a run folder; nothing was deleted")
    shutil.rmtree(run.run_dir)


def age(created: float, now: float | None = None) -> str:
    """`3 min ago`, `2 h ago`, `5 d ago`, or a date for older runs."""
    if not created:
        return "?"
    seconds = (time.time() if now is None else now) - created
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    if seconds < 7 * 86400:
        return f"{int(seconds // 86400)} d ago"
    return time.strftime("%Y-%m-%d", time.localtime(created))
