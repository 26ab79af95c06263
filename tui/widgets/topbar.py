"""The one-line bar on top of every screen: where you are, the run the app is following, and offline mode."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.markup import escape
from textual.widgets import Static

STATUS_STYLE = {
    "running": "bold $success", "starting": "bold $warning", "stopping": "bold $warning", "completed": "$success",
    "stopped": "$warning",
    "failed": "bold $error", "crashed": "bold $error",
}


class TopBar(Horizontal):
    def __init__(self, title: str) -> None:
        super().__init__(id="topbar")
        self.title = title

    def compose(self) -> ComposeResult:
        yield Static(Text.assemble(("ft-desk", "bold"), "  ›  ", self.title), id="topbar-title")
        yield Static("", id="topbar-run")
        yield Static("", id="topbar-net")

    def show_run(self, name: str, status: str, step: int, total: int) -> None:
        run = self.query_one("#topbar-run", Static)
        if not name:
            run.update("")
            return
        mark = "●" if status in ("running", "starting", "stopping") else "○"
        progress = f" {step}/{total}" if total else ""
        style = STATUS_STYLE.get(status, "bold")
        run.update(f"[{style}]{mark} {escape(status)}[/]{progress}  {escape(name)}")

    def show_offline(self, offline: bool, why: str = "") -> None:
        self.query_one("#topbar-net", Static).update(f"[$warning]offline[/] {why}".rstrip() if offline else "")
