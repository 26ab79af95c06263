"""Fixtures for the app's tests: recorded answers of the CLI, run folders built from a recorded events.jsonl, and
a backend that replays them - including a real detached child (fake_ft_desk_trainer.py) for training, so the
app's tailing, re-attaching and stopping are exercised without training a model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ft_desk.tui.app import FtDeskApp
from ft_desk.tui.commands import CommandFailed
from ft_desk.tui.draft import Draft
from ft_desk.tui.launch import Launch, launch_dir, stop_training
from ft_desk.tui.runs import RunSummary, list_runs

FIXTURES = Path(__file__).parent / "fixtures"
FAKE_TRAINER = Path(__file__).parent / "fake_ft_desk_trainer.py"
DEMO_EVENTS = FIXTURES / "demo_run.jsonl"
FIXED_NOW = 1_767_225_600.0  # 2026-01-01 00:00 UTC: "started" ages in snapshots never change


def load_fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def read_events(path: Path = DEMO_EVENTS) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_run(runs_dir: Path, name: str, events: list[dict[str, Any]] | None = None, status: str | None = None,
             created: str = "2025-12-31T22:00:00+00:00", adapter: bool = True) -> Path:
    """A run folder as the trainer leaves it, from recorded events (run_dir fields point at the new folder)."""
    events = read_events() if events is None else events
    run_dir = runs_dir / name
    run_dir.mkdir(parents=True)
    fixed = []
    for event in events:
        event = dict(event)
        if "run_dir" in event:
            event["run_dir"] = str(run_dir)
        if event.get("type") == "run_started":
            event["run_name"] = name
        fixed.append(event)
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in fixed), encoding="utf-8")
    started = next((e for e in fixed if e["type"] == "run_started"), {})
    finished = next((e for e in fixed if e["type"] == "run_finished"), {})
    steps = [e for e in fixed if e["type"] == "step"]
    evals = [e for e in fixed if e["type"] == "eval"]
    best = min(evals, key=lambda e: e["val_loss"]) if evals else None
    state = {
        "status": status or finished.get("status", "running"), "pid": 999999, "run_name": name,
        "step": steps[-1]["step"] if steps else 0, "total_steps": started.get("total_steps"),
        "best_step": best["step"] if best else None, "best_val_loss": best["val_loss"] if best else None,
        "model_name": started.get("model", "demo"), "method": started.get("method", "qlora"),
        "created": created, "updated": created, "error": finished.get("error"), "hint": finished.get("hint"),
    }
    (run_dir / "state.json").write_text(json.dumps(state), encoding="utf-8")
    if started.get("config"):
        (run_dir / "config.json").write_text(json.dumps(started["config"]), encoding="utf-8")
    if adapter:
        (run_dir / "adapter").mkdir()
    return run_dir


def spawn_fake_trainer(run_dir: Path, events: Path = DEMO_EVENTS, delay: float = 0.0, hold_after: int = 0,
                       stderr_path: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, str(FAKE_TRAINER), str(run_dir), str(events), "--delay", str(delay)]
    if hold_after:
        args += ["--hold-after", str(hold_after)]
    err = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    finally:
        if stderr_path:
            err.close()


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class FakeChat:
    """The chat child as the playground sees it: ready at once, each request answered on its own thread (as the
    real reader thread does) with one token piece and chat_done; requests are kept to check what was asked."""

    def __init__(self, run_dir: Path, on_event, on_exit, fmt: str = "chat") -> None:
        self.run_dir, self.on_event, self.on_exit = run_dir, on_event, on_exit
        self.requests: list[dict[str, Any]] = []
        self.running = True
        self._emit({"type": "chat_ready", "model": "demo", "device": "cpu", "checkpoint": "adapter",
                    "base_available": True, "format": fmt})

    def _emit(self, *events: dict[str, Any]) -> None:
        def send() -> None:
            for event in events:
                self.on_event(event)

        threading.Thread(target=send, daemon=True).start()  # never joined: call_from_thread needs the UI loop

    def ask(self, messages, base=False, max_new_tokens=256, system="", temperature=0.0, top_p=1.0) -> None:
        self.requests.append({"messages": [dict(m) for m in messages], "base": base,
                              "max_new_tokens": max_new_tokens, "system": system, "temperature": temperature,
                              "top_p": top_p})
        text = f"{'base' if base else 'tuned'} answer {len(self.requests)}"
        self._emit({"type": "chat_token", "text": text},
                   {"type": "chat_done", "text": text, "tokens": 3, "seconds": 0.1, "stopped": True})

    def close(self) -> None:
        self.running = False


class FakeBackend:
    """Answers like the CLI from recorded outputs; training replays DEMO_EVENTS through a real detached child.
    It implements the app's `Backend` Protocol; runs are listed and stopped for real (they are real folders and
    real child processes)."""

    def __init__(self, runs_dir: Path, delay: float = 0.0, hold_after: int = 0, events: Path = DEMO_EVENTS) -> None:
        self.runs_home = runs_dir
        self.delay, self.hold_after, self.events = delay, hold_after, events
        self.calls: list[tuple[str, Any]] = []
        self.processes: list[subprocess.Popen] = []
        self.eval_hold: threading.Event | None = None
        self.chat: FakeChat | None = None
        self.chat_format = "chat"  # what the fake chat child says the run trained on

    def start_training(self, draft: Draft) -> Launch:
        draft.config()  # the same validation the real backend does
        self.calls.append(("start_training", draft.cli_args()))
        run_dir = self.runs_home / f"run-{len(self.processes) + 1}"
        stderr = launch_dir() / f"{run_dir.name}.stderr.log"
        process = spawn_fake_trainer(run_dir, self.events, self.delay, self.hold_after, stderr)
        self.processes.append(process)
        return Launch(process, run_dir, stderr)

    def resume_training(self, run_dir: Path) -> Launch:
        self.calls.append(("resume_training", run_dir))
        stderr = launch_dir() / f"{run_dir.name}.resume.stderr.log"
        process = spawn_fake_trainer(run_dir, self.events, self.delay, 0, stderr)
        self.processes.append(process)
        return Launch(process, run_dir, stderr)

    def warm_up(self) -> None:
        pass  # no device probe: plans come from the recorded fixture

    def list_runs(self) -> list[RunSummary]:
        return list_runs(str(self.runs_home))

    def stop_training(self, pid: int, force: bool = False) -> None:
        stop_training(pid, force)

    def check_data(self, draft: Draft) -> dict[str, Any]:
        self.calls.append(("check_data", draft.train_file))
        if draft.train_file != "demo" and not Path(draft.train_file).exists():
            return {"ok": False, "error": f"{draft.train_file}: no such file", "where": None,
                    "hint": "check the path", "exit_code": 2}
        return load_fixture("data_check_demo.json")

    def plan(self, draft: Draft, model: str | None = None) -> dict[str, Any]:
        self.calls.append(("plan", draft.cli_args()))
        return load_fixture("plan_demo.json")

    def doctor(self) -> dict[str, Any]:
        return {"device": "cpu"}

    def local_models(self) -> dict[str, Any]:
        return {"models": []}

    ollama_answer: dict[str, Any] = {"store": "/home/user/.ollama/models", "store_exists": False, "models": [],
                                     "problems": []}

    def ollama_models(self, draft: Draft) -> dict[str, Any]:
        self.calls.append(("ollama_models", draft.cli_args()))
        return self.ollama_answer

    def search_models(self, query: str, draft: Draft) -> dict[str, Any]:
        self.calls.append(("search_models", query))
        result = load_fixture("models_search.json")
        if query:
            result["models"] = [m for m in result["models"] if query.lower() in m["id"].lower()]
        return result

    def model_info(self, model_id: str, draft: Draft) -> dict[str, Any]:
        rows = {m["id"]: m for m in load_fixture("models_search.json")["models"]}
        if model_id not in rows:
            raise CommandFailed(f"no model {model_id!r}", "check the spelling")
        return {**rows[model_id], "model_page": f"https://huggingface.co/{model_id}", "fit": load_fixture(
            "plan_demo.json")}

    def download_model(self, model_id, on_event, should_stop=lambda: False, trust_remote_code=False):
        self.calls.append(("download_model", model_id))
        total = 1000
        for done in (0, 500, 1000):
            on_event({"type": "download_progress", "bytes_done": done, "bytes_total": total,
                      "rate_bytes_per_s": 100.0, "eta_s": (total - done) / 100})
        return {"repo_id": model_id, "path": "/nowhere", "already_cached": False}

    def export(self, run_dir, options, on_event, should_stop=lambda: False):
        self.calls.append(("export", options))
        return self._replay("export_events.jsonl", on_event)

    def evaluate(self, run_dir, on_event, should_stop=lambda: False, options=None):
        self.calls.append(("evaluate", run_dir))
        self.calls.append(("evaluate_options", list(options or [])))
        if self.eval_hold is not None:  # a long evaluation: stays "loading" until cancelled (or released)
            on_event({"type": "eval_progress", "phase": "load", "model": "both", "done": 0, "total": 1,
                      "elapsed_s": 0.0})
            while not should_stop() and not self.eval_hold.is_set():
                time.sleep(0.02)
            if should_stop():
                raise CommandFailed("the command exited with code -15", exit_code=-15)
        return self._replay("eval_events.jsonl", on_event)

    def open_chat(self, run_dir, on_event, on_exit):
        self.calls.append(("open_chat", run_dir))
        self.chat = FakeChat(run_dir, on_event, on_exit, self.chat_format)
        return self.chat

    @staticmethod
    def _replay(fixture: str, on_event) -> dict[str, Any]:
        """A recorded tool run, event by event; the last event is the result, as commands.stream returns it."""
        result: dict[str, Any] = {}
        for event in read_events(FIXTURES / fixture):
            on_event(event)
            result = event
        return result

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Pilot tests run on asyncio (anyio's pytest plugin drives the async tests)


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    folder = tmp_path / "runs"
    folder.mkdir()
    return folder


@pytest.fixture
def backend(runs_dir):
    fake = FakeBackend(runs_dir)
    yield fake
    fake.close()


@pytest.fixture
def make_app(backend, tmp_path):
    """Builds the app the way tests need it: fake backend, fixed clock, settings in tmp."""

    def factory(**kwargs) -> FtDeskApp:
        kwargs.setdefault("backend", backend)
        kwargs.setdefault("clock", lambda: FIXED_NOW)
        kwargs.setdefault("settings", tmp_path / "settings.json")
        return FtDeskApp(**kwargs)

    return factory


@pytest.fixture
def snapshot_home():
    """A fixed runs folder path, so paths printed on screen are the same on every run of the snapshots."""
    folder = Path("/tmp/ft-desk-tui-snapshots")
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "runs").mkdir(parents=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
