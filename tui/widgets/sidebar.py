"""The step sidebar: Home and the six wizard steps, each with its key, the current one highlighted and finished
steps ticked; under it, what the draft run holds so far."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

# (mode name, label, key) in sidebar order; the keys are App bindings.
STEPS: tuple[tuple[str, str, str], ...] = (
    ("home", "Home", "h"),
    ("model", "Model", "1"),
    ("data", "Data", "2"),
    ("recipe", "Recipe", "3"),
    ("train", "Train", "4"),
    ("evaluate", "Evaluate", "5"),
    ("export", "Export", "6"),
)


class StepList(OptionList):
    """Selecting a step switches to its screen (the app listens for OptionSelected)."""


class StepSidebar(Vertical):
    def __init__(self, current: str) -> None:
        super().__init__(id="sidebar")
        self.current = current

    def compose(self) -> ComposeResult:
        yield StepList(*self._options({}), id="steps")
        yield Static("", id="draft-summary")

    def on_mount(self) -> None:
        steps = self.query_one(StepList)
        steps.highlighted = [s[0] for s in STEPS].index(self.current)

    def _options(self, done: dict[str, bool]) -> list[Option]:
        out = []
        for mode, label, key in STEPS:
            text = Text.assemble((f" {key} ", "dim"), label)
            if done.get(mode):
                text.append(" ✓", "bold green")
            out.append(Option(text, id=mode))
        return out

    def refresh_state(self, done: dict[str, bool], summary: Text) -> None:
        steps = self.query_one(StepList)
        for option, (mode, label, key) in zip(self._options(done), STEPS):
            steps.replace_option_prompt(mode, option.prompt)
        self.query_one("#draft-summary", Static).update(summary)
