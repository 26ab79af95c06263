"""Small modal screens: a yes/no question, a one-line text prompt, the shell command of a run, and the full-log
viewer."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Log, Static


class Confirm(ModalScreen[bool]):
    """Returns True when the user confirms."""

    BINDINGS = [Binding("escape", "dismiss(False)", "Cancel"), Binding("y", "dismiss(True)", "Yes", show=False)]

    def __init__(self, question: str, yes: str = "Yes", no: str = "Cancel", danger: bool = False) -> None:
        super().__init__(classes="dialog-screen")
        self.question, self.yes, self.no, self.danger = question, yes, no, danger

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="dialog-text")
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.yes, variant="error" if self.danger else "primary", id="yes")
                yield Button(self.no, id="no")

    def on_mount(self) -> None:
        self.query_one("#no" if self.danger else "#yes", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class Prompt(ModalScreen["str | None"]):
    """Asks for one line of text; returns it stripped, or None when cancelled."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, question: str, placeholder: str = "", value: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self.question, self.placeholder, self.value = question, placeholder, value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-text")
            yield Input(self.value, placeholder=self.placeholder, id="prompt-input")
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.query_one(Input).value.strip() or None if event.button.id == "ok" else None)


class CommandDialog(ModalScreen[None]):
    """The shell command line equivalent to the wizard's run, to read or copy (ctrl+y puts it on the clipboard
    through the terminal, where the terminal allows it)."""

    BINDINGS = [Binding("escape", "dismiss", "Close"), Binding("ctrl+y", "copy", "Copy"),
                Binding("q", "dismiss", "Close", show=False)]

    def __init__(self, command: str) -> None:
        super().__init__(classes="dialog-screen")
        self.command = command

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog command-dialog"):
            yield Label("The same run from a shell", classes="dialog-title")
            yield Static(self.command, id="command-line", classes="dialog-text", markup=False)
            yield Static("[dim]It starts exactly what t on the Train step starts. ctrl+y copies it (where the "
                         "terminal allows), escape closes.[/]")

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.command)
        self.notify("Copied the command.", timeout=3)


class LogViewer(ModalScreen[None]):
    """The full text of a run's log files, scrolled to the end."""

    BINDINGS = [Binding("escape", "dismiss", "Close"), Binding("l", "dismiss", "Close", show=False),
                Binding("q", "dismiss", "Close", show=False)]

    def __init__(self, title: str, files: list[Path]) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text, self.files = title, files

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog log-dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Log(id="full-log", highlight=True, auto_scroll=True)
            yield Static("[dim]escape to close[/]")

    def on_mount(self) -> None:
        log = self.query_one(Log)
        found = False
        for path in self.files:
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            found = True
            log.write_line(f"── {path} ──")
            log.write_lines(text.splitlines()[-5000:])
        if not found:
            log.write_line("No log written yet: " + ", ".join(str(p) for p in self.files))
        log.focus()
