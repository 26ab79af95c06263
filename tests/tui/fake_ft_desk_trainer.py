"""A stand-in for `ft-desk train` that replays a recorded events.jsonl into a run folder, at a chosen pace.

It behaves like the real trainer where the app can tell: state.json with its pid (its file name contains
"ft_desk", so the pid check that guards against reused pids accepts it), events appended line by line, SIGINT
finishing with a "stopped" run_finished and exit code 3, SIGHUP ignored; otherwise it ends the way the recording
ended (completed, or failed with its error and hint). `--hold-after N` pauses after the N-th
step event until it is signalled, so tests can look at a run that is still live.

    python fake_ft_desk_trainer.py RUN_DIR EVENTS.jsonl [--delay S] [--hold-after N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def write_state(run_dir: Path, **fields) -> None:
    path = run_dir / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    state.update(fields)
    tmp = run_dir / ".state.json.tmp"
    tmp.write_text(json.dumps(state), encoding="utf-8")
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("events", type=Path)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--hold-after", type=int, default=0, help="steps to replay before waiting for a signal")
    args = parser.parse_args()
    stop = {"requested": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(requested=True))
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    run_dir = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    events = [json.loads(line) for line in args.events.read_text(encoding="utf-8").splitlines() if line.strip()]
    write_state(run_dir, status="running", pid=os.getpid(), step=0, total_steps=None, run_name=run_dir.name,
                model_name="demo", method="qlora", created="2026-01-01T00:00:00+00:00")
    step = 0
    recorded_end = None
    with open(run_dir / "events.jsonl", "a", encoding="utf-8") as out:
        for event in events:
            if event.get("type") == "run_finished":
                recorded_end = event
                break
            if "run_dir" in event:
                event["run_dir"] = str(run_dir)
            if event.get("type") == "run_started":
                event["run_name"] = run_dir.name
            out.write(json.dumps(event) + "\n")
            out.flush()
            if event.get("type") == "step":
                step = event["step"]
            if event.get("type") in ("run_started", "step"):
                write_state(run_dir, step=step, total_steps=event.get("total_steps") or None)
            while args.hold_after and step >= args.hold_after and not stop["requested"]:
                time.sleep(0.05)
            if stop["requested"]:
                break
            time.sleep(args.delay)
        if stop["requested"] or recorded_end is None:
            status, code = ("stopped", 3) if stop["requested"] else ("completed", 0)
            finished = {"v": 1, "type": "run_finished", "time": time.time(), "status": status, "exit_code": code,
                        "error": None, "hint": None, "best_val_loss": None, "best_step": None, "final_step": step,
                        "adapter_path": None, "run_dir": str(run_dir), "elapsed_s": 1.0}
        else:  # the recorded ending (completed, stopped or failed with its error and hint)
            finished = {**recorded_end, "run_dir": str(run_dir), "final_step": step}
            status, code = finished.get("status", "completed"), int(finished.get("exit_code") or 0)
        out.write(json.dumps(finished) + "\n")
    write_state(run_dir, status=status, exit_code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
