"""The chat playground's child process: `ft-desk chat RUN_DIR --events jsonl`.

The child loads the run's model once (the adapter on the base, as trained) and then reads one JSON request per
line on stdin - {"messages": [...], "base": bool, "max_new_tokens": int, "system": str, "temperature": float,
"top_p": float} - answering each with chat_token events
(streamed text) and one chat_done (or chat_error). It is tied to the app: closing stdin ends it, and the app
ends it when it closes or switches runs. Callbacks run on the reader thread. When the child ends with an error,
`on_exit` gets it as a `CommandFailed` built from the child's last failure event (a fatal chat_error, or
command_failed), or from its stderr when it printed none (a crash), or None when there is nothing to say.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable

from ft_desk.trainer.events import parse_line
from ft_desk.tui.commands import CommandFailed, child_env, cli_argv, failure_of, parse_failure
from ft_desk.tui.launch import launch_dir


class ChatClient:
    def __init__(self, run_dir: Path, on_event: Callable[[dict[str, Any]], None],
                 on_exit: Callable[[int, CommandFailed | None], None]) -> None:
        self.run_dir = run_dir
        self.on_event = on_event
        self.on_exit = on_exit
        self.process: subprocess.Popen | None = None
        self.stderr_path = launch_dir() / f"chat-{run_dir.name}.stderr.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        with open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                cli_argv("chat", str(self.run_dir), "--events", "jsonl"), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, env=child_env(), text=True, bufsize=1,
            )
        threading.Thread(target=self._read, name="chat-reader", daemon=True).start()

    def _read(self) -> None:
        process = self.process
        assert process is not None and process.stdout is not None
        last_failure: dict[str, Any] | None = None
        for line in process.stdout:
            event = parse_line(line)
            if event is not None:
                if event.get("fatal") or event.get("type") == "command_failed":
                    last_failure = event
                self.on_event(event)
        code = process.wait()
        try:
            tail = "\n".join(self.stderr_path.read_text(encoding="utf-8", errors="replace").splitlines()[-20:])
        except OSError:
            tail = ""
        failure = None
        if code != 0 and last_failure is not None:
            failure = failure_of(last_failure, code, tail)
        if code != 0 and failure is None and "ft-desk: " in tail:
            failure = parse_failure(tail, code)  # it died before it could say why as an event
        self.on_exit(code, failure)

    def ask(self, messages: list[dict[str, str]], base: bool = False, max_new_tokens: int = 256,
            system: str = "", temperature: float = 0.0, top_p: float = 1.0) -> None:
        """Send one request; temperature 0 answers greedily, above 0 samples (with top_p)."""
        if not self.running:
            raise RuntimeError("the chat process is not running")
        assert self.process is not None and self.process.stdin is not None
        request = {"messages": messages, "base": base, "max_new_tokens": max_new_tokens, "system": system,
                   "temperature": temperature, "top_p": top_p}
        self.process.stdin.write(json.dumps(request, ensure_ascii=False) + "\n")
        self.process.stdin.flush()

    def close(self) -> None:
        process = self.process
        if process is None:
            return
        try:
            if process.stdin is not None:
                process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.terminate()
