"""The column-mapping dialog of the Data step: which column of the file fills which role of a row format.

It lists the file's columns (from `ft-desk data check --json`: name, a sample value, its kind) with a role picker
each, starting from the mapping in the draft, the one assumed from the names, or the one `data check` suggests.
Every change that makes a complete mapping goes to `on_change` at once, so the Data screen re-checks the file and
hands the new lint result back through `show_result` while the dialog is still open; Apply keeps the mapping,
Cancel (or escape) returns None and the screen puts the old one back. The roles and the conflict rules are
trainer/columns.py's, the same the config checks.
"""

from __future__ import annotations

from typing import Any, Callable

from rich.markup import escape
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Select, Static

from ft_desk.trainer.columns import (
    FORMAT_LABELS,
    REQUIRED,
    ROLES,
    ColumnsError,
    columns_line,
    mapping_format,
    parse_columns,
)

# Note: how many lines of the rendered sample the dialog shows (the last ones).
SAMPLE_LINES = 5


def role_options() -> list[tuple[str, str]]:
    """(label, role) for the pickers: every role with what it holds."""
    return [(f"{role} · {what}", role) for role, (_fmt, what) in ROLES.items()]


def column_roles(mapping: dict[str, str]) -> dict[str, str]:
    """column -> role, from role -> column."""
    return {column: role for role, column in mapping.items()}


class ColumnMapDialog(ModalScreen["dict[str, str] | None"]):
    """Pick a role per column; returns the mapping (role -> column) on Apply, None on Cancel."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "apply", "Apply")]

    def __init__(self, file_name: str, columns: list[dict[str, Any]], mapping: dict[str, str], reason: str = "",
                 on_change: Callable[[dict[str, str]], None] | None = None) -> None:
        super().__init__(classes="dialog-screen")
        self.file_name = file_name
        self.columns = [c for c in columns if isinstance(c, dict) and c.get("name") is not None]
        self.initial = dict(mapping)
        self.reason = reason
        self.on_change = on_change
        self._sent: dict[str, str] | None = None

    def compose(self) -> ComposeResult:
        roles = column_roles(self.initial)
        with Vertical(classes="dialog column-dialog"):
            yield Label(f"Map the columns of {self.file_name}", classes="dialog-title")
            if self.reason:
                yield Static(escape(self.reason), id="map-reason", classes="dialog-text")
            with VerticalScroll(id="map-rows"):
                for index, column in enumerate(self.columns):
                    name = str(column["name"])
                    with Horizontal(classes="map-row"):
                        yield Label(escape(name), classes="map-name")
                        yield Static(f"[dim]{escape(str(column.get('sample', '')))}[/]", classes="map-sample")
                        yield Select(role_options(), prompt="not used", value=roles.get(name, Select.BLANK),
                                     id=f"role-{index}", classes="map-role", compact=True)
            yield Static("", id="map-line")
            yield Static("", id="map-result")
            yield Static("", id="map-sample")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self._update()  # the starting mapping is tried at once, so its result shows before any change
        if self.columns:
            self.query_one("#role-0", Select).focus()

    def picked(self) -> list[str]:
        """The `role=column` pairs picked now (a role picked twice stays twice, for the conflict message)."""
        pairs = []
        for index, column in enumerate(self.columns):
            value = self.query_one(f"#role-{index}", Select).value
            if isinstance(value, str):
                pairs.append(f"{value}={column['name']}")
        return pairs

    def problem(self) -> tuple[dict[str, str], str]:
        """(the mapping, "" when it is complete, else what is wrong with it in one sentence)."""
        try:
            mapping = parse_columns(self.picked())
        except ColumnsError as err:
            return {}, str(err).replace("data.columns", "the mapping")
        if not mapping:
            return {}, "pick a role for the columns to train on"
        fmt = mapping_format(mapping)
        if fmt is None:
            return mapping, ""
        names = {str(c["name"]) for c in self.columns}
        missing = [r for r in REQUIRED[fmt] if r not in mapping and r not in names]
        if missing:
            return {}, f"{FORMAT_LABELS[fmt]} also needs a column for {' and '.join(missing)}"
        return mapping, ""

    def _update(self, send: bool = True) -> None:
        mapping, problem = self.problem()
        line = self.query_one("#map-line", Static)
        self.query_one("#apply", Button).disabled = bool(problem)
        if problem:
            line.update(f"[yellow]{escape(problem)}[/]")
            return
        line.update(f"[b]--columns {escape(columns_line(mapping))}[/b]")
        if send and self.on_change is not None and mapping != self._sent:
            self._sent = mapping
            self.query_one("#map-result", Static).update("[dim]checking…[/]")
            self.on_change(mapping)

    @on(Select.Changed, ".map-role")
    def _picked(self, _event: Select.Changed) -> None:
        self._update()

    def show_result(self, summary: str, sample: Text | None) -> None:
        """The lint result of the mapping being tried: a markup line, and the first sample with its loss mask."""
        self.query_one("#map-result", Static).update(summary)
        if sample is not None:  # its end: where the reply, the part that carries loss, is
            lines = sample.split("\n", allow_blank=True)
            sample = Text("\n").join(lines[-SAMPLE_LINES:])
        self.query_one("#map-sample", Static).update(sample if sample is not None else "")

    def action_apply(self) -> None:
        mapping, problem = self.problem()
        if not problem:
            self.dismiss(mapping)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "apply":
            self.action_apply()
        else:
            self.action_cancel()
