"""Recipe: a strategy preset and a hardware preset, the key settings as a form with a one-line help and inline
validation each, and the memory estimate of the whole run, updated as values change. "Save as preset" writes a
YAML file the CLI reads with `--preset NAME`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.timer import Timer
from textual.widgets import Button, Input, Label, Select, Static, Switch

from ft_desk.trainer.config import ConfigError, describe_fields
from ft_desk.trainer.presets import available_presets, save_preset, shipped_presets_dir
from ft_desk.trainer.recipe_sizing import is_auto, lengths_from_counts, size_batches, uses_auto
from ft_desk.tui.draft import HARDWARE, STRATEGIES, Draft
from ft_desk.tui.screens.base import DeskScreen
from ft_desk.tui.widgets.dialogs import Prompt
from ft_desk.tui.widgets.memory import MemoryPanel

# (dotted key, label, widget kind, choices) in form order.
FIELDS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("train.epochs", "epochs", "text", ()),
    ("train.max_steps", "max steps", "text", ()),
    ("optim.lr", "learning rate", "text", ()),
    ("train.micro_batch_size", "micro-batch", "text", ()),
    ("train.grad_accum", "grad accumulation", "text", ()),
    ("data.max_length", "max length", "text", ()),
    ("lora.r", "LoRA r", "text", ()),
    ("lora.alpha", "LoRA alpha", "text", ()),
    ("lora.dropout", "LoRA dropout", "text", ()),
    ("lora.target_modules", "LoRA targets", "text", ()),
    ("quant.quant_type", "4-bit type", "select", ("nf4", "fp4")),
    ("train.gradient_checkpointing", "grad checkpointing", "switch", ()),
)
PLAN_DELAY_S = 0.6
"""Note: the estimate runs a child process; waiting for a pause in typing keeps that to one per edit."""


def _field_id(key: str) -> str:
    return "f-" + key.replace(".", "-").replace("_", "-")


def strategy_choices() -> list[str]:
    hardware_dir = shipped_presets_dir() / "hardware"
    found = available_presets()
    extra = sorted(n for n, p in found.items() if n not in STRATEGIES and n not in HARDWARE
                   and p.parent != hardware_dir)
    return [n for n in STRATEGIES if n in found] + extra


class RecipeScreen(DeskScreen):
    MODE = "recipe"
    TITLE = "Recipe"
    MAIN = "#strategy"
    BINDINGS = [
        Binding("ctrl+s", "save_preset", "Save as preset"),
        Binding("ctrl+e", "estimate", "Re-estimate memory"),
        Binding("ctrl+r", "reset", "Reset to preset"),
        Binding("ctrl+g", "app.show_command", "Show the command", show=False),
        Binding("ctrl+n", "next", "Next: Train"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._help = describe_fields()
        self._plan_timer: Timer | None = None
        self._planned_for: tuple | None = None
        self._strategies = strategy_choices()

    def compose_body(self) -> ComposeResult:
        draft = self.desk.draft
        with Horizontal(id="preset-row"):
            yield Label("strategy", classes="field-label")
            yield Select([(n, n) for n in self._strategies], allow_blank=False, id="strategy", compact=True,
                         value=draft.strategy if draft.strategy in self._strategies else self._strategies[0])
            yield Label("hardware", classes="field-label short")
            yield Select([("none", "")] + [(n, n) for n in HARDWARE], allow_blank=False, id="hardware",
                         compact=True, value=draft.hardware)
        yield Static("", id="strategy-help")
        with VerticalScroll(id="recipe-form"):
            for key, label, kind, choices in FIELDS:
                with Horizontal(classes="field-row", id=_field_id(key) + "-row"):
                    yield Label(label, classes="field-label")
                    value = draft.value(key)
                    if kind == "select":
                        yield Select([(c, c) for c in choices], allow_blank=False, id=_field_id(key),
                                     compact=True, classes="field-input", value=value if value in choices
                                     else choices[0])
                    elif kind == "switch":
                        yield Switch(value == "true", id=_field_id(key), classes="field-input")
                    else:
                        yield Input(value, id=_field_id(key), compact=True, classes="field-input")
                    yield Static(escape(self._help.get(key, "")), classes="field-help", id=_field_id(key) + "-help")
        yield Static("", id="recipe-error")
        yield Static("", id="recipe-sizing")
        yield MemoryPanel(id="memory")
        with Horizontal(id="recipe-buttons"):
            yield Button("Save as preset", id="save-preset", compact=True)
            yield Button("Next: Train ›", variant="primary", id="next", compact=True)

    def refresh_view(self) -> None:
        draft = self.desk.draft
        # Values set here are not edits: their Changed messages are suppressed (they would arrive after this
        # method returns and be taken for the user's typing).
        with self.prevent(Input.Changed, Select.Changed, Switch.Changed):
            strategy = self.query_one("#strategy", Select)
            choices = strategy_choices()
            if choices != self._strategies:
                self._strategies = choices
                strategy.set_options([(n, n) for n in choices])
            strategy.value = draft.strategy
            self.query_one("#hardware", Select).value = draft.hardware
            for key, _label, kind, _choices in FIELDS:
                widget = self.query_one("#" + _field_id(key))
                value = draft.value(key)
                if kind == "switch":
                    widget.value = value == "true"
                elif widget.value != value and not (kind == "text" and widget.has_focus):
                    widget.value = value  # (never under the user's cursor)
        self._show_validation()
        self._schedule_plan()

    def _show_validation(self) -> None:
        draft = self.desk.draft
        error = draft.error()
        bad_key = None
        if error:
            bad_key = next((k for k, *_ in FIELDS if error.startswith(k) or f" {k} " in f" {error} "), None)
        for key, *_ in FIELDS:
            help_widget = self.query_one("#" + _field_id(key) + "-help", Static)
            row = self.query_one("#" + _field_id(key) + "-row")
            if key == bad_key:
                help_widget.update(f"[b red]{escape(error or '')}[/]")
                row.add_class("invalid")
            else:
                edited = " [dim](edited)[/]" if key in draft.overrides else ""
                help_widget.update(escape(self._help.get(key, "")) + edited)
                row.remove_class("invalid")
        message = ""
        if error and bad_key is None:
            message = f"[red]{escape(error)}[/]"
        elif not draft.model:
            message = "[dim]No model chosen yet (step 1): the estimate uses the demo model.[/]"
        self.query_one("#recipe-error", Static).update(message)
        self.query_one("#recipe-sizing", Static).update(sizing_text(self.desk.draft, self.desk.data_report))
        path = available_presets().get(draft.strategy)
        self.query_one("#strategy-help", Static).update(f"[dim]{escape(_preset_summary(path))}[/]" if path else "")

    # Edits.
    @on(Select.Changed, "#strategy")
    def _strategy(self, event: Select.Changed) -> None:
        if event.value != self.desk.draft.strategy:
            self.desk.draft.strategy = str(event.value)
            self.desk.draft_updated()

    @on(Select.Changed, "#hardware")
    def _hardware(self, event: Select.Changed) -> None:
        if event.value != self.desk.draft.hardware:
            self.desk.draft.hardware = str(event.value or "")
            self.desk.draft_updated()

    @on(Input.Changed, ".field-input")
    @on(Select.Changed, ".field-input")
    @on(Switch.Changed, ".field-input")
    def _field(self, event) -> None:
        widget = event.control
        key = next(k for k, *_ in FIELDS if _field_id(k) == widget.id)
        value = widget.value
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        if text == self.desk.draft.value(key):
            return
        self.desk.draft.set_override(key, text)
        self._show_validation()
        self._refresh_chrome()
        self._schedule_plan()

    # The memory estimate (debounced; one child process at a time).
    def _schedule_plan(self) -> None:
        if self._plan_timer is not None:
            self._plan_timer.stop()
        self._plan_timer = self.set_timer(PLAN_DELAY_S, self._estimate_if_changed)

    def _estimate_if_changed(self) -> None:
        draft = self.desk.draft
        report = self.desk.data_report or {}
        key = (draft.model, tuple(draft.presets()), tuple(sorted(draft.overrides.items())),
               report.get("checked_file"), id(report.get("recipe")))  # a new data check re-sizes the plan
        if key != self._planned_for and draft.error() is None:
            self._planned_for = key
            self.action_estimate()

    def action_estimate(self) -> None:
        if self.desk.draft.error() is not None:
            return
        self.query_one(MemoryPanel).loading()
        self._plan()

    @work(thread=True, exclusive=True, group="plan", exit_on_error=False)
    def _plan(self) -> None:
        draft = self.desk.draft
        try:
            plan = self.desk.backend.plan(sized_draft(draft, self.desk.data_report))
        except Exception as exc:  # noqa: BLE001 - shown in the panel; the form stays usable
            self.app.call_from_thread(self.query_one(MemoryPanel).failed, str(exc))
            return
        self.app.call_from_thread(self._planned, draft.plan_key(), plan)

    def _planned(self, key: tuple, plan: dict[str, Any]) -> None:
        self.desk.plan_verdict = (key, str(plan.get("verdict") or ""))
        self.query_one(MemoryPanel).show(plan)
        self._refresh_chrome()  # the Recipe step's check mark follows the verdict

    # Buttons and keys.
    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save-preset":
            self.action_save_preset()
        elif event.button.id == "next":
            self.action_next()

    def action_next(self) -> None:
        self.desk.switch_mode("train")

    def action_reset(self) -> None:
        self.desk.draft.overrides.clear()
        self.desk.draft_updated()
        self.notify("Every field is back to the preset's value.")

    def action_save_preset(self) -> None:
        try:
            config = self.desk.draft.config()
        except ConfigError as err:
            self.notify(str(err), title="Fix the recipe first", severity="error")
            return

        def save(name: str | None) -> None:
            if not name:
                return
            try:
                path = save_preset(config, name, note=f"Saved from ft-desk ({'+'.join(self.desk.draft.presets())}"
                                                      " with edits).")
            except ConfigError as err:
                self.notify(str(err), title="Not saved", severity="error")
                return
            self.notify(f"Saved {path}.\nUse it with: ft-desk train --preset {name}", title="Preset saved",
                        timeout=15)

        self.app.push_screen(Prompt("Save this recipe as a preset named:", placeholder="my-recipe"), save)


def _sizing(draft, report: dict | None):
    """(config, Sizing) the checked data gives this recipe, or None before a check of this file."""
    inputs = (report or {}).get("recipe") or {}
    if report is None or report.get("checked_file") != draft.train_file or not inputs.get("length_counts"):
        return None
    try:
        config = draft.config()
    except ConfigError:
        return None
    return config, size_batches(config, lengths_from_counts(inputs["length_counts"]), str(inputs.get("device")),
                                inputs.get("context"))[1]


def sized_draft(draft: Draft, report: dict | None) -> Draft:
    """The draft with the batch the checked data gives in place of `auto`, so the memory estimate plans the run
    that will start; planned with `auto` it took one row of the longest length allowed (1 x 2048 tokens, 10.5 GB
    for a 135M model) beside a sizing line that said 2 x 192 tokens."""
    sized = _sizing(draft, report)
    if sized is None or not uses_auto(sized[0]):
        return draft
    sizing = sized[1]
    values = {"data.max_length": sizing.max_length, "train.row_length": sizing.row_length,
              "train.micro_batch_size": sizing.micro_batch_size, "train.grad_accum": sizing.grad_accum}
    return replace(draft, overrides={**draft.overrides, **{k: str(v) for k, v in values.items()}})


def sizing_text(draft, report: dict | None) -> str:
    """Steps, examples and tokens per step this recipe gives on the checked data (trainer/recipe_sizing.py),
    re-sized on every edit; before a data check, what `auto` will do."""
    inputs = (report or {}).get("recipe") or {}
    checked = report is not None and report.get("checked_file") == draft.train_file
    try:
        config = draft.config()
    except ConfigError:
        return ""
    if not checked or not inputs.get("length_counts"):
        if uses_auto(config):
            batch_auto = is_auto(config.train.micro_batch_size) or is_auto(config.train.grad_accum)
            return (f"[dim]steps and {'batch' if batch_auto else 'packed rows'}: sized from the data when the run "
                    "starts (check the data in step 2 to see the figures here)[/]")
        return ""
    _, sizing = size_batches(config, lengths_from_counts(inputs["length_counts"]), str(inputs.get("device")),
                             inputs.get("context"))
    text = f"[b]on {escape(Path(str(report.get('path'))).name)}:[/] {escape(sizing.summary())}"
    if sizing.warning:
        text += f"\n[yellow]{escape(sizing.warning)}[/]"
    return text


def _preset_summary(path) -> str:
    """The first comment line of a preset file: what it is for."""
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                return line.lstrip("# ").strip()
    except OSError:
        pass
    return ""
