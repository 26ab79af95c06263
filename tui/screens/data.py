"""Data: pick a training file (typed with path completion, or browsed), lint it against the chosen model's
tokenizer with `ft-desk data check --json`, and see what training will see: the format, row counts, a token-length
histogram against max_length, truncated rows, duplicates, broken rows with file:line, samples rendered with their
trained tokens highlighted ([ and ] browse the first row, the longest, the shortest and a truncated one), and the
validation split settings. When the file's columns fill no format (or are preference pairs), the column-mapping
dialog opens (ctrl+e opens it any time): each change there is written into the draft as data.columns and checked
at once, the result and the masked sample shown in the dialog while it is open."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Input, Label, Select, Static

from ft_desk.trainer.columns import ColumnsError, columns_line, parse_columns
from ft_desk.trainer.config import choices
from ft_desk.trainer.demo import DEMO_DATA_NAME, DEMO_MODEL_NAME, is_demo_data
from ft_desk.tui.commands import CommandFailed
from ft_desk.tui.screens.base import DeskScreen
from ft_desk.tui.widgets.column_map import ColumnMapDialog
from ft_desk.tui.widgets.file_picker import FilePicker, PathSuggester
from ft_desk.tui.widgets.histogram import TokenHistogram

TRAINED_STYLE = "bold black on green"


def sample_text(segments: list) -> Text:
    """A rendered example with the tokens that carry loss highlighted."""
    text = Text()
    for item in segments:
        piece, trained = (item[0], item[1]) if isinstance(item, (list, tuple)) else (str(item), False)
        text.append(piece, style=TRAINED_STYLE if trained else "dim")
    return text


def mapping_result(report: dict[str, Any]) -> str:
    """One markup line: what the file gives with the mapping being tried."""
    if report.get("error"):
        return f"[b red]not usable:[/] {escape(str(report.get('error')))}"
    broken = int(report.get("broken_count") or 0)
    tail = f", [red]{broken} broken row(s)[/] (first: {escape(str(report['broken_rows'][0]['reason']))})" if (
        broken and report.get("broken_rows")) else ""
    return (f"[green]{report.get('format')}[/] format: {report.get('usable_rows')} of {report.get('rows')} rows "
            f"usable{tail}")


def valid_findings(valid_file: str, report: dict[str, Any]) -> list[str]:
    """The check of the separate validation file, in two lines at most."""
    name = escape(Path(valid_file).name)
    if report.get("error"):
        lines = [f"[b red]validation file {name} not usable:[/] {escape(str(report['error']))}"]
        if report.get("hint"):
            lines.append(f"[b]fix:[/] {escape(str(report['hint']))}")
        return lines
    broken = int(report.get("broken_count") or 0)
    found = f"[red]{broken} broken row(s)[/]" if broken else "[green]no problems found[/]"
    return [f"validation file [b]{name}[/b]: {report.get('rows')} rows, {report.get('usable_rows')} usable · {found}"]


def findings(report: dict[str, Any]) -> list[str]:
    """The lint report as markup lines, problems first."""
    lines = []
    if report.get("error"):
        where = f"{report['where']}: " if report.get("where") and report["where"] not in report["error"] else ""
        lines.append(f"[b red]not usable:[/] {escape(where + str(report['error']))}")
        if report.get("hint"):
            lines.append(f"[b]fix:[/] {escape(str(report['hint']))}")
        if report.get("columns"):
            lines.append("[b]ctrl+e[/] maps the columns to a format's roles")
        return lines
    broken = int(report.get("broken_count") or 0)
    if broken:
        lines.append(f"[b red]{broken} broken row(s)[/]" + ("" if report.get("ok") else
                     " - fix them, or let training skip them (data.skip_bad_rows=true)"))
        for row in report.get("broken_rows") or []:
            lines.append(f"  [red]{escape(str(row.get('where')))}[/]: {escape(str(row.get('reason')))}")
        if broken > len(report.get("broken_rows") or []):
            lines.append(f"  … and {broken - len(report['broken_rows'])} more")
    truncated = int(report.get("truncated") or 0)
    max_length = report.get("max_length")
    if truncated:
        where = ", ".join(str(w) for w in (report.get("truncated_where") or [])[:3])
        lines.append(f"[yellow]{truncated} row(s) longer than max_length {max_length}[/] are cut"
                     + (f" (e.g. {escape(where)})" if where else "") + " - raise data.max_length on the Recipe step")
    if report.get("no_target"):
        lines.append(f"[yellow]{report['no_target']} row(s) have no reply within max_length[/] and are dropped")
    dups = int(report.get("duplicates") or 0)
    if dups:
        action = "dropped in training" if report.get("dedupe", True) else "kept (data.dedupe is off)"
        first = (report.get("duplicates_where") or [{}])[0]
        example = f" e.g. {first.get('where')} = {first.get('same_as')}" if isinstance(first, dict) and first else ""
        lines.append(f"[yellow]{dups} duplicate(s)[/], {action}{escape(example)}")
    if report.get("empty_turns"):
        lines.append(f"[yellow]{report['empty_turns']} empty turn(s)[/]")
    if not lines:
        lines.append("[green]no problems found[/]")
    if report.get("columns_note"):
        lines.append(f"[cyan]columns:[/] {escape(str(report['columns_note']))} · ctrl+e to change")
    return lines


class DataScreen(DeskScreen):
    MODE = "data"
    TITLE = "Data"
    MAIN = "#browse"  # not the text field: the step keys keep working until the user starts typing
    BINDINGS = [
        Binding("slash", "type_path", "Type a path"),
        Binding("ctrl+l", "validation_file", "Validation file"),
        Binding("ctrl+k", "check", "Check file"),
        Binding("ctrl+o", "browse", "Browse"),
        Binding("ctrl+d", "use_demo", "Demo data"),
        Binding("ctrl+e", "map_columns", "Map columns"),
        Binding("left_square_bracket", "sample(-1)", "Prev sample"),
        Binding("right_square_bracket", "sample(1)", "Next sample"),
        Binding("ctrl+n", "next", "Next: Recipe"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.report: dict[str, Any] | None = None
        self._checked_for: tuple | None = None
        self._sample_index = 0
        self._column_dialog: ColumnMapDialog | None = None
        self._offered_mapping_for: str | None = None  # the file the mapping dialog opened by itself for
        self._valid_lines: list[str] = []  # what the check of the separate validation file found

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="file-row"):
            yield Input(placeholder="a .jsonl / .json / .csv / .parquet / .arrow file, a dataset folder, or demo",
                        id="data-path",
                        suggester=PathSuggester(), compact=True)
            yield Button("Check", variant="primary", id="check", compact=True)
            yield Button("Browse…", id="browse", compact=True)
            yield Button("Demo data", id="demo", compact=True)
            yield Button("Columns…", id="map-columns", compact=True)
        yield Static("/ types a path (→ completes it, enter checks it) · enter on Browse… picks a file · "
                     "ctrl+d uses the demo data · ctrl+l a separate validation file", id="data-summary")
        with Horizontal(id="data-main"):
            yield TokenHistogram(id="histogram")
            with VerticalScroll(id="data-findings"):
                yield Static("", id="findings")
        yield Label("sample as training sees it ([reverse] highlighted [/] = tokens that carry loss)",
                    id="sample-title")
        with VerticalScroll(id="sample-box"):
            yield Static("", id="sample")
        with Horizontal(id="split-row"):
            yield Label("format", classes="field-label short")
            yield Select([(f, f) for f in choices("data.format")], allow_blank=False, id="data-format", compact=True)
            yield Label("validation share", classes="field-label")
            yield Input(id="val-fraction", compact=True, classes="small-input")
            yield Label("or file", classes="field-label short")
            yield Input(id="valid-file", placeholder="separate validation file (optional)", compact=True,
                        suggester=PathSuggester())

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one(TokenHistogram).show([], None)


    def refresh_view(self) -> None:
        draft = self.desk.draft
        path_input = self.query_one("#data-path", Input)
        if draft.train_file and path_input.value != draft.train_file and not path_input.has_focus:
            path_input.value = draft.train_file
        with self.prevent(Select.Changed):
            self.query_one("#data-format", Select).value = draft.value("data.format") or "auto"
        for widget_id, key in (("#val-fraction", "data.val_fraction"), ("#valid-file", "data.valid_file")):
            widget = self.query_one(widget_id, Input)
            if not widget.has_focus and widget.value != draft.value(key):
                widget.value = draft.value(key)
        # A separate validation file is the whole validation set: the share is not used, so it is greyed out.
        share = self.query_one("#val-fraction", Input)
        share.disabled = bool(draft.value("data.valid_file"))
        share.tooltip = "not used: the separate validation file is the validation set" if share.disabled else None
        if draft.train_file and self._check_key() != self._checked_for:
            self.action_check()

    def _check_key(self) -> tuple:
        d = self.desk.draft
        return (d.train_file, d.model, tuple(d.presets()),
                tuple(sorted((k, v) for k, v in d.overrides.items() if k.startswith("data."))))

    # Choosing the file.
    @on(Input.Submitted, "#data-path")
    def _path_submitted(self, event: Input.Submitted) -> None:
        self._use_file(event.value)

    def _use_file(self, value: str) -> None:
        value = value.strip()
        if not value:
            self.notify("Type a file path, browse (ctrl+o), or use the demo data (ctrl+d).", severity="warning")
            return
        if not is_demo_data(value):
            value = str(Path(value).expanduser())
        draft = self.desk.draft
        if value != draft.train_file:
            draft.train_file = value
            draft.data_checked = False
            self.desk.draft_updated()
        else:
            self.action_check()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "check":
            self._use_file(self.query_one("#data-path", Input).value)
        elif event.button.id == "browse":
            self.action_browse()
        elif event.button.id == "demo":
            self.action_use_demo()
        elif event.button.id == "map-columns":
            self.action_map_columns()

    def action_type_path(self) -> None:
        self.query_one("#data-path", Input).focus()

    def action_validation_file(self) -> None:
        self.query_one("#valid-file", Input).focus()

    def action_use_demo(self) -> None:
        self.query_one("#data-path", Input).value = DEMO_DATA_NAME
        self._use_file(DEMO_DATA_NAME)

    def action_browse(self) -> None:
        current = self.query_one("#data-path", Input).value.strip()
        start = Path(current).expanduser().parent if current and not is_demo_data(current) else Path.cwd()

        def chosen(path: Path | None) -> None:
            if path is not None:
                self.query_one("#data-path", Input).value = str(path)
                self._use_file(str(path))

        self.app.push_screen(FilePicker(start), chosen)

    def action_next(self) -> None:
        self.desk.switch_mode("recipe")

    # Column mapping.
    def action_map_columns(self) -> None:
        report = self.report or {}
        columns = list(report.get("columns") or [])
        if self._column_dialog is not None:
            return
        if not columns:
            self.notify("Check a data file first: the mapping lists its columns.", severity="warning")
            return
        draft = self.desk.draft
        before = draft.value("data.columns")
        start = draft.columns()
        for source in (report.get("column_mapping"), report.get("suggested_columns")):
            if not start and source:
                try:
                    start = parse_columns(source)
                except ColumnsError:
                    start = {}
        reason = str(report.get("error") or report.get("columns_note") or "")
        path = str(report.get("path") or draft.train_file)
        for prefix in (str(report.get("where") or ""), path):
            if prefix and reason.startswith(prefix):  # the dialog names the file; drop "PATH:LINE: "
                reason = reason[len(prefix):].split(": ", 1)[-1]
                break
        dialog = ColumnMapDialog(Path(path).name, columns, start, reason, on_change=self._try_columns)
        self._column_dialog = dialog

        def closed(mapping: dict[str, str] | None) -> None:
            self._column_dialog = None
            if mapping is None:
                self._set("data.columns", before)  # cancelled: the mapping the draft had
                return
            self._set("data.columns", columns_line(mapping))
            self.notify(f"data.columns = {columns_line(mapping)}", title="Columns mapped")

        self.app.push_screen(dialog, closed)

    def _try_columns(self, mapping: dict[str, str]) -> None:
        """A complete mapping picked in the dialog: into the draft, and check the file with it now."""
        self._set("data.columns", columns_line(mapping))
        if self._check_key() != self._checked_for:
            self.action_check()

    # Split settings are recipe overrides.
    @on(Select.Changed, "#data-format")
    def _format(self, event: Select.Changed) -> None:
        self._set("data.format", str(event.value))

    @on(Input.Submitted, "#val-fraction")
    @on(Input.Submitted, "#valid-file")
    def _split(self, event: Input.Submitted) -> None:
        key = "data.val_fraction" if event.input.id == "val-fraction" else "data.valid_file"
        value = event.value.strip()
        if key == "data.valid_file" and value:
            value = str(Path(value).expanduser())
            if not Path(value).is_file():
                self.notify(f"{value}: no such file (the validation file stays unset until the path is right)",
                            title="Validation file", severity="error")
                return
        self._set(key, value)

    def _set(self, key: str, value: str) -> None:
        draft = self.desk.draft
        if draft.value(key) == value:
            return
        if key == "data.columns":
            draft.set_columns(parse_columns(value))
        else:
            draft.set_override(key, value)
        error = draft.error()
        if error:
            self.notify(error, severity="error")
        self.desk.draft_updated()

    # The check.
    def action_check(self) -> None:
        draft = self.desk.draft
        if not draft.train_file:
            self._use_file(self.query_one("#data-path", Input).value)
            return
        if draft.error():
            self.notify(draft.error() or "", title="Fix the recipe first", severity="error")
            return
        self._checked_for = self._check_key()
        model = draft.model or DEMO_MODEL_NAME
        self.query_one("#data-summary", Static).update(
            f"[dim]checking {escape(draft.train_file)} with the tokenizer of {escape(model)}…[/]")
        self._check()

    @work(thread=True, exclusive=True, group="data-check", exit_on_error=False)
    def _check(self) -> None:
        try:
            report = self.desk.backend.check_data(self.desk.draft)
        except CommandFailed as err:
            report = {"ok": False, "error": err.message, "hint": err.hint}
        self.app.call_from_thread(self.show_report, report)

    def show_report(self, report: dict[str, Any]) -> None:
        self.report = report
        self.desk.data_report = {**report, "checked_file": self.desk.draft.train_file}
        draft = self.desk.draft
        usable = bool(report.get("ok")) and not report.get("error")
        self.desk.data_problem = None if usable else (draft.train_file, str(
            report.get("error") or "the check found rows that cannot be used"))
        if draft.data_checked != usable:
            draft.data_checked = usable
            self.desk.save_draft()
            self._refresh_chrome()
        summary = self.query_one("#data-summary", Static)
        if report.get("error"):
            summary.update(f"[b red]{escape(str(report.get('path') or draft.train_file))}: not usable[/]")
        else:
            stats = report.get("token_stats") or {}
            rendering = {"chat_template": "the model's chat template", "plain": "plain text"}.get(
                str(report.get("rendering")), str(report.get("rendering") or "?"))
            target = "assistant replies" if report.get("train_on") == "assistant" else "every token"
            if report.get("format") == "text":  # raw text rows: no template, every token trained (as the CLI says)
                rendering, target = "raw text + EOS", "every token"
            summary.update(
                f"[b]{escape(Path(str(report.get('path', ''))).name)}[/b]: [b]{report.get('format')}[/b] format, "
                f"{report.get('rows')} rows, {report.get('usable_rows')} usable · tokens median "
                f"{stats.get('median', '?')}, p95 {stats.get('p95', '?')}, max {stats.get('max', '?')} · "
                f"rendered with {rendering}, loss on {target}"
                + ("  [green]✓ ready[/]" if usable else ""))
        self.query_one(TokenHistogram).show(list(report.get("histogram") or []), report.get("max_length"))
        self._valid_lines = []
        self.query_one("#findings", Static).update("\n".join(findings(report)))
        valid_file = draft.value("data.valid_file")
        if valid_file and not report.get("error"):
            self._check_valid(valid_file)
        self._sample_index = 0
        self._show_sample()
        if self._column_dialog is not None:
            self._column_dialog.show_result(mapping_result(report), self._first_sample(report))
        elif report.get("error") and report.get("columns") and self._offered_mapping_for != draft.train_file:
            self._offered_mapping_for = draft.train_file  # opens by itself once per file; ctrl+e any time
            self.action_map_columns()

    @work(thread=True, exclusive=True, group="valid-check", exit_on_error=False)
    def _check_valid(self, valid_file: str) -> None:
        """The separate validation file gets the same check as the training file; a file set there was taken
        without a word, so a broken or empty one showed up only when the run failed."""
        draft = self.desk.draft
        overrides = {k: v for k, v in draft.overrides.items() if k != "data.valid_file"}
        try:
            report = self.desk.backend.check_data(replace(draft, train_file=valid_file, overrides=overrides))
        except CommandFailed as err:
            report = {"ok": False, "error": err.message, "hint": err.hint}
        self.app.call_from_thread(self._valid_checked, valid_file, report)

    def _valid_checked(self, valid_file: str, report: dict[str, Any]) -> None:
        if self.desk.draft.value("data.valid_file") != valid_file or self.report is None:
            return  # the field changed while this check ran
        self._valid_lines = valid_findings(valid_file, report)
        self.query_one("#findings", Static).update("\n".join(findings(self.report) + self._valid_lines))

    @staticmethod
    def _first_sample(report: dict[str, Any]) -> Text | None:
        samples = report.get("samples") or []
        return sample_text(samples[0].get("segments") or []) if samples else None

    def _samples(self) -> list[dict[str, Any]]:
        return list((self.report or {}).get("samples") or [])

    def action_sample(self, step: int) -> None:
        samples = self._samples()
        if len(samples) > 1:
            self._sample_index = (self._sample_index + step) % len(samples)
            self._show_sample()

    def _show_sample(self) -> None:
        samples = self._samples()
        title = self.query_one("#sample-title", Label)
        if not samples:
            title.update("sample as training sees it ([reverse] highlighted [/] = tokens that carry loss)")
            self.query_one("#sample", Static).update("")
            return
        sample = samples[self._sample_index]
        cut = " [yellow](cut at max_length)[/]" if sample.get("truncated") else ""
        browse = " · \\[ ] browse" if len(samples) > 1 else ""
        title.update(
            f"sample {self._sample_index + 1}/{len(samples)} [b]{escape(str(sample.get('label', '')))}[/b] "
            f"{escape(Path(str(sample.get('where', ''))).name)}: {sample.get('tokens')} tokens, "
            f"{sample.get('trained_tokens')} trained [reverse] highlighted [/]{cut}{browse}")
        self.query_one("#sample", Static).update(sample_text(sample.get("segments") or []))
        self.query_one("#sample-box", VerticalScroll).scroll_home(animate=False)
