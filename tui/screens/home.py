"""Home: the runs on this machine (open, resume, evaluate, export, delete), a new run, and - the first time -
the demo, one key away."""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from ft_desk.tui.runs import RunSummary, age, delete_run
from ft_desk.tui.screens.base import DeskScreen
from ft_desk.tui.widgets.dialogs import Confirm

STATUS_STYLE = {"running": "bold green", "completed": "green", "stopped": "yellow", "failed": "bold red",
                "crashed": "bold red"}

WELCOME = (
    "[b]Welcome to ft-desk[/b] - fine-tune an open language model on this machine.\n\n"
    "[b $accent]d[/]  train the [b]demo[/b] now: a tiny model built locally and fine-tuned on bundled support-desk "
    "replies. Offline, about two minutes on a laptop CPU; it shows every step of a real run.\n"
    "[b $accent]n[/]  start your own run: pick a model, check your data, choose a recipe, train.\n\n"
    "Training runs in the background: close ft-desk or lose the connection and it keeps going; "
    "open ft-desk again to re-attach.\n[dim]Keys: h and 1-6 switch steps (escape first when typing in a field); "
    "? lists every key; ctrl+p finds any command; ctrl+t switches light/dark.[/]"
)


class HomeScreen(DeskScreen):
    MODE = "home"
    TITLE = "Home"
    MAIN = "#runs"
    BINDINGS = [
        Binding("enter", "open", "Open", show=True),
        Binding("n", "new_run", "New run"),
        Binding("d", "demo", "Demo"),
        Binding("r", "resume", "Resume"),
        Binding("e", "evaluate", "Evaluate"),
        Binding("x", "export", "Export"),
        Binding("delete", "delete", "Delete"),
        Binding("ctrl+r", "reload", "Reload", show=False),
    ]

    def compose_body(self) -> ComposeResult:
        yield Static(WELCOME, id="welcome")
        yield Static("", id="runs-title")
        table = DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        table.add_columns("status", "run", "model", "method", "steps", "best val", "started")
        yield table
        yield Static("", id="run-detail")

    def on_mount(self) -> None:
        super().on_mount()
        self.show_runs(self.desk.runs)
        self.set_interval(5.0, self.action_reload)

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        self.action_reload()

    def action_reload(self) -> None:
        if self.app.screen is self:
            self.desk.load_runs()

    def show_runs(self, runs: list[RunSummary]) -> None:
        table = self.query_one("#runs", DataTable)
        selected = self.selected()
        table.clear()
        now = self.desk.clock()
        for run in runs:
            best = f"{run.best_val_loss:.4f}" if run.best_val_loss is not None else "-"
            steps = f"{run.step}/{run.total_steps}" if run.total_steps else str(run.step or "-")
            table.add_row(
                Text(run.status, style=STATUS_STYLE.get(run.status, "")), run.run_name, run.model_name,
                run.method, steps, best, age(run.created, now), key=str(run.run_dir),
            )
        if selected is not None:
            keys = [str(r.run_dir) for r in runs]
            if str(selected.run_dir) in keys:
                table.move_cursor(row=keys.index(str(selected.run_dir)))
        first_time = not runs
        self.query_one("#welcome").display = first_time
        self.query_one("#runs-title", Static).update(
            "No runs yet." if first_time else f"[b]Runs[/b] [dim]({len(runs)}, newest first) · n new run · "
                                              "d demo · ? help · ctrl+p all commands[/]")
        self._show_detail()

    def selected(self) -> RunSummary | None:
        table = self.query_one("#runs", DataTable)
        if not table.row_count or table.cursor_row is None:
            return None
        try:
            key = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
        except Exception:  # noqa: BLE001 - an empty or refreshing table
            return None
        return next((r for r in self.desk.runs if str(r.run_dir) == key), None)

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    def on_data_table_row_selected(self, _event: DataTable.RowSelected) -> None:
        self.action_open()

    def _show_detail(self) -> None:
        run = self.selected()
        detail = self.query_one("#run-detail", Static)
        if run is None:
            detail.update("")
            return
        actions = ["enter open"]
        if run.resumable:
            actions.append("r resume")
        if run.trained:
            actions += ["e evaluate", "x export"]
        if not run.live:
            actions.append("del delete")
        error = f"\n[red]{run.error}[/]" if run.error and run.status in ("failed", "crashed") else ""
        detail.update(f"[dim]{run.run_dir}[/]{error}\n{'  ·  '.join(actions)}")

    def _need_run(self) -> RunSummary | None:
        run = self.selected()
        if run is None:
            self.notify("No run selected. Press d for the demo or n for a new run.", severity="warning")
        return run

    def action_open(self) -> None:
        run = self._need_run()
        if run is not None:
            self.desk.follow(run.run_dir)
            self.desk.switch_mode("train")

    def action_new_run(self) -> None:
        self.desk.action_new_run()

    def action_demo(self) -> None:
        self.desk.action_start_demo()

    def action_resume(self) -> None:
        run = self._need_run()
        if run is None:
            return
        if not run.resumable:
            self.notify(f"{run.run_name} is {run.status}; only stopped, failed or crashed runs resume.",
                        severity="warning")
            return
        self.desk.resume_run(run.run_dir)

    def _open_trained(self, mode: str) -> None:
        run = self._need_run()
        if run is None:
            return
        if not run.trained:
            self.notify(f"{run.run_name} has no checkpoint yet.", severity="warning")
            return
        self.desk.follow(run.run_dir)
        self.desk.switch_mode(mode)

    def action_evaluate(self) -> None:
        self._open_trained("evaluate")

    def action_export(self) -> None:
        self._open_trained("export")

    def action_delete(self) -> None:
        run = self._need_run()
        if run is None:
            return
        if run.live:
            self.notify(f"{run.run_name} is training; stop it before deleting it.", severity="warning")
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self._delete(run)

        self.app.push_screen(Confirm(f"Delete {run.run_name} and everything in {run.run_dir}?\n"
                                     "Checkpoints and the adapter are removed for good.", yes="Delete",
                                     danger=True), answer)

    @work(thread=True, exclusive=True, group="delete", exit_on_error=False)
    def _delete(self, run: RunSummary) -> None:
        delete_run(run)
        self.app.call_from_thread(self._deleted, run)

    def _deleted(self, run: RunSummary) -> None:
        session = self.desk.session
        if session is not None and session.run_dir == run.run_dir:
            session.stop_watching()
            self.desk.session = None
        self.notify(f"Deleted {run.run_name}.")
        self.desk.load_runs()
