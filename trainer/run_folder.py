"""The run folder (RUN_DIR): its layout, its state.json, its checkpoints, and how alive a run is. Stdlib only, so
the TUI reads runs with exactly the trainer's rules.

One folder per run, under paths.runs_home():
  config.json                  the fully resolved RunConfig, written before step 0
  state.json                   status (running|completed|stopped|failed), pid, progress, best checkpoint, device;
                               rewritten atomically and fsynced (atomic.py), so a reader never sees half of it
  events.jsonl                 every event (events.py), appended and flushed line by line
  run.log                      diagnostics and tracebacks
  data/val.jsonl               the validation examples (for eval and export verification)
  checkpoints/step-NNNNNN/     resumable checkpoints (training/checkpoint.py); six digits, so names sort by step
  adapter/                     the final weights (the best checkpoint) in peft format, with the tokenizer
  model/                       the same for a full fine-tune (model.safetensors instead of an adapter)
  eval/                        evaluation reports (evaluate/)
  .space-reserve               1 MiB held while the trainer runs and given up when the disk fills, so the final
                               state.json write (failed, with the reason) still fits; removed when the run ends

Status as users see it is `judged_status`: a state that says "running" whose process is gone (killed, machine
rebooted) is "crashed", and can be resumed from its last checkpoint. These names are on users' disks: never
rename one.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ft_desk.trainer import limits
from ft_desk.trainer.atomic import write_json
from ft_desk.trainer.errors import UserError, is_disk_full
from ft_desk.trainer.paths import runs_home
from ft_desk.trainer.redaction import redact_data

CONFIG = "config.json"
STATE = "state.json"
EVENTS = "events.jsonl"
LOG = "run.log"
DATA = "data"
VAL = "val.jsonl"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
MODEL = "model"
EVAL = "eval"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = "model.safetensors"
RESERVE = ".space-reserve"
# Note: room kept for the last state.json (about 1 KB) and the final event and log lines of a run on a full disk.
RESERVE_BYTES = 1 << 20

RUNNING = "running"
CRASHED = "crashed"
RESUMABLE = ("stopped", "failed", CRASHED)

_STEP = re.compile(r"step-(\d+)")


# ------------------------------------------------------------------ layout

def config_path(run_dir: Path) -> Path:
    return Path(run_dir) / CONFIG


def state_path(run_dir: Path) -> Path:
    return Path(run_dir) / STATE


def events_path(run_dir: Path) -> Path:
    return Path(run_dir) / EVENTS


def log_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOG


def val_path(run_dir: Path) -> Path:
    return Path(run_dir) / DATA / VAL


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def eval_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EVAL


def final_weights_dir(run_dir: Path, method: str) -> Path:
    """adapter/ for LoRA methods, model/ for a full fine-tune."""
    return Path(run_dir) / (MODEL if method == "full" else ADAPTER)


def final_weight_dirs(run_dir: Path) -> tuple[Path, Path]:
    return Path(run_dir) / ADAPTER, Path(run_dir) / MODEL


def is_run_folder(run_dir: Path) -> bool:
    return state_path(run_dir).is_file()


def resolve_run(given: str | Path, home: Path | None = None) -> Path:
    """The run folder a command was given: a path to one, or a run's name (as `ft-desk runs` lists it) under the
    runs folder. Raises a UserError naming both places looked at when neither is a run."""
    path = Path(given).expanduser()
    if (path / CONFIG).is_file():
        return path
    text = str(given)
    home = home if home is not None else runs_home()
    if "/" not in text and text not in ("", ".", ".."):
        named = home / text
        if (named / CONFIG).is_file():
            return named
    hint = "list runs with: ft-desk runs (a run is named by its folder or its name)"
    if path.is_dir():
        raise UserError(f"{path} is not an ft-desk run folder (no {CONFIG})", hint=hint)
    raise UserError(f"no run folder or run named {text!r} (looked in the current folder and {home})", hint=hint)


# ------------------------------------------------------------------ creating one

def slug(text: str) -> str:
    """The last part of a model name, safe in a folder name: `Qwen/Qwen2.5-0.5B` -> `qwen2.5-0.5b`,
    `~/m/SmolLM2.Q4_1.gguf` -> `smollm2.q4_1`, `smollm2:135m` -> `smollm2-135m`."""
    base = re.sub(r"\.gguf$", "", text.rstrip("/").split("/")[-1], flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-").lower()[:40] or "model"


def default_run_name(model_name: str, method: str, now: datetime | None = None) -> str:
    return f"{(now or datetime.now()):%Y%m%d-%H%M%S}-{slug(model_name)}-{method}"


def check_run_name(name: str) -> str:
    """A run name is a plain folder name (limits.check_plain_name): a run never lands outside its runs folder."""
    return limits.check_run_name(name)


def unused_run_dir(home: Path, name: str) -> Path:
    """home/NAME, or NAME-2, NAME-3... when that exists: a run never lands in another run's folder."""
    path, n = Path(home) / name, 1
    while path.exists():
        n += 1
        path = Path(home) / f"{name}-{n}"
    return path


def create_run_dir(home: Path, name: str) -> Path:
    """Make a new, empty run folder named after `name` (see unused_run_dir)."""
    check_run_name(name)
    limits.ensure_folder(Path(home), "the runs folder", "output.runs_dir (or FT_DESK_HOME)")
    while True:
        path = unused_run_dir(home, name)
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another run took the name in between
            continue
        except OSError as exc:
            raise limits.folder_problem(exc, Path(home), "the runs folder",
                                        "output.runs_dir (or FT_DESK_HOME)") from None


# ------------------------------------------------------------------ state.json

def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_state(run_dir: Path) -> dict[str, Any]:
    """The run's state, or {} when the folder has none (not a run, or not started yet)."""
    try:
        state = json.loads(state_path(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Write state.json atomically; token-shaped strings (a token pasted as a model name) are masked."""
    write_json(state_path(run_dir), redact_data(state), indent=1, default=str)


def update_state(run_dir: Path, **changes: Any) -> dict[str, Any]:
    """Merge `changes` into state.json (stamping `updated`) and return the new state."""
    state = read_state(run_dir)
    state.update(changes, updated=now_iso())
    write_state(run_dir, state)
    return state


# ------------------------------------------------------------------ one writer at a time

LOCK = ".lock"


def lock_run(run_dir: Path):
    """Hold RUN_DIR/.lock for as long as this process writes the run (train, resume); a second writer is refused
    with a UserError instead of both writing one folder. The operating system drops the lock when the process
    dies, SIGKILL included, so a crashed run is never locked. Returns the lock; call `.release()` when done."""
    from filelock import FileLock, Timeout  # a dependency already (hub/download.py); flock/msvcrt underneath

    lock = FileLock(str(Path(run_dir) / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"another ft-desk process is writing to {run_dir} right now",
                        hint="wait for it to finish, or stop it first (attach to it in the app)") from None
    except OSError as exc:
        raise limits.folder_problem(exc, Path(run_dir), "a run folder", "output.runs_dir") from None
    return lock


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock (is training or resuming it)."""
    from filelock import FileLock, Timeout

    path = Path(run_dir) / LOCK
    if not path.exists():
        return False
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:
        return False
    lock.release()
    return False


def reserve_space(run_dir: Path) -> None:
    """Hold RESERVE_BYTES of real disk blocks in the run folder (best effort: a disk already full holds none)."""
    path = Path(run_dir) / RESERVE
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * RESERVE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        path.unlink(missing_ok=True)


def release_space(run_dir: Path) -> bool:
    """Give the reserve back to the file system; whether there was one."""
    try:
        (Path(run_dir) / RESERVE).unlink()
    except OSError:
        return False
    return True


def settle_state(run_dir: Path, **changes: Any) -> bool:
    """The last state.json write of a process, which must not fail: merged and written atomically; on a full disk
    the space reserve is given up and the write tried again, and as a last resort state.json is rewritten in place
    when the new text fits in the old file's blocks. Returns whether the state was recorded; never raises."""
    state = read_state(run_dir)
    state.update(changes, updated=now_iso())
    try:
        write_state(run_dir, state)
        return True
    except OSError as exc:
        if not is_disk_full(exc):
            logging.getLogger("ft_desk").error("cannot write %s: %s", state_path(run_dir), exc)
            return False
    if release_space(run_dir):
        try:
            write_state(run_dir, state)
            return True
        except OSError:
            pass
    return _rewrite_in_place(state_path(run_dir), json.dumps(state, indent=1, default=str))


def _rewrite_in_place(path: Path, text: str) -> bool:
    """Overwrite the file's existing bytes (padded with spaces, which JSON ignores): no new block is needed."""
    data = text.encode("utf-8")
    try:
        old = path.stat().st_size
        if len(data) > old:
            data = json.dumps(json.loads(text), separators=(",", ":")).encode("utf-8")
        if len(data) > old:
            return False
        with open(path, "r+b") as f:
            f.write(data + b" " * (old - len(data)))
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError as exc:
        logging.getLogger("ft_desk").error("cannot write %s even in place: %s", path, exc)
        return False


# ------------------------------------------------------------------ liveness and status

def pid_alive(pid: Any) -> bool:
    """Whether `pid` is a live (not zombie) ft-desk process: a stale state.json may name a reused pid."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    except OSError:
        return False
    try:
        import psutil  # optional: tells a zombie or an unrelated process from our trainer

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        command = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - psutil missing, the process went away meanwhile, or its details are hidden
        return True
    return "ft_desk" in command or "ft-desk" in command


def judged_status(state: dict[str, Any], run_dir: Path | None = None) -> str:
    """The status to show and act on: "running" only while its process lives, else "crashed". With `run_dir`,
    the run's lock is asked too: a trainer holds it while it writes, and the kernel drops it the moment the
    process dies (SIGKILL included, even while the dead process waits to be reaped), so a lock nobody holds
    means crashed whatever the pid says. Every reader (runs, resume, eval, export, the app) judges this way."""
    status = str(state.get("status") or "unknown")
    if status != RUNNING:
        return status
    if not pid_alive(state.get("pid")):
        return CRASHED  # the process is gone without saying goodbye
    if run_dir is not None and (Path(run_dir) / LOCK).exists() and not is_locked(run_dir):
        return CRASHED  # the pid is alive but it is not our trainer any more (reused, or a zombie)
    return status


def is_live(run_dir: Path) -> bool:
    """The run's trainer is training right now."""
    return judged_status(read_state(run_dir), run_dir) == RUNNING


# ------------------------------------------------------------------ checkpoints

def step_folder(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{int(step):06d}"


def step_of(folder: Path) -> int | None:
    """The step of a checkpoint folder, None for anything else (adapter/, model/)."""
    match = _STEP.fullmatch(Path(folder).name)
    return int(match.group(1)) if match else None


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first (staging folders are hidden and never listed)."""
    return sorted(checkpoints_dir(run_dir).glob("step-*"))


def has_weights(run_dir: Path) -> bool:
    """Something worth evaluating or exporting: final weights or a checkpoint."""
    return any(d.is_dir() for d in final_weight_dirs(run_dir)) or bool(checkpoint_folders(run_dir))


def checkpoint_folder(run_dir: Path, checkpoint: str | int = "best") -> Path:
    """Folder of a run's checkpoint: "best" (the final weights, else the best step, else the last), "last", or a
    step number. A missing one is a UserError that lists what there is."""
    run_dir = Path(run_dir)
    if not is_run_folder(run_dir):
        raise UserError(f"{run_dir} is not an ft-desk run folder (no {STATE})", hint="list runs with: ft-desk runs")
    state = read_state(run_dir)
    folders = checkpoint_folders(run_dir)
    if checkpoint == "best":
        for final in final_weight_dirs(run_dir):
            if (final / ADAPTER_WEIGHTS).is_file() or (final / FULL_WEIGHTS).is_file():
                return final
        if state.get("best_step") is not None:
            candidate = step_folder(run_dir, state["best_step"])
            if candidate.is_dir():
                return candidate
        checkpoint = "last"
    if checkpoint == "last":
        if not folders:
            raise UserError(f"{run_dir} has no checkpoint yet",
                            hint="train longer, or resume it: ft-desk train --resume")
        return folders[-1]
    try:
        step = int(checkpoint)
    except (TypeError, ValueError):
        raise UserError(f"--checkpoint must be best, last or a step number, got {checkpoint!r}",
                        hint="e.g. --checkpoint last; the steps saved are the checkpoints/step-N folders") from None
    folder = step_folder(run_dir, step)
    if not folder.is_dir():
        have = ", ".join(str(step_of(p)) for p in folders) or "none"
        raise UserError(f"{run_dir} has no checkpoint at step {step}; available: {have}",
                        hint="pass one of those steps, or --checkpoint best / last")
    return folder


def weights_step(run_dir: Path, folder: Path, state: dict[str, Any] | None = None) -> int | None:
    """The training step whose weights `folder` holds. The final weights are the best checkpoint's when that
    checkpoint was kept, else the last step's."""
    step = step_of(folder)
    if step is not None:
        return step
    state = read_state(run_dir) if state is None else state
    best = state.get("best_step")
    kept = best is not None and (best == state.get("step") or step_folder(run_dir, best).is_dir())
    return best if kept else state.get("step")


# ------------------------------------------------------------------ listing

def list_runs(home: Path) -> list[dict[str, Any]]:
    """Every run folder under `home`, newest first, as the rows of `ft-desk runs --json` (status judged)."""
    home = Path(home)
    out: list[dict[str, Any]] = []
    if not home.is_dir():
        return out
    for folder in home.iterdir():
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        state = read_state(folder)
        if not state:
            continue
        out.append({
            "run_dir": str(folder), "run_name": folder.name, "status": judged_status(state, folder),
            "model_name": state.get("model_name"), "method": state.get("method"),
            "best_val_loss": state.get("best_val_loss"), "best_step": state.get("best_step"),
            "step": state.get("step"), "total_steps": state.get("total_steps"),
            "created": state.get("created"), "updated": state.get("updated"), "error": state.get("error"),
        })
    out.sort(key=lambda r: r.get("created") or "", reverse=True)
    return out
