"""The ft-desk terminal app: a keyboard-first desk over the headless CLI.

The app holds three things: the `Draft` being assembled on the wizard screens, the `RunSession` it follows (one
detached trainer process, watched through RUN_DIR/events.jsonl), and a backend that runs the other CLI commands.
Screens are Textual modes (one per step, kept alive while switching) and only render that state.
It never imports torch, transformers, bitsandbytes or peft: training, planning and checking happen in child
processes, so an out-of-memory crash or a dropped SSH connection cannot take a run down with the UI.
"""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.signal import Signal
from textual.worker import Worker, WorkerState

from ft_desk.trainer import run_folder
from ft_desk.trainer.atomic import write_json
from ft_desk.trainer.config import ConfigError
from ft_desk.trainer.events import EXIT_FAILED
from ft_desk.trainer.paths import data_home
from ft_desk.tui.backend import Backend, CliBackend
from ft_desk.tui.commands import CommandFailed, failure_of, parse_failure
from ft_desk.tui.draft import Draft, demo_draft
from ft_desk.tui.runs import RunSummary
from ft_desk.tui.screens.home import HomeScreen
from ft_desk.tui.session import RunEnded, RunEvents, RunSession, RunUpdated
from ft_desk.tui.watch import RunWatcher
from ft_desk.tui.widgets.dialogs import CommandDialog, Confirm, LogViewer
from ft_desk.tui.widgets.help import HelpScreen, screen_bindings
from ft_desk.tui.widgets.sidebar import STEPS, StepList

DARK, LIGHT = "textual-dark", "textual-light"


def _lazy(module: str, name: str) -> Callable[[], Screen]:
    """A mode whose screen module is imported when the mode is first shown (keeps start-up to Home's imports)."""

    def make() -> Screen:
        import importlib

        return getattr(importlib.import_module(f"ft_desk.tui.screens.{module}"), name)()

    return make


def settings_path() -> Path:
    return data_home() / "tui-settings.json"


class FtDeskApp(App):
    TITLE = "ft-desk"
    CSS_PATH = ["app.tcss", "screens.tcss"]
    # Screens get -narrow below 90 columns, -medium below 110 and -short below 28 rows (screens.tcss lays 80x24
    # and 100x30 out with them).
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (90, "-medium"), (110, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (28, "-tall")]
    DEFAULT_MODE = "home"  # the first frame is Home itself, not an empty default screen switched away from
    MODES = {
        "home": HomeScreen, "model": _lazy("model", "ModelScreen"), "data": _lazy("data", "DataScreen"),
        "recipe": _lazy("recipe", "RecipeScreen"), "train": _lazy("train", "TrainScreen"),
        "evaluate": _lazy("evaluate", "EvaluateScreen"), "export": _lazy("export", "ExportScreen"),
    }
    BINDINGS = [
        *(Binding(key, f"goto('{mode}')", label, show=False) for mode, label, key in STEPS),
        Binding("ctrl+t", "toggle_theme", "Light/dark", show=False),
        Binding("question_mark", "help", "Help", key_display="?", show=False),  # Home's text says "? help"
        Binding("f1", "help", "Help", show=False),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, backend: Backend | None = None, clock: Callable[[], float] = time.time,
                 start_mode: str | None = None, settings: Path | None = None, reattach: bool = True) -> None:
        super().__init__()
        self.backend = backend or CliBackend()
        self.clock = clock
        self.start_mode = start_mode
        self.settings_file = settings if settings is not None else settings_path()
        self.reattach = reattach
        # Where the user left the wizard last time, if anything.
        self.draft = Draft.from_saved(self._load_settings().get("draft")) or Draft()
        self.session: RunSession | None = None
        self.data_report: dict | None = None
        """The Data step's last lint report (`ft-desk data check --json`); the Recipe step sizes batches from it."""
        self.runs: list[RunSummary] = []
        self.offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        self.offline_reason = "(HF_HUB_OFFLINE)" if self.offline else ""
        self.draft_changed: Signal[Draft] = Signal(self, "draft-changed")
        # What the Data check found wrong with a file ((train_file, error)), so `t` does not start a run on it;
        # and the last memory plan's (Draft.plan_key(), verdict), so the Recipe step is not ticked when it does
        # not fit. Both are this session's findings, not saved.
        self.data_problem: tuple[str, str] | None = None
        self.plan_verdict: tuple[tuple, str] | None = None

    # Start-up and settings.
    def on_mount(self) -> None:
        theme = self._load_settings().get("theme")
        if theme in (DARK, LIGHT):
            self.theme = theme
        if self.start_mode and self.start_mode != self.current_mode:
            self.switch_mode(self.start_mode)
        self.load_runs(startup=self.reattach and self.start_mode is None)
        self.set_timer(1.0, self.backend.warm_up)  # after the first frame: the device probe is a child process

    def on_unmount(self) -> None:
        if self.session is not None:
            self.session.stop_watching()
        evaluate = self._screen_of("evaluate") if self._screen_stacks else None
        if evaluate is not None:
            evaluate.stop_children()  # an evaluation's child ends now: quitting never waits minutes for it

    def _load_settings(self) -> dict[str, Any]:
        try:
            data = json.loads(self.settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_settings(self, **changes: Any) -> None:
        data = {**self._load_settings(), **changes}
        try:
            self.settings_file.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.settings_file, data)  # never a half-written settings file
        except OSError:
            pass  # settings are a convenience; a read-only home must not break the app

    # Navigation.
    def action_goto(self, mode: str) -> None:
        if self.current_mode != mode:
            self.switch_mode(mode)

    def on_option_list_option_selected(self, event: StepList.OptionSelected) -> None:
        if isinstance(event.option_list, StepList) and event.option.id:
            self.action_goto(event.option.id)

    def action_toggle_theme(self) -> None:
        self.theme = LIGHT if self.current_theme.dark else DARK
        self._save_settings(theme=self.theme)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Every step, every app action and every binding of the current screen, in the command palette."""
        yield from super().get_system_commands(screen)
        for mode, label, key in STEPS:
            yield SystemCommand(f"Go to {label}", f"Switch to the {label} screen (key {key})",
                                partial(self.action_goto, mode))
        yield SystemCommand("Light / dark theme", "Toggle between the light and the dark theme (ctrl+t)",
                            self.action_toggle_theme)
        yield SystemCommand("Start the demo run", "Train the tiny local demo model on the bundled data, offline",
                            self.action_start_demo)
        yield SystemCommand("New run", "Start a new run from the Model step", self.action_new_run)
        yield SystemCommand("Show the command", "The ft-desk train command line equivalent to this wizard's run "
                            "(key c on Recipe and Train)", self.action_show_command)
        if self.session is not None:
            yield SystemCommand("Show the full log", f"run.log of {self.session.name}", self.action_show_log)
            if self.session.live:
                yield SystemCommand("Stop training", "Finish the current step, save a checkpoint, stop",
                                    self.action_stop_run)
        yield SystemCommand("Help: keys and commands", "Every key of every screen and the shell command behind "
                            "it (? or f1)", self.action_help)
        yield from self.screen_commands(screen)

    def screen_commands(self, current: Screen) -> Iterable[SystemCommand]:
        """Every described binding of every desk screen, named after its screen: one on the current screen runs
        there, one of another screen switches to it first."""
        current_mode = getattr(current, "MODE", None)
        skip = {"quit", "command_palette", "leave_field"}
        for mode, label, key in STEPS:
            for shown, description, action in screen_bindings(mode):
                if action in skip:
                    continue
                where = "this screen" if mode == current_mode else f"the {label} screen, key {key}"
                yield SystemCommand(f"{label}: {description}", f"Key {shown} on {where}",
                                    partial(self.run_screen_action, mode, action))

    def run_screen_action(self, mode: str, action: str) -> None:
        """Run a screen's action from the palette, switching to that screen first."""
        if self.current_mode != mode:
            self.switch_mode(mode)
        self.call_after_refresh(lambda: self.run_action(action, self.screen))

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(getattr(self.screen, "MODE", None) or self.current_mode))

    # The draft.
    def draft_updated(self) -> None:
        self.save_draft()
        self.draft_changed.publish(self.draft)

    def save_draft(self) -> None:
        """Keep the wizard's choices for the next start of the app."""
        self._save_settings(draft=self.draft.to_dict())

    def action_new_run(self) -> None:
        keep = self.draft
        self.draft = Draft(model=keep.model, train_file=keep.train_file, strategy=keep.strategy,
                           hardware=keep.hardware, overrides=dict(keep.overrides), data_checked=keep.data_checked)
        self.draft_updated()
        self.switch_mode("model")

    # Runs: listing, following, starting, stopping.
    @work(thread=True, exclusive=True, group="runs", exit_on_error=False)
    def load_runs(self, startup: bool = False) -> None:
        runs = self.backend.list_runs()
        self.call_from_thread(self._runs_loaded, runs, startup)

    def _runs_loaded(self, runs: list[RunSummary], startup: bool) -> None:
        self.runs = runs
        home = self._screen_of("home")
        if home is not None:
            home.show_runs(runs)
        if startup:
            live = [r for r in runs if r.live]
            if live and self.session is None:
                run = live[0]
                self.follow(run.run_dir)
                self.switch_mode("train")
                self.notify(f"Re-attached to {run.run_name}: it kept training while ft-desk was closed "
                            f"(step {run.step}/{run.total_steps or '?'}).", title="Run re-attached")
            elif self.session is None:
                # Nothing is training: open the run the user was last looking at, so Evaluate and Export
                # carry on from where they left off.
                last = self._load_settings().get("followed_run")
                if any(str(r.run_dir) == last for r in runs):
                    self.follow(Path(last))

    def _screen_of(self, mode: str):
        screen = self._screen_stacks.get(mode)
        return screen[-1] if screen else None

    def follow(self, run_dir: Path, launch=None) -> RunSession:
        """Watch `run_dir` (replaying its history first); the previous run keeps training, unwatched."""
        current = self.session
        if current is not None and current.run_dir == run_dir and launch is None and not current.ended:
            return current
        if current is not None:
            current.stop_watching()
        session = RunSession(run_dir, launch)

        def on_events(events: list[dict[str, Any]], replay: bool) -> None:
            self._post_from_thread(RunEvents(run_dir, events, replay))

        def on_end(code: int | None) -> None:
            self._post_from_thread(RunEnded(run_dir, code))

        session.watcher = RunWatcher(run_dir, on_events, on_end,
                                     process=launch.process if launch is not None else None).start()
        self.session = session
        self._save_settings(followed_run=str(run_dir))
        self._run_updated()
        return session

    def _post_from_thread(self, message) -> None:
        try:
            self.post_message(message)
        except RuntimeError:
            pass  # the app is closing: the run goes on without us

    def _run_updated(self) -> None:
        """Tell the visible desk screen (under any dialog) to redraw; hidden ones redraw when shown."""
        stack = self._screen_stacks.get(self.current_mode) if self._screen_stacks else None
        if stack:
            stack[0].post_message(RunUpdated())

    def on_run_events(self, message: RunEvents) -> None:
        session = self.session
        if session is None or session.run_dir != message.run_dir:
            return
        session.history.apply_all(message.events)
        if not message.replay:
            for event in message.events:
                self._announce(event)
            if message.events and session.launch is not None and session.launch.stdout_path is not None:
                session.launch.drop_stdout_if_redundant()  # events.jsonl has them all from here on
        self._run_updated()

    def _announce(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "log" and event.get("level") in ("warning", "error"):
            self.notify(str(event.get("message", "")), severity="warning", timeout=10)
        elif kind == "run_finished":
            status = event.get("status")
            if status == "failed":
                hint = f"\nfix: {event['hint']}" if event.get("hint") else ""
                self.notify(f"{event.get('error')}{hint}\n(press l on the Train screen for the full log)",
                            title="Training failed", severity="error", timeout=60)
            elif status == "stopped":
                self.notify(f"Stopped at step {event.get('final_step')}; the checkpoint is saved. "
                            "Resume it with r on the Train screen.", title="Run stopped", severity="warning")
            else:
                best = event.get("best_val_loss")
                best_txt = f" Best val loss {best:.4f} at step {event.get('best_step')}." if isinstance(
                    best, (int, float)) else ""
                self.notify(f"Training finished.{best_txt} Press 5 to evaluate, 6 to export.",
                            title="Run completed", timeout=20)
            self.load_runs()

    def on_run_ended(self, message: RunEnded) -> None:
        session = self.session
        if session is None or session.run_dir != message.run_dir:
            return
        session.ended = True
        session.exit_code = message.exit_code
        self._explain_end(session, message.exit_code)
        self.load_runs()
        self._run_updated()

    def _explain_end(self, session: RunSession, code: int | None) -> None:
        """Say why the trainer ended when its run folder does not say so.

        A run that got its run folder ends with run_finished in events.jsonl, announced already. A child of ours
        that failed before that (a bad setting, a resume of a run that is still training) printed a final
        command_failed event on stdout: its error and hint are shown as they are. Its stderr is read only when
        it printed no event at all (it died before main() could report)."""
        launch = session.launch
        final = launch.final_event() if launch is not None else None
        if launch is not None:
            launch.drop_stdout()  # read: the copy has served its purpose
        exit_code = code if code is not None else EXIT_FAILED
        failure = failure_of(final, exit_code) if final is not None else None
        if final is not None and final.get("type") == "command_failed":
            if final.get("status") == "cancelled":
                self.notify("Stopped before training started.", title="Training did not start",
                            severity="warning", timeout=20)
                return
            if failure is not None:
                self._notify_failure(failure, "Training did not start")
                return
        if session.history.finished is not None:
            return  # the run's own final event said how it went
        if failure is not None:  # a final event on stdout that never reached events.jsonl
            started = session.history.started
            self._notify_failure(failure, "Training failed" if started else "Training did not start")
            return
        if launch is not None and final is None and not launch.events_in_run_folder and code not in (None, 0):
            stderr = launch.stderr_tail()
            fallback = parse_failure(stderr, code)
            if fallback.message and "ft-desk: " in stderr:
                self._notify_failure(fallback, "Training did not start")
                return
        code_txt = f" (exit code {code})" if code is not None else ""
        self.notify(f"The trainer stopped without a final report{code_txt}. Press l on the Train screen for the log;"
                    " r resumes from the last checkpoint.", title="Run interrupted", severity="error", timeout=60)

    def _notify_failure(self, failure: CommandFailed, title: str) -> None:
        hint = f"\nfix: {failure.hint}" if failure.hint else ""
        self.notify(f"{failure.message}{hint}", title=title, severity="error", timeout=60)

    def action_start_demo(self) -> None:
        self.draft = demo_draft()
        self.draft_updated()
        self.start_training()

    def start_training(self) -> None:
        if self.session is not None and self.session.live and self.session.watcher is not None:
            self.notify(f"{self.session.name} is still training. Stop it first (s on the Train screen): "
                        "one device trains one run at a time.", severity="warning")
            self.switch_mode("train")
            return
        try:
            self.draft.config()
        except ConfigError as err:
            self.notify(str(err), title="The recipe is not valid", severity="error", timeout=20)
            return
        problem = self.start_problem()
        if problem is not None:
            self.notify(problem, title="Training did not start", severity="error", timeout=20)
            return
        self._launch(partial(self.backend.start_training, self.draft))

    def start_problem(self) -> str | None:
        """Why the draft cannot be trained as it stands (data the check found unusable, a missing validation
        file), as one sentence with the fix; None when it can."""
        draft = self.draft
        if self.data_problem is not None and self.data_problem[0] == draft.train_file:
            return (f"The data is not usable: {self.data_problem[1]}. Fix the file and check it again on the Data "
                    "step (2).")
        valid = draft.valid_file_problem()
        if valid is not None:
            return f"{valid[0].upper()}{valid[1:]}: fix or clear the path on the Data step (2)."
        return None

    def recipe_does_not_fit(self) -> bool:
        """The last memory plan, made for the draft as it is now, says the run does not fit the device."""
        plan = self.plan_verdict
        return plan is not None and plan[0] == self.draft.plan_key() and plan[1] in ("does not fit", "no_fit")

    def action_show_command(self) -> None:
        """The shell command equivalent to what the wizard will run (the same arguments the app passes)."""
        try:
            line = self.draft.command_line()
        except ConfigError as err:
            self.notify(str(err), title="The recipe is not valid", severity="error", timeout=20)
            return
        self.push_screen(CommandDialog(line))

    def resume_run(self, run_dir: Path) -> None:
        if self.session is not None and self.session.live and self.session.run_dir != run_dir:
            self.notify(f"{self.session.name} is still training; stop it before resuming another run.",
                        severity="warning")
            return
        self._launch(partial(self.backend.resume_training, run_dir))

    @work(thread=True, exclusive=True, group="launch", exit_on_error=False)
    def _launch(self, start: Callable[[], Any]) -> None:
        launch = start()
        self.call_from_thread(self._launched, launch)

    def _launched(self, launch) -> None:
        self.follow(launch.run_dir, launch)
        self.switch_mode("train")
        self.notify(f"Training started in the background as {launch.run_dir.name}. It keeps running if you close "
                    "ft-desk or lose the connection; reopen ft-desk to re-attach.", title="Run started")

    def action_stop_run(self) -> None:
        session = self.session
        if session is None or not session.live:
            self.notify("No run is training.", severity="warning")
            return
        pid = session.pid
        if pid is None:
            self.notify("The run has no process id yet; try again in a moment.", severity="warning")
            return
        force = session.stop_requested
        question = ("Stop right now, without waiting for the step to finish? The last saved checkpoint is kept."
                    if force else f"Stop {session.name}? The current step finishes, a checkpoint is saved, and you "
                    "can resume later.")

        def answer(yes: bool | None) -> None:
            if not yes:
                return
            try:
                self.backend.stop_training(pid, force=force)
            except ProcessLookupError:
                self.notify("The trainer had already exited.", severity="warning")
                return
            session.stop_requested = True
            self._run_updated()
            self.notify("Stopping: finishing the step and saving a checkpoint." if not force else "Stopping now.")

        self.push_screen(Confirm(question, yes="Stop now" if force else "Stop", no="Keep training",
                                 danger=True), answer)

    def action_show_log(self) -> None:
        if self.session is None:
            self.notify("No run selected: open one from Home.", severity="warning")
            return
        self.push_screen(LogViewer(f"Log of {self.session.name}", self.session.log_files()))

    # One place for every worker failure: a readable notification, never a traceback.
    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state != WorkerState.ERROR:
            return
        error = event.worker.error
        if isinstance(error, CommandFailed):
            hint = f"\nfix: {error.hint}" if error.hint else ""
            self.notify(f"{error.message}{hint}", title="Command failed", severity="error", timeout=30)
        elif isinstance(error, ConfigError):
            self.notify(str(error), title="Not valid", severity="error", timeout=20)
        else:
            self.notify(f"{type(error).__name__}: {error}", title="Something went wrong", severity="error",
                        timeout=30)


def run_app() -> int:
    app = FtDeskApp()
    app.run()
    session = app.session
    if session is not None and session.live and not session.ended:
        print(f"ft-desk: {session.name} keeps training in the background. Run ft-desk again to re-attach, "
              f"or follow it with: tail -f {run_folder.events_path(session.run_dir)}")
    return 0
