"""The help screen (`?` or F1): every key of every screen, the app-wide keys, and the CLI command that does the
same work from a shell - so a newcomer finds an action without knowing which screen holds it.

The per-screen keys are read off the screens' own BINDINGS (the same list the footer and the command palette
use), so the help cannot fall out of date with the bindings.
"""

from __future__ import annotations

import importlib

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from ft_desk.tui.widgets.sidebar import STEPS

# mode -> (module, class) of each desk screen; Home is imported eagerly by the app, the rest lazily.
SCREEN_CLASSES = {
    "home": ("home", "HomeScreen"), "model": ("model", "ModelScreen"), "data": ("data", "DataScreen"),
    "recipe": ("recipe", "RecipeScreen"), "train": ("train", "TrainScreen"),
    "evaluate": ("evaluate", "EvaluateScreen"), "export": ("export", "ExportScreen"),
}

# The headless command behind each screen (what the app runs as a child process).
SCREEN_COMMANDS: dict[str, tuple[str, ...]] = {
    "home": ("ft-desk runs", "ft-desk demo", "ft-desk doctor"),
    "model": ("ft-desk models list", "ft-desk models search QUERY", "ft-desk models download HUB_ID"),
    "data": ("ft-desk data check FILE --model MODEL",),
    "recipe": ("ft-desk plan MODEL --preset qlora",),
    "train": ("ft-desk train --model MODEL --data FILE --preset qlora", "ft-desk train --resume RUN"),
    "evaluate": ("ft-desk eval RUN", "ft-desk chat RUN"),
    "export": ("ft-desk export RUN --format adapter|merged|gguf|ollama",),
}

APP_KEYS: tuple[tuple[str, str], ...] = (
    ("h, 1-6", "go to Home or a step"),
    ("ctrl+p", "command palette: every action of every screen, searchable"),
    ("? / f1", "this help"),
    ("escape", "leave a text field (step keys work again)"),
    ("tab", "next field"),
    ("ctrl+t", "light / dark theme"),
    ("q", "quit (a training run keeps going in the background)"),
)


def screen_class(mode: str):
    module, name = SCREEN_CLASSES[mode]
    return getattr(importlib.import_module(f"ft_desk.tui.screens.{module}"), name)


def screen_bindings(mode: str) -> list[tuple[str, str, str]]:
    """(key as shown, description, action) of a screen's bindings that have a description."""
    out = []
    seen = set()
    for binding in screen_class(mode).BINDINGS:
        if not isinstance(binding, Binding) or not binding.description or binding.action in seen:
            continue
        seen.add(binding.action)
        out.append((binding.key_display or binding.key, binding.description, binding.action))
    return out


def help_text(current: str | None = None) -> str:
    """The whole help as markup: app keys, then each screen (the current one first) with its keys and commands."""
    lines = ["[b]Everywhere[/b]"]
    lines += [f"  [b]{escape(key):<10}[/b] {escape(what)}" for key, what in APP_KEYS]
    order = [m for m, _l, _k in STEPS]
    if current in order:
        order.remove(current)
        order.insert(0, current)
    labels = {m: (label, key) for m, label, key in STEPS}
    for mode in order:
        label, key = labels[mode]
        here = "  [dim](this screen)[/]" if mode == current else ""
        lines += ["", f"[b]{escape(label)}[/b] [dim]key {escape(key)}[/]{here}"]
        for shown, what, _action in screen_bindings(mode):
            lines.append(f"  [b]{escape(shown):<10}[/b] {escape(what)}")
        for command in SCREEN_COMMANDS.get(mode, ()):
            lines.append(f"  [dim]shell:[/]     {escape(command)}")
    return "\n".join(lines)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape", "dismiss", "Close"), Binding("question_mark", "dismiss", "Close", show=False),
                Binding("f1", "dismiss", "Close", show=False), Binding("q", "dismiss", "Close", show=False)]

    def __init__(self, current: str | None = None) -> None:
        super().__init__(classes="dialog-screen")
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help-dialog"):
            yield Label("Keys and commands", classes="dialog-title")
            with VerticalScroll(id="help-scroll"):
                yield Static(help_text(self.current), id="help-text")
            yield Static("[dim]escape closes · ctrl+p finds any action by name[/]")

    def on_mount(self) -> None:
        self.query_one("#help-scroll").focus()
