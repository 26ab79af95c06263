"""What every screen of the desk shares: the top bar, the step sidebar, the body and the footer.

A screen subclass sets MODE and TITLE and implements `compose_body()`. It redraws from the app's state in
`refresh_view()`, which runs when the screen is shown, when the draft changes, and when the followed run has new
events (a `RunUpdated`). Every binding of a screen is also offered in the command palette (see app.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer

from ft_desk.tui.session import RunSession, RunUpdated
from ft_desk.tui.widgets.sidebar import StepSidebar
from ft_desk.tui.widgets.topbar import TopBar

if TYPE_CHECKING:
    from ft_desk.tui.app import FtDeskApp


class DeskScreen(Screen):
    MODE = ""
    TITLE = ""
    MAIN = ""
    """Selector of the widget that gets the focus when the screen is shown (arrow keys act on it first)."""
    BINDINGS = [Binding("escape", "leave_field", "Leave field", show=False)]

    @property
    def desk(self) -> "FtDeskApp":
        return cast("FtDeskApp", self.app)

    def compose(self) -> ComposeResult:
        yield TopBar(self.TITLE)
        with Horizontal(id="main"):
            yield StepSidebar(self.MODE)
            with Vertical(id="body", classes=f"body-{self.MODE}"):
                yield from self.compose_body()
        yield Footer()

    def compose_body(self) -> ComposeResult:
        yield from ()

    def on_mount(self) -> None:
        self.desk.draft_changed.subscribe(self, lambda _draft: self._refresh_all())

    def on_screen_resume(self) -> None:
        self._refresh_all()
        focused = self.focused
        main = self.main_widget()
        if main and (focused is None or focused.id == "steps"):
            self.query_one(main).focus()

    def main_widget(self) -> str:
        return self.MAIN

    def on_run_updated(self, _message: RunUpdated) -> None:
        self._refresh_chrome()
        self.refresh_view()

    def _refresh_all(self) -> None:
        if not self.is_mounted:
            return
        self._refresh_chrome()
        self.refresh_view()

    def _refresh_chrome(self) -> None:
        desk = self.desk
        draft = desk.draft
        session = desk.session
        bar = self.query_one(TopBar)
        if session is not None:
            h = session.history
            bar.show_run(session.name, session.status, h.step, h.total_steps)
        else:
            bar.show_run("", "", 0, 0)
        bar.show_offline(desk.offline, desk.offline_reason)
        done = dict(draft.ready())
        done["train"] = session is not None and session.history.status == "completed"
        if done.get("recipe") and desk.recipe_does_not_fit():
            done["recipe"] = False  # no check mark next to "does not fit"
        summary = Text()
        summary.append("model ", "dim")
        summary.append((model_label(draft.model) or "—") + "\n")
        summary.append("data  ", "dim")
        summary.append(_short(Path(draft.train_file).name, 28) if draft.train_file else "—")
        summary.append("\nrecipe ", "dim")
        summary.append("+".join(draft.presets()))
        self.query_one(StepSidebar).refresh_state(done, summary)

    def refresh_view(self) -> None:
        """Redraw the body from the app's state (draft, followed run)."""

    def followed_run(self) -> "RunSession | None":
        """The run the app follows, or None after telling the user to open one."""
        session = self.desk.session
        if session is None:
            self.notify("No run selected: open one from Home (h), or train one (4).", severity="warning")
        return session

    def action_leave_field(self) -> None:
        """Escape from a text field back to the step list, so the step keys work again."""
        self.query_one("#steps").focus()


def model_label(model: str | None) -> str:
    """The model as the narrow sidebar shows it: a file or folder by its name, a Hub id without its owner, at
    most two lines. A GGUF's whole path took five lines there, pushing the data and recipe down."""
    if not model:
        return ""
    name = Path(model).name if model.startswith(("/", "~", ".")) else model.rsplit("/", 1)[-1]
    return _short(name or model, 28)


def _short(path: str, width: int = 14) -> str:
    if len(path) <= width:
        return path
    return "…" + path[-(width - 1):]
