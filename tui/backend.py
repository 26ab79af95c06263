"""Everything the screens ask of the outside world, behind one object the app is given: a `Backend`.

`CliBackend` answers by running the headless CLI (`ft-desk ... --json`) as a child process, so the app never
imports torch and a crash in a tool cannot take the UI down. Tests hand the app a backend that returns recorded
answers instead (it implements the `Backend` Protocol; it does not subclass CliBackend), which keeps snapshots
deterministic. Every method blocks: the screens call them from thread
workers. Failures raise `CommandFailed` (message + fix), which the app shows as a notification.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from ft_desk.trainer.demo import DEMO_DATA_NAME, DEMO_MODEL_NAME
from ft_desk.tui import commands
from ft_desk.tui.chat_client import ChatClient
from ft_desk.tui.commands import CommandFailed
from ft_desk.tui.draft import Draft
from ft_desk.tui.launch import Launch, resume_training, start_training, stop_training
from ft_desk.tui.planning import NeedsChild, Planner
from ft_desk.tui.runs import RunSummary, list_runs

EventCallback = Callable[[dict[str, Any]], None]


def _recipe_args(draft: Draft) -> list[str]:
    args: list[str] = []
    for name in draft.presets():
        args += ["--preset", name]
    for item in draft.set_args():
        if not item.startswith(("model.name=", "data.train_file=")):
            args += ["--set", item]
    return args


@runtime_checkable
class Backend(Protocol):
    """What the app asks of the outside world. Every method blocks (screens call them from thread workers) and
    raises `CommandFailed` when the answer is a failure."""

    def warm_up(self) -> None:
        """Start slow one-time probes in the background (may do nothing)."""

    def list_runs(self) -> list[RunSummary]: ...

    def start_training(self, draft: Draft) -> Launch: ...

    def resume_training(self, run_dir: Path) -> Launch: ...

    def stop_training(self, pid: int, force: bool = False) -> None: ...

    def check_data(self, draft: Draft) -> dict[str, Any]: ...

    def plan(self, draft: Draft, model: str | None = None) -> dict[str, Any]: ...

    def local_models(self) -> dict[str, Any]: ...

    def search_models(self, query: str, draft: Draft) -> dict[str, Any]: ...

    def ollama_models(self, draft: Draft) -> dict[str, Any]: ...

    def model_info(self, model_id: str, draft: Draft) -> dict[str, Any]: ...

    def download_model(self, model_id: str, on_event: EventCallback, should_stop: Callable[[], bool] = ...,
                       trust_remote_code: bool = False) -> dict[str, Any]: ...

    def export(self, run_dir: Path, options: list[str], on_event: EventCallback,
               should_stop: Callable[[], bool] = ...) -> dict[str, Any]: ...

    def evaluate(self, run_dir: Path, on_event: EventCallback,
                 should_stop: Callable[[], bool] = ..., options: list[str] | None = None) -> dict[str, Any]: ...

    def open_chat(self, run_dir: Path, on_event: EventCallback,
                  on_exit: Callable[[int, CommandFailed | None], None]) -> ChatClient:
        """A started chat child for the run (`ft-desk chat RUN_DIR --events jsonl`); callbacks on its thread."""
        ...


class CliBackend:
    """The real thing: child processes of `python -m ft_desk.trainer.cli.main`."""

    def __init__(self, runs_dir: str | None = None) -> None:
        self.runs_dir = runs_dir
        self.planner = Planner(self.doctor)

    def warm_up(self) -> None:
        """Start the slow one-time probes (device facts for the memory planner) in the background."""
        self.planner.warm_up()

    # Runs (read in-process: the same light code as `ft-desk runs --json`).
    def list_runs(self) -> list[RunSummary]:
        return list_runs(self.runs_dir)

    def start_training(self, draft: Draft) -> Launch:
        return start_training(draft.cli_args(), draft.config())

    def resume_training(self, run_dir: Path) -> Launch:
        return resume_training(run_dir)

    def stop_training(self, pid: int, force: bool = False) -> None:
        stop_training(pid, force)

    # Tools with a one-shot JSON answer.
    def check_data(self, draft: Draft) -> dict[str, Any]:
        args = ["data", "check", draft.train_file or DEMO_DATA_NAME, "--model", draft.model or DEMO_MODEL_NAME]
        return commands.run_json(args + _recipe_args(draft) + ["--json"])

    def plan(self, draft: Draft, model: str | None = None) -> dict[str, Any]:
        """The run's memory plan: in-process when config.json and the device are known here, else the CLI's."""
        name = model or draft.model or DEMO_MODEL_NAME
        try:
            return self.planner.plan(draft.config_for(name))
        except NeedsChild:
            return commands.run_json(["plan", name] + _recipe_args(draft) + ["--json"])

    def doctor(self) -> dict[str, Any]:
        return commands.run_json(["doctor", "--json"])

    def local_models(self) -> dict[str, Any]:
        return commands.run_json(["models", "list", "--json"])

    def search_models(self, query: str, draft: Draft) -> dict[str, Any]:
        """Curated list first (no query), Hub results otherwise; each row with its fit for the draft's recipe."""
        args = ["models", "search"] + ([query] if query else [])
        return commands.run_json(args + _recipe_args(draft) + ["--json"], timeout=120)

    def ollama_models(self, draft: Draft) -> dict[str, Any]:
        """The models in Ollama's store (size, GGUF type, fit for the draft's recipe), from their GGUF headers."""
        return commands.run_json(["models", "ollama"] + _recipe_args(draft) + ["--json"], timeout=120)

    def model_info(self, model_id: str, draft: Draft) -> dict[str, Any]:
        return commands.run_json(["models", "info", model_id] + _recipe_args(draft) + ["--json"], timeout=120)

    # Tools that report progress as events.
    def download_model(self, model_id: str, on_event: EventCallback, should_stop: Callable[[], bool] = lambda: False,
                       trust_remote_code: bool = False) -> dict[str, Any]:
        extra = ["--trust-remote-code"] if trust_remote_code else []
        return commands.stream(["models", "download", model_id, *extra, "--json"], on_event, should_stop)

    def export(self, run_dir: Path, options: list[str], on_event: EventCallback,
               should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        return commands.stream(["export", str(run_dir), *options, "--json"], on_event, should_stop)

    def evaluate(self, run_dir: Path, on_event: EventCallback,
                 should_stop: Callable[[], bool] = lambda: False, options: list[str] | None = None) -> dict[str, Any]:
        """`ft-desk eval RUN_DIR OPTIONS --json` (options: extra flags such as ["--limit", "20"])."""
        return commands.stream(["eval", str(run_dir), *(options or []), "--json"], on_event, should_stop)

    def open_chat(self, run_dir: Path, on_event: EventCallback,
                  on_exit: Callable[[int, CommandFailed | None], None]) -> ChatClient:
        chat = ChatClient(run_dir, on_event, on_exit)
        chat.start()
        return chat
