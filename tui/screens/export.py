"""Export: write the run's model out as a PEFT adapter, merged safetensors, GGUF or an Ollama model, with
`ft-desk export --json` in a worker; progress by phase, then the verification (fidelity) report: does the exported
model behave like the trained one, and does it stop where it should."""

from __future__ import annotations

import importlib.util
import threading
from typing import Any

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Checkbox, Input, Label, ProgressBar, RadioButton, RadioSet, Select, Static

from ft_desk.trainer.events import format_bytes
from ft_desk.trainer.export_formats import FORMATS, GGUF_FORMATS, GGUF_TYPES, LLAMA_CPP_ONLY_TYPES, MERGED_DTYPES
from ft_desk.tui.commands import CommandFailed
from ft_desk.tui.screens.base import DeskScreen


def gguf_type_choices() -> list[tuple[str, str]]:
    """(label, value) of the GGUF tensor types; q4_k_m is made by llama.cpp's quantizer, so it is offered only
    where llama-cpp-python is installed (found without importing it: the export child imports it)."""
    choices = [("auto", "auto")] + [(t, t) for t in GGUF_TYPES if t not in LLAMA_CPP_ONLY_TYPES]
    if importlib.util.find_spec("llama_cpp") is not None:
        choices += [(f"{t} (llama.cpp)", t) for t in LLAMA_CPP_ONLY_TYPES]
    return choices


PHASES = {"merge": "merging", "gguf": "writing GGUF", "verify": "verifying", "write": "writing files"}


def export_args(fmt: str, dtype: str, gguf_type: str, merge_into: str, out: str, verify: bool,
                checkpoint: str, name: str) -> list[str]:
    """Command-line options of `ft-desk export RUN_DIR` for the choices on screen."""
    args = ["--format", fmt, "--checkpoint", checkpoint or "best"]
    if fmt == "merged":
        args += ["--dtype", dtype, "--merge-into", merge_into]
    if fmt in GGUF_FORMATS and gguf_type != "auto":
        args += ["--gguf-type", gguf_type]
    if fmt == "ollama" and name:
        args += ["--name", name]
    if out:
        args += ["--out", out]
    if not verify:
        args.append("--no-verify")
    return args


def fidelity_lines(result: dict[str, Any]) -> list[str]:
    """The export_finished event as readable lines: where, what, and each verification with its numbers."""
    lines = []
    status = result.get("status")
    style = {"ok": "green", "unverified": "yellow", "failed": "red"}.get(str(status), "bold")
    word = {"ok": "verified ✓", "unverified": "written, not verified", "failed": "verification FAILED"}.get(
        str(status), str(status or "done"))
    lines.append(f"[b {style}]{escape(word)}[/]  {escape(str(result.get('out_dir', '')))}  "
                 f"({format_bytes(result.get('bytes'))}, {len(result.get('files') or [])} files, "
                 f"{result.get('elapsed_s', '?')} s)")
    if result.get("error"):
        lines.append(f"[red]{escape(str(result['error']))}[/]" + (
            f"  [b]fix:[/] {escape(str(result['hint']))}" if result.get("hint") else ""))
    fidelity = result.get("fidelity") or {}
    for name, comparison in (fidelity.get("comparisons") or {}).items():
        if not isinstance(comparison, dict):
            continue
        verdict = "[green]passed[/]" if comparison.get("passed") else "[red]failed[/]"
        if comparison.get("informational"):
            verdict = "[dim]for information[/]"
        lines.append(f"[b]{escape(name.replace('_', ' '))}[/b]: {verdict}")
        checks = comparison.get("checks") or []
        for check in checks:
            mark = {True: "[green]✓[/]", False: "[red]✗[/]"}.get(check.get("ok"), "[dim]·[/]")
            lines.append(f"  {mark} {escape(str(check.get('detail') or check.get('name')))}")
        if not checks:
            numbers = ", ".join(f"{k.replace('_', ' ')} {_num(v)}" for k, v in comparison.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool))
            lines.append(f"  {escape(numbers)}")
    for note in (result.get("notes") or [])[:6]:
        lines.append(f"[dim]· {escape(str(note))}[/]")
    if result.get("command") and result.get("passed") is False:
        lines.append("[yellow]next:[/] the export failed its own check, so it is not ready to use: try a wider "
                     "GGUF type (f16) or the merged format")
    elif result.get("command"):
        lines.append(f"next: [b]{escape(str(result['command']))}[/]")
    return lines


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.3e}" if value and abs(value) < 1e-2 else f"{value:.4f}"


class ExportScreen(DeskScreen):
    MODE = "export"
    TITLE = "Export"
    MAIN = "#export-format"
    BINDINGS = [
        Binding("ctrl+e", "export", "Export"),
        Binding("ctrl+x", "cancel", "Cancel", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._cancel = threading.Event()
        self.running = False

    def compose_body(self) -> ComposeResult:
        yield Static("", id="export-run")
        with Horizontal(id="export-main"):
            with RadioSet(id="export-format"):
                for value, label in ((f.name, f.label) for f in FORMATS):
                    yield RadioButton(label, value=value == "adapter", id=f"fmt-{value}")
            with VerticalScroll(id="export-options"):
                yield Static("", id="format-help")
                with Horizontal(classes="field-row", id="row-dtype"):
                    yield Label("dtype", classes="field-label")
                    yield Select([(d, d) for d in MERGED_DTYPES], allow_blank=False, id="dtype", compact=True)
                with Horizontal(classes="field-row", id="row-merge"):
                    yield Label("merge into", classes="field-label")
                    yield Select([("the 4-bit weights trained against", "quantized"),
                                  ("the original 16-bit weights", "original")], allow_blank=False,
                                 id="merge-into", compact=True)
                with Horizontal(classes="field-row", id="row-gguf"):
                    yield Label("GGUF type", classes="field-label")
                    yield Select(gguf_type_choices(), allow_blank=False, id="gguf-type", compact=True)
                with Horizontal(classes="field-row", id="row-name"):
                    yield Label("Ollama name", classes="field-label")
                    yield Input(placeholder="default: from the run", id="ollama-name", compact=True)
                with Horizontal(classes="field-row"):
                    yield Label("checkpoint", classes="field-label")
                    yield Input("best", id="checkpoint", compact=True)
                with Horizontal(classes="field-row"):
                    yield Label("folder", classes="field-label")
                    yield Input(placeholder="default: RUN_DIR/exports/<format>-<time>", id="out-dir", compact=True)
                yield Checkbox("verify against the trained model", value=True, id="verify", compact=True)
        with Horizontal(id="export-buttons"):
            yield Button("Export", variant="primary", id="export-go", compact=True)
        with Horizontal(id="export-progress-row"):
            yield ProgressBar(total=100, show_eta=False, id="export-progress")
            yield Static("", id="export-phase")
        with VerticalScroll(id="export-report-box"):
            yield Static("", id="export-report")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#export-progress-row").display = False
        self._show_options()

    def refresh_view(self) -> None:
        session = self.desk.session
        text = self.query_one("#export-run", Static)
        if session is None:
            text.update("No run selected. Open a trained run from Home (h), or train one (4).")
            return
        status = session.status
        warn = "  [yellow]still training: the export uses the best checkpoint so far[/]" if session.live else ""
        text.update(f"run [b]{escape(session.name)}[/b] [dim]({status})[/]{warn}")

    def _format(self) -> str:
        pressed = self.query_one("#export-format", RadioSet).pressed_button
        return (pressed.id or "fmt-adapter")[4:] if pressed is not None else "adapter"

    @on(RadioSet.Changed, "#export-format")
    def _format_changed(self, _event: RadioSet.Changed) -> None:
        self._show_options()

    def _show_options(self) -> None:
        fmt = self._format()
        self.query_one("#format-help", Static).update(
            f"[dim]{escape(next(f.description for f in FORMATS if f.name == fmt))}[/]")
        self.query_one("#row-dtype").display = fmt == "merged"
        self.query_one("#row-merge").display = fmt == "merged"
        self.query_one("#row-gguf").display = fmt in GGUF_FORMATS
        self.query_one("#row-name").display = fmt == "ollama"

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "export-go":
            self.action_export()

    def action_export(self) -> None:
        session = self.followed_run()
        if session is None:
            return
        if self.running:
            self.notify("An export is running.", severity="warning")
            return
        args = export_args(
            self._format(), str(self.query_one("#dtype", Select).value),
            str(self.query_one("#gguf-type", Select).value), str(self.query_one("#merge-into", Select).value),
            self.query_one("#out-dir", Input).value.strip(), self.query_one("#verify", Checkbox).value,
            self.query_one("#checkpoint", Input).value.strip(), self.query_one("#ollama-name", Input).value.strip(),
        )
        self.running = True
        self._cancel.clear()
        self.query_one("#export-progress-row").display = True
        self.query_one("#export-progress", ProgressBar).update(total=None, progress=0)
        self.query_one("#export-phase", Static).update("starting…  [dim]ctrl+x cancels[/]")
        self.query_one("#export-report", Static).update("")
        self._export(session.run_dir, args)

    @work(thread=True, exclusive=True, group="export", exit_on_error=False)
    def _export(self, run_dir, args: list[str]) -> None:
        def on_event(event: dict[str, Any]) -> None:
            self.app.call_from_thread(self._event, event)

        try:
            result = self.desk.backend.export(run_dir, args, on_event, self._cancel.is_set)
        except CommandFailed as err:
            self.app.call_from_thread(self._done, None, err)
            return
        self.app.call_from_thread(self._done, result, None)

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        bar = self.query_one("#export-progress", ProgressBar)
        if kind == "export_started":
            self.query_one("#export-phase", Static).update(f"writing to {escape(str(event.get('out_dir')))}")
        elif kind == "export_progress":
            total, done = event.get("total") or 0, event.get("done") or 0
            bar.update(total=total or None, progress=done)
            phase = PHASES.get(str(event.get("phase")), str(event.get("phase")))
            self.query_one("#export-phase", Static).update(
                f"{phase}: {escape(str(event.get('message') or ''))}  [dim]ctrl+x cancels[/]")

    def _done(self, result: dict[str, Any] | None, error: CommandFailed | None) -> None:
        self.running = False
        self.query_one("#export-progress-row").display = False
        report = self.query_one("#export-report", Static)
        if self._cancel.is_set():
            report.update("[yellow]Export cancelled; nothing was left behind in the target folder.[/]")
        elif error is not None:
            report.update(f"[b red]export failed:[/] {escape(error.message)}"
                          + (f"\n[b]fix:[/] {escape(error.hint)}" if error.hint else ""))
            self.notify(error.message, title="Export failed", severity="error")
        elif result is not None:
            report.update("\n".join(fidelity_lines(result)))
            if result.get("status") == "failed":
                self.notify("The export does not behave like the trained model; see the report.",
                            title="Verification failed", severity="error")
            else:
                self.notify(f"Exported to {result.get('out_dir')}", title="Export finished")

    def action_cancel(self) -> None:
        if self.running:
            self._cancel.set()
