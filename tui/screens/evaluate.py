"""Evaluate: what training changed. Before/after answers on held-out prompts side by side, the validation
metrics and the full evaluation (`ft-desk eval`, with an example limit, an overall ETA and a cancel), a chat
playground with the tuned model (streamed; a switch answers with the base model instead, another shows base and
tuned answers to the same question one after the other; a system prompt, temperature, top-p and reply length),
and the run doctor, which reads the loss curves for overfitting, no effect or collapse and says what to try."""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Checkbox, Input, Label, ProgressBar, Static, Switch, TabbedContent, TabPane

from ft_desk.trainer import run_folder
from ft_desk.trainer.events import format_duration
from ft_desk.tui.chat_client import ChatClient
from ft_desk.tui.commands import CommandFailed
from ft_desk.tui.eval_eta import EvalEta
from ft_desk.tui.history import RunHistory
from ft_desk.tui.loss_diagnosis import diagnose
from ft_desk.tui.runs import read_json
from ft_desk.tui.screens.base import DeskScreen

SEVERITY_MARK = {"error": "[b red]✗[/]", "warning": "[b yellow]![/]", "ok": "[b green]✓[/]", "info": "[b]·[/]"}
_SPECIAL = re.compile(r"<\|[^|>]{1,40}\|>|<s>|</s>|<end_of_turn>|<start_of_turn>")


_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)"  # ChatML (Qwen, SmolLM, the demo)
                   r"|<\|start_header_id\|>(\w+)<\|end_header_id\|>\n*(.*?)(?:<\|eot_id\|>|$)"  # Llama 3
                   r"|<start_of_turn>(\w+)\n(.*?)(?:<end_of_turn>|$)", re.S)  # Gemma


def readable_prompt(prompt: str) -> str:
    """What the user asked: the last user turn of a rendered chat prompt, or the prompt without special tokens."""
    turns = [(m[0] or m[2] or m[4], m[1] or m[3] or m[5]) for m in _TURN.findall(prompt)]
    users = [text.strip() for role, text in turns if role == "user" and text.strip()]
    if users:
        return users[-1]
    text = _SPECIAL.sub("", prompt)
    lines = [line.rstrip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line).strip()


def prompt_tail(prompt: str, max_lines: int = 3, max_chars: int = 400) -> str:
    """The end of a long prompt, where the question is: a prompt that opens with context (a table's name and
    columns, then "Q: ...") showed only its first lines, and the question itself was cut off."""
    lines = prompt.splitlines()
    tail = "\n".join(lines[-max_lines:])
    if len(tail) > max_chars:
        tail = tail[-max_chars:]
    return tail if tail == prompt else "… " + tail.lstrip()


def metrics_text(h: RunHistory) -> str:
    if not h.evals and not h.steps:
        return "No validation results yet."
    lines = []
    if h.evals:
        first, best, last = h.evals[0], h.best_eval, h.evals[-1]
        if best is not None:
            change = (best.val_loss - first.val_loss) / first.val_loss * 100 if first.val_loss else 0.0
            ppl = f", perplexity {best.perplexity:.2f}" if isinstance(best.perplexity, (int, float)) else ""
            lines.append(f"best val loss [b]{best.val_loss:.4f}[/b] at step {best.step}{ppl} "
                         f"({change:+.1f}% from {first.val_loss:.4f} at step {first.step})")
        if last is not best:
            lines.append(f"last val loss {last.val_loss:.4f} at step {last.step}")
        lines.append("")
        lines.append("[b]step   val loss   perplexity[/b]")
        for p in h.evals:
            ppl = f"{p.perplexity:10.2f}" if isinstance(p.perplexity, (int, float)) and math.isfinite(
                p.perplexity) else "         -"
            mark = "  ← best" if best is not None and p.step == best.step else ""
            lines.append(f"{p.step:>5}   {p.val_loss:8.4f}   {ppl}{mark}")
    if h.steps:
        finite = [p.loss for p in h.steps if math.isfinite(p.loss)]
        if finite:
            lines.append("")
            lines.append(f"train loss {finite[0]:.4f} → {finite[-1]:.4f} over {h.steps[-1].step} steps")
    if h.data:
        lines.append(f"data: {h.data.get('train_rows')} train / {h.data.get('val_rows')} validation rows, "
                     f"{h.data.get('train_tokens')} train tokens")
    return "\n".join(lines)


DEFAULT_REPLY_TOKENS = 128
VERDICT_STYLE = {"better": "green", "worse": "red", "unclear": "yellow", "same": "dim"}


def _fmt(value: Any, scale: str) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    if scale == "rate":
        return f"{value * 100:.1f}%"
    if scale in ("tokens",):
        return f"{value:.0f}"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def interval_text(metric: dict[str, Any]) -> str:
    """The width of a few-example metric's 95% interval, from its note ("only 20 examples: +/-14 points"): the
    notes under the table say the intervals are "shown as +/-", and the table said only "few examples"."""
    note = str(metric.get("note") or "")
    return note[note.index("+/-"):] if "+/-" in note else "few examples"


def eval_lines(report: dict[str, Any]) -> list[str]:
    """`ft-desk eval`'s report (the eval_report event or report.json) as markup lines: base → tuned per metric."""
    lines = [f"[b]base vs tuned on {report.get('examples') or (report.get('data') or {}).get('examples', '?')} "
             "held-out examples[/b]"]
    rows = [m for m in report.get("metrics") or [] if isinstance(m, dict)]
    cells = []
    for m in rows:
        scale = str(m.get("scale") or "")
        delta = m.get("delta")
        sign = "+" if isinstance(delta, (int, float)) and delta > 0 else ""
        cells.append((str(m.get("label") or m.get("name")), _fmt(m.get("base"), scale), _fmt(m.get("tuned"), scale),
                      f"{sign}{_fmt(delta, scale)}" if isinstance(delta, (int, float)) else ""))
    # Columns as wide as their widest value: fixed widths made the longest rows wrap on an 80-column terminal.
    widths = [max((len(c[i]) for c in cells), default=0) for i in range(4)]
    for m, (label, base, tuned, change) in zip(rows, cells):
        verdict = str(m.get("verdict") or "-")
        style = VERDICT_STYLE.get(verdict, "")
        few = f" [dim]({escape(interval_text(m))})[/]" if m.get("few") else ""
        verdict_txt = f"[{style}]{escape(verdict)}[/]" if style else escape(verdict)
        lines.append(f"{escape(label.ljust(widths[0]))}  {base:>{widths[1]}} → {tuned:<{widths[2]}}  "
                     f"{change:>{widths[3]}}  {verdict_txt}{few}")
    retention = report.get("retention")
    if isinstance(retention, dict):
        mark = "[b red]![/] " if retention.get("flagged") else "[green]✓[/] "
        lines.append("")
        lines.append(mark + escape(str(retention.get("message") or "retention checked")))
        if retention.get("flagged") and retention.get("try"):
            tips = retention["try"] if isinstance(retention["try"], list) else [retention["try"]]
            lines.append("  [dim]try:[/] " + "; ".join(escape(str(t)) for t in tips))
    for note in (report.get("notes") or [])[:4]:
        lines.append(f"[dim]· {escape(str(note))}[/]")
    if report.get("report_dir"):
        lines.append(f"[dim]report: {escape(str(report['report_dir']))}/report.md[/]")
    return lines


def latest_eval_report(run_dir: Path) -> dict[str, Any] | None:
    """The newest RUN_DIR/eval/*/report.json, if `ft-desk eval` ran before."""
    reports = sorted(run_folder.eval_dir(run_dir).glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(reports):
        data = read_json(path)
        if data is not None:
            return data
    return None


def diagnosis_text(h: RunHistory) -> str:
    lines = []
    for f in diagnose(h):
        lines.append(f"{SEVERITY_MARK.get(f.severity, '·')} [b]{escape(f.title)}[/b]")
        lines.append(f"  {escape(f.detail)}")
        if f.try_:
            lines.append("  [dim]try:[/] " + "; ".join(escape(t) for t in f.try_))
        lines.append("")
    return "\n".join(lines).rstrip()


class EvaluateScreen(DeskScreen):
    MODE = "evaluate"
    TITLE = "Evaluate"
    MAIN = "#eval-tabs Tabs"
    BINDINGS = [
        Binding("ctrl+r", "run_eval", "Full evaluation"),
        Binding("ctrl+x", "cancel_eval", "Cancel evaluation"),
        Binding("ctrl+b", "toggle_base", "Base model on/off"),
        Binding("ctrl+o", "toggle_compare", "Compare base and tuned"),
        Binding("ctrl+l", "clear_chat", "Clear chat"),
        Binding("ctrl+n", "next", "Next: Export"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.chat: ChatClient | None = None
        self.chat_ready = False
        self._waiting: tuple[str, bool] | None = None  # (question, base) asked while the model was loading
        self._queue: list[tuple[str, bool]] = []  # (label, base) answers still to ask for the current question
        self._answer_label = ""  # "tuned" / "base" while comparing, else ""
        self._settings: dict[str, Any] = {}
        self._eta = EvalEta()
        self._busy = False  # a question is out and its answer not finished
        self.messages: list[dict[str, str]] = []
        self._base_replies: dict[int, str] = {}  # index in messages -> the base model's reply there (comparing)
        self._answer: Static | None = None
        self._answer_text = ""
        self.max_tokens = DEFAULT_REPLY_TOKENS
        self._sample_count = -1
        self._eval_cancel = threading.Event()
        self.evaluating = False
        self._report_for: Path | None = None

    def compose_body(self) -> ComposeResult:
        yield Static("", id="eval-header")
        with TabbedContent(id="eval-tabs"):
            with TabPane("Before / after", id="tab-samples"):
                yield VerticalScroll(id="samples")
            with TabPane("Metrics", id="tab-metrics"):
                with VerticalScroll():
                    yield Static("", id="metrics")
                    with Horizontal(id="eval-limit-row"):
                        yield Label("full evaluation on", classes="field-label")
                        yield Input(placeholder="all", id="eval-limit", restrict=r"[0-9]*", compact=True)
                        yield Label("held-out examples (empty: all) · ctrl+r starts, ctrl+x cancels",
                                    id="eval-limit-note")
                    with Horizontal(id="eval-progress-row"):
                        yield ProgressBar(total=100, show_eta=False, id="eval-progress")
                        yield Static("", id="eval-phase")
                    yield Static("", id="eval-report")
            with TabPane("Chat", id="tab-chat"):
                with Vertical(id="chat-pane"):
                    yield VerticalScroll(id="chat-log")
                    with Horizontal(id="chat-settings"):
                        yield Label("system", classes="chat-label")
                        yield Input(placeholder="optional system prompt", id="chat-system", compact=True)
                        yield Label("temp", classes="chat-label")
                        yield Input("0", id="chat-temperature", restrict=r"[0-9.]*", compact=True,
                                    tooltip="0 answers greedily; above 0 samples")
                        yield Label("top-p", classes="chat-label")
                        yield Input("1.0", id="chat-top-p", restrict=r"[0-9.]*", compact=True)
                        yield Label("max", classes="chat-label")
                        yield Input("", id="chat-max-tokens", restrict=r"[0-9]*", compact=True,
                                    tooltip="longest reply in tokens")
                    with Horizontal(id="chat-row"):
                        yield Input(placeholder="ask the tuned model…", id="chat-input", compact=True)
                        yield Label("base", id="base-label")
                        yield Switch(id="base-switch")
                        yield Checkbox("compare", id="compare-switch", compact=True,
                                       tooltip="each question answered by the tuned model, then the base model")
            with TabPane("Doctor", id="tab-doctor"):
                with VerticalScroll():
                    yield Static("", id="doctor")

    def refresh_view(self) -> None:
        session = self.desk.session
        header = self.query_one("#eval-header", Static)
        if session is None:
            header.update("No run selected. Open one from Home (h), or train one (4).")
            self._show_samples(RunHistory())
            self.query_one("#metrics", Static).update("")
            self.query_one("#doctor", Static).update("")
            return
        h = session.history
        model = h.started.get("model") or session.state().get("model_name", "")
        live = " · [yellow]still training: numbers will change[/]" if session.live else ""
        header.update(f"[b]{escape(session.name)}[/b]  [dim]{escape(str(model))} · {session.status}[/]{live}")
        self._show_samples(h)
        self.query_one("#metrics", Static).update("[b]validation during training[/b]\n" + metrics_text(h))
        if self._report_for != session.run_dir and not self.evaluating:
            self._report_for = session.run_dir
            self.query_one("#eval-report", Static).update(
                "\n[dim]ctrl+r runs the full evaluation (ft-desk eval): base and tuned model answer the held-out "
                "prompts; exact match, ROUGE-L, chrF, stop rate and a retention check. It loads the model and "
                "takes a minute or more.[/]")
            self._load_report(session.run_dir)
        self.query_one("#doctor", Static).update(diagnosis_text(h))
        if self.chat is not None and self.chat.run_dir != session.run_dir:
            self._stop_chat()

    def _show_samples(self, h: RunHistory) -> None:
        pairs = h.sample_pairs()
        signature = len(h.samples)
        if signature == self._sample_count:
            return
        self._sample_count = signature
        box = self.query_one("#samples", VerticalScroll)
        box.remove_children()
        if not pairs:
            box.mount(Static("No samples yet: the run writes answers to held-out prompts before training starts "
                             "and after it ends (eval.sample_prompts).", classes="sample-empty"))
            return
        widgets = []
        for i, (before, after) in enumerate(pairs):
            some = before or after or {}
            prompt = prompt_tail(readable_prompt(str(some.get("prompt", ""))))
            widgets.append(Static(Text.assemble((f"prompt {i + 1}  ", "bold"), (prompt, "dim")),
                                  classes="sample-prompt"))
            left = Static(escape(str(before.get("output", ""))) if before else "[dim]—[/]", classes="sample-out")
            left.border_title = "before"
            right = Static(escape(str(after.get("output", ""))) if after else "[dim]after training ends[/]",
                           classes="sample-out after")
            right.border_title = "after"
            widgets.append(Horizontal(left, right, classes="sample-pair"))
            if some.get("reference"):
                widgets.append(Static(Text.assemble(("expected  ", "bold"), str(some["reference"])[:400]),
                                      classes="sample-ref"))
        box.mount_all(widgets)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#eval-progress-row").display = False

    # The full evaluation (ft-desk eval), in a worker; the newest report is shown when the screen opens.
    @work(thread=True, exclusive=True, group="eval-report", exit_on_error=False)
    def _load_report(self, run_dir: Path) -> None:
        report = latest_eval_report(run_dir)
        if report is not None:
            self.app.call_from_thread(self._show_report, report)

    def _show_report(self, report: dict[str, Any]) -> None:
        self.query_one("#eval-report", Static).update("\n" + "\n".join(eval_lines(report)))

    def action_run_eval(self) -> None:
        session = self.followed_run()
        if session is None:
            return
        if self.evaluating:
            self.notify("The evaluation is running.", severity="warning")
            return
        if session.live:
            self.notify("The run is still training; evaluate it when it has finished.", severity="warning")
            return
        limit = self.query_one("#eval-limit", Input).value.strip()
        if limit and not int(limit):
            self.notify("The example limit must be 1 or more (empty evaluates them all).", severity="warning")
            return
        options = ["--limit", str(int(limit))] if limit else []
        self.evaluating = True
        self._eval_cancel.clear()
        self._eta = EvalEta()
        self.query_one("#eval-tabs", TabbedContent).active = "tab-metrics"
        self.query_one("#eval-progress-row").display = True
        self.query_one("#eval-progress", ProgressBar).update(total=None, progress=0)
        self.query_one("#eval-phase", Static).update("loading the model… (ctrl+x cancels)")
        self._evaluate(session.run_dir, options)

    def action_cancel_eval(self) -> None:
        if not self.evaluating:
            self.notify("No evaluation is running.", severity="warning")
            return
        self._eval_cancel.set()
        self.query_one("#eval-phase", Static).update("cancelling…")

    @work(thread=True, exclusive=True, group="eval", exit_on_error=False)
    def _evaluate(self, run_dir: Path, options: list[str]) -> None:
        def on_event(event: dict[str, Any]) -> None:
            try:
                self.app.call_from_thread(self._eval_event, event)
            except RuntimeError:
                pass  # the app is closing

        try:
            result = self.desk.backend.evaluate(run_dir, on_event, self._eval_cancel.is_set, options)
            error = None
        except CommandFailed as err:
            result, error = None, err
        try:
            self.app.call_from_thread(self._eval_done, result, error)
        except RuntimeError:
            pass  # the app is closing

    def _eval_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if self._eval_cancel.is_set():
            return
        if kind == "eval_started":
            self._eta.started(event)
        elif kind == "eval_progress":
            self._eta.progress(event)
            total, done = event.get("total") or 0, event.get("done") or 0
            self.query_one("#eval-progress", ProgressBar).update(total=total or None, progress=done)
            model = event.get("model")
            left = self._eta.remaining_s()
            eta = f" · about {format_duration(left)} left in all" if left is not None else ""
            self.query_one("#eval-phase", Static).update(
                f"{escape(str(event.get('phase')))}" + (f" ({escape(str(model))})" if model else "")
                + (f" {done}/{total}" if total else "") + eta + " · ctrl+x cancels")
        elif kind == "eval_report":
            self._show_report(event)

    def _eval_done(self, result: dict[str, Any] | None, error: CommandFailed | None) -> None:
        self.evaluating = False
        if not self.is_mounted:
            return
        self.query_one("#eval-progress-row").display = False
        if self._eval_cancel.is_set():
            self.query_one("#eval-report", Static).update(
                "\n[yellow]evaluation cancelled[/]: nothing was written; ctrl+r starts it again (a smaller "
                "example limit makes it quicker).")
            self.notify("Evaluation cancelled.", title="Evaluation", severity="warning")
            return
        if error is not None:
            self.query_one("#eval-report", Static).update(
                f"\n[b red]evaluation failed:[/] {escape(error.message)}"
                + (f"\n[b]fix:[/] {escape(error.hint)}" if error.hint else ""))
        elif result is not None and result.get("status") == "failed":
            self.query_one("#eval-report", Static).update(
                f"\n[b red]evaluation failed:[/] {escape(str(result.get('error')))}"
                + (f"\n[b]fix:[/] {escape(str(result['hint']))}" if result.get("hint") else ""))
        else:
            self.notify("Evaluation finished: see the Metrics tab.", title="Evaluation")

    # The chat playground.
    @on(TabbedContent.TabActivated, "#eval-tabs")
    def _tab(self, event: TabbedContent.TabActivated) -> None:
        if event.pane.id == "tab-chat":
            self.query_one("#chat-input", Input).focus()
            self._ensure_chat()

    def _ensure_chat(self) -> bool:
        session = self.desk.session
        if session is None:
            self._chat_line("[dim]Open a run first.[/]")
            return False
        if not run_folder.has_weights(session.run_dir):
            self._chat_line("[dim]This run has no checkpoint yet; chat opens once one is saved.[/]")
            return False
        if self.chat is None or not self.chat.running:
            config = read_json(run_folder.config_path(session.run_dir)) or {}
            # Replies as long as the run's own samples: long enough to judge, short enough on a CPU.
            self.max_tokens = int((config.get("eval") or {}).get("max_new_tokens") or DEFAULT_REPLY_TOKENS)
            self.chat_ready = False
            max_field = self.query_one("#chat-max-tokens", Input)
            if not max_field.value:
                max_field.value = str(self.max_tokens)
            self.chat = self.desk.backend.open_chat(session.run_dir, self._chat_event_from_thread,
                                                    self._chat_exit_from_thread)
            self._chat_line(f"[dim]loading {escape(session.name)} (the adapter on its base model)…[/]")
        return True

    def _chat_event_from_thread(self, event: dict[str, Any]) -> None:
        self.app.call_from_thread(self._chat_event, event)

    def _chat_exit_from_thread(self, code: int, failure: CommandFailed | None) -> None:
        try:
            self.app.call_from_thread(self._chat_exit, code, failure)
        except RuntimeError:
            pass  # the app is closing

    def _chat_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "chat_ready":
            self.chat_ready = True
            base = "" if event.get("base_available") else " (no base toggle: every weight was trained)"
            self._chat_line(f"[dim]ready: {escape(str(event.get('model')))} + {escape(str(event.get('checkpoint')))}"
                            f" on {escape(str(event.get('device')))}{base}; replies up to the max field's tokens "
                            f"(the run's eval.max_new_tokens, {self.max_tokens}, to start with)[/]")
            if event.get("format") == "text":
                self._chat_line("[dim]this run trained on raw text rows, not conversations: what you type is "
                                "continued as plain text, without a chat template (a system prompt goes first, "
                                "as a line of its own)[/]")
            if self._waiting is not None:
                question, self._waiting = self._waiting, None
                self._send(*question)
        elif kind == "chat_token":
            if self._answer is None:
                self._start_answer()
            self._answer_text += str(event.get("text", ""))
            self._answer.update(escape(self._answer_text))
            self.call_after_refresh(self.query_one("#chat-log", VerticalScroll).scroll_end, animate=False)
        elif kind == "chat_done":
            if self._answer is None:
                self._start_answer()
                self._answer.update(escape(str(event.get("text", ""))))
            stop = "" if event.get("stopped") else " · hit max tokens"
            self._chat_line(f"[dim]{event.get('tokens')} tokens in {event.get('seconds')} s{stop}[/]")
            if not self.messages or self.messages[-1]["role"] == "user":
                # The conversation goes on from the first answer (the tuned one when comparing).
                self.messages.append({"role": "assistant", "content": str(event.get("text", ""))})
            elif self._answer_label == "base":  # the base model's own reply, for its side of the next comparison
                self._base_replies[len(self.messages) - 1] = str(event.get("text", ""))
            self._answer = None
            if self._queue:
                self._ask_next()
            else:
                self._busy = False
        elif kind == "chat_error":
            hint = f"\nfix: {event['hint']}" if event.get("hint") else ""
            self._chat_line(f"[red]{escape(str(event.get('error')))}{escape(hint)}[/]")
            self._answer = None
            self._busy = False
            self._queue.clear()
            if self.messages and self.messages[-1]["role"] == "user":
                self.messages.pop()

    def _chat_exit(self, code: int, failure: CommandFailed | None) -> None:
        if code not in (0, None) and self.is_mounted:
            why = failure.message if failure is not None and failure.message else f"exit code {code}"
            self._chat_line(f"[red]the chat process ended: {escape(why)}[/]")
        self.chat_ready = False
        self._waiting, self._busy = None, False
        self._queue.clear()

    def _start_answer(self) -> None:
        label = {"tuned": "[b green]tuned:[/] ", "base": "[b]base:[/] "}.get(self._answer_label, "")
        if label:
            self._chat_line(label, classes="chat-who")
        self._answer = self._chat_line("", classes="chat-answer")
        self._answer_text = ""

    def _chat_line(self, markup: str, classes: str = "chat-note") -> Static:
        line = Static(markup, classes=classes)
        log = self.query_one("#chat-log", VerticalScroll)
        log.mount(line)
        # After the next refresh, when the new line has its height: scrolling now races the mount (under load the
        # log stopped short of the last line).
        self.call_after_refresh(log.scroll_end, animate=False)
        return line

    @on(Input.Submitted, "#chat-input")
    def _ask(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if not self._ensure_chat():
            return
        if self._busy or self._waiting is not None:
            self.notify("Wait for the answer to finish.", severity="warning")
            return
        settings = self._read_settings()
        if settings is None:
            return
        self._settings = settings
        event.input.value = ""
        base = self.query_one("#base-switch", Switch).value
        compare = self.query_one("#compare-switch", Checkbox).value
        who = "you → base and tuned" if compare else ("you → base model" if base else "you")
        self._chat_line(f"[b]{who}:[/b] {escape(text)}", classes="chat-question")
        if self.chat_ready:
            self._send(text, base)
        else:
            self._waiting = (text, base)  # asked while the model loads: sent as soon as it is ready
            self._chat_line("[dim]sent once the model has loaded…[/]")

    def _read_settings(self) -> dict[str, Any] | None:
        """System prompt and sampling from the settings row; None (after saying what is wrong) when not valid."""
        def number(selector: str, default: float) -> float | None:
            text = self.query_one(selector, Input).value.strip()
            try:
                return float(text) if text else default
            except ValueError:
                return None

        temperature = number("#chat-temperature", 0.0)
        top_p = number("#chat-top-p", 1.0)
        max_tokens = number("#chat-max-tokens", float(self.max_tokens))
        if temperature is None or temperature < 0 or temperature > 5:
            self.notify("temp must be a number from 0 (greedy) to 5.", severity="warning")
            return None
        if top_p is None or not 0 < top_p <= 1:
            self.notify("top-p must be a number above 0 and at most 1.", severity="warning")
            return None
        if max_tokens is None or max_tokens < 1 or max_tokens != int(max_tokens) or max_tokens > 4096:
            self.notify("max must be a whole number of tokens from 1 to 4096.", severity="warning")
            return None
        return {"system": self.query_one("#chat-system", Input).value.strip(), "temperature": temperature,
                "top_p": top_p, "max_new_tokens": int(max_tokens)}

    def _send(self, text: str, base: bool) -> None:
        self._busy = True
        self.messages.append({"role": "user", "content": text})
        compare = self.query_one("#compare-switch", Checkbox).value
        self._queue = [("tuned", False), ("base", True)] if compare else [("", base)]
        self._ask_next()

    def _ask_next(self) -> None:
        label, base = self._queue.pop(0)
        self._answer_label = label
        assert self.chat is not None
        if self.messages and self.messages[-1]["role"] == "assistant":
            question = self.messages[:-1]  # the second answer of a comparison: the same question again
        else:
            question = list(self.messages)
        if label == "base":  # the base model hears its own earlier replies, not the tuned model's
            question = [{**m, "content": self._base_replies[i]} if i in self._base_replies else m
                        for i, m in enumerate(question)]
        settings = self._settings or {"max_new_tokens": self.max_tokens}
        self.chat.ask(question, base=base, max_new_tokens=int(settings.get("max_new_tokens") or self.max_tokens),
                      system=str(settings.get("system") or ""), temperature=float(settings.get("temperature") or 0),
                      top_p=float(settings.get("top_p") or 1.0))

    def action_toggle_base(self) -> None:
        switch = self.query_one("#base-switch", Switch)
        switch.value = not switch.value

    def action_toggle_compare(self) -> None:
        box = self.query_one("#compare-switch", Checkbox)
        box.value = not box.value

    @on(Switch.Changed, "#base-switch")
    @on(Checkbox.Changed, "#compare-switch")
    def _base_changed(self, _event: Switch.Changed | Checkbox.Changed) -> None:
        compare = self.query_one("#compare-switch", Checkbox).value
        base = self.query_one("#base-switch", Switch).value
        self.query_one("#chat-input", Input).placeholder = (
            "ask both: the tuned model answers, then the base model…" if compare
            else "ask the base model (adapter off)…" if base else "ask the tuned model…")

    def action_clear_chat(self) -> None:
        self.messages.clear()
        self._base_replies.clear()
        self.query_one("#chat-log", VerticalScroll).remove_children()

    def action_next(self) -> None:
        self.desk.switch_mode("export")

    def _stop_chat(self, clear: bool = True) -> None:
        if self.chat is not None:
            self.chat.close()
            self.chat = None
            self.chat_ready = False
            self._waiting, self._busy = None, False
            if clear:
                self.action_clear_chat()

    def stop_children(self) -> None:
        """End the evaluation and chat children (the app is closing)."""
        self._eval_cancel.set()  # the stream's watcher ends the child within a fraction of a second
        self._stop_chat(clear=False)

    def on_unmount(self) -> None:
        self.stop_children()  # the widgets are already gone
