"""Running the headless CLI as child processes: the only way the app does anything heavy.

`ft-desk <command> ... --json` prints one JSON object on stdout; tools with progress (download, export, eval,
chat) print events as JSON lines first. A failed command says so as data: a one-object command prints
`{"ok": false, "error", "hint", "exit_code"}`, an event stream ends with a final event carrying error and hint
(see ft_desk.trainer.events). That becomes a `CommandFailed` with the message and hint kept apart, so the app
can show them as a readable notification. stderr (`ft-desk: <message>` / `  fix: <hint>`) is read only when a
command printed no answer at all (argparse's usage errors, a crash). These functions block: call them from
thread workers, never the UI thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable

from ft_desk.trainer.events import parse_line


def cli_argv(*args: str) -> list[str]:
    """The command line of the headless CLI with this interpreter (works without `ft-desk` on PATH)."""
    return [sys.executable, "-m", "ft_desk.trainer.cli.main", *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@dataclass
class CommandFailed(Exception):
    """A CLI command exited non-zero. `message` and `hint` are what it printed for the user."""

    message: str
    hint: str = ""
    exit_code: int = 1
    stderr: str = ""

    def __str__(self) -> str:
        return self.message


# The keys of the failure object a one-object --json command prints instead of its answer (cli/main.py).
FAILURE_KEYS = frozenset({"ok", "error", "hint", "where", "exit_code"})


def failure_of(data: dict[str, Any], exit_code: int, stderr: str = "") -> CommandFailed | None:
    """The failure a command reported as data - a failure object, or a final event with an error - else None."""
    if not data.get("error"):
        return None
    is_failure_object = data.get("ok") is False and set(data) <= FAILURE_KEYS
    is_failure_event = "type" in data and data.get("status") != "completed"
    if not (is_failure_object or is_failure_event):
        return None
    return CommandFailed(str(data["error"]), str(data.get("hint") or ""), int(data.get("exit_code") or exit_code),
                         stderr)


def parse_failure(stderr: str, exit_code: int) -> CommandFailed:
    """Split the CLI's `ft-desk: message` / `  fix: hint` lines out of stderr (anything else is context); only for
    a command that printed no answer (a usage error, a crash)."""
    message, hint = "", ""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("ft-desk: "):
            message = line[len("ft-desk: "):]
            rest = lines[i + 1:]
            if rest and rest[0].strip().startswith("fix:"):
                hint = rest[0].strip()[len("fix:"):].strip()
    if not message:
        tail = [line for line in lines if not line.startswith(" ")] or lines
        message = tail[-1] if tail else f"the command exited with code {exit_code}"
        if message.startswith("usage:") or "error:" in message:
            message = message.split("error:", 1)[-1].strip()
    return CommandFailed(message, hint, exit_code, stderr)


def run_json(args: list[str], timeout: float = 600.0) -> dict[str, Any]:
    """Run `ft-desk ARGS` (ARGS should include --json) and return its JSON object. A command that exits non-zero
    but still printed its JSON answer (a data check that found broken rows) returns it, with `exit_code` added."""
    proc = subprocess.run(cli_argv(*args), capture_output=True, text=True, timeout=timeout, env=child_env(),
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        try:
            answer = last_object(proc.stdout)
        except CommandFailed:
            raise parse_failure(proc.stderr, proc.returncode) from None
        failure = failure_of(answer, proc.returncode, proc.stderr)
        if failure is not None:
            raise failure
        return {**answer, "exit_code": proc.returncode}
    return last_object(proc.stdout)


def last_object(stdout: str) -> dict[str, Any]:
    """The result object of a --json command: the whole stdout, or its last JSON line that is not an event."""
    text = stdout.strip()
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            return data
    except json.JSONDecodeError:
        pass
    for line in reversed(text.splitlines()):
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            return data
    raise CommandFailed("the command printed no JSON result", exit_code=0, stderr=stdout[-2000:])


def stream(args: list[str], on_event: Callable[[dict[str, Any]], None],
           should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Run a command that prints JSON-lines events, calling `on_event` for each; returns the final result
    (the last object without a "type", or the last event). `should_stop` returning True interrupts the child."""
    proc = subprocess.Popen(cli_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), stdin=subprocess.DEVNULL, bufsize=1)
    result: dict[str, Any] = {}
    stderr_chunks: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    finished = threading.Event()
    # A child loading a model prints nothing for minutes: a cancel (or the app closing) must not wait for its
    # next line, so a watcher asks it to stop within a fraction of a second and kills it if it does not.
    watcher = threading.Thread(target=_stop_when_asked, args=(proc, should_stop, finished), daemon=True)
    watcher.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        if should_stop():
            _end(proc)
            break
        event = parse_line(line)
        if event is not None:
            on_event(event)
            result = event
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            result = data
    code = proc.wait()
    finished.set()
    reader.join(timeout=5)
    if code != 0:
        if str(result.get("type", "")).endswith("_finished"):
            # The tool reported its own outcome (an export that failed verification, an eval that failed
            # with error and hint): that is the answer, not a crash.
            return {**result, "exit_code": code}
        failure = failure_of(result, code, "".join(stderr_chunks))
        if failure is not None:
            raise failure  # download_failed, command_failed: error and hint as the command reported them
        raise parse_failure("".join(stderr_chunks), code)
    return result


STOP_POLL_S = 0.2
KILL_AFTER_S = 3.0


def _end(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL when the child has not gone after KILL_AFTER_S."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=KILL_AFTER_S)
    except subprocess.TimeoutExpired:
        proc.kill()


def _stop_when_asked(proc: subprocess.Popen, should_stop: Callable[[], bool], finished) -> None:
    while not finished.wait(STOP_POLL_S):
        if proc.poll() is not None:
            return
        if should_stop():
            _end(proc)
            return
