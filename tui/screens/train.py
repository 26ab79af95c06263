"""Train: start the run the wizard assembled, then watch it live - loss chart, progress and ETA, throughput,
memory, learning rate, the log - and stop it gracefully. The run lives in its own process: leaving this screen
or the app does not touch it."""

from __future__ import annotations

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import ProgressBar, RichLog, Static

from ft_desk.trainer.config import ConfigError
from ft_desk.trainer.events import format_bytes, format_duration
from ft_desk.trainer.recipe_sizing import is_auto
from ft_desk.tui.screens.base import DeskScreen
from ft_desk.tui.screens.recipe import sizing_text
from ft_desk.tui.session import RunSession
from ft_desk.tui.widgets.loss_chart import LossChart

LEVEL_STYLE = {"warning": "yellow", "error": "bold red", "step": "dim"}



def batch_text(cfg) -> str:
    """The recipe's batching in words: numbers where the user set them; "batch autoxauto, max length auto" told
    nothing, and the sizing line below says what `auto` becomes."""
    t = cfg.train
    batch = (f"batch {t.micro_batch_size}x{t.grad_accum}" if not (is_auto(t.micro_batch_size) or is_auto(t.grad_accum))
             else "batch sized from the data")
    rows = "rows sized from the data" if is_auto(t.row_length) else f"rows of {t.row_length}"
    limit = ("max length: the model's context, up to 2048" if is_auto(cfg.data.max_length)
             else f"max length {cfg.data.max_length}")
    return f"{batch}, {rows}, {limit}"

class TrainScreen(DeskScreen):
    MODE = "train"
    TITLE = "Train"
    MAIN = "#run-log"
    BINDINGS = [
        Binding("t", "start", "Start training"),
        Binding("s", "stop", "Stop"),
        Binding("r", "resume", "Resume"),
        Binding("l", "log", "Full log"),
        Binding("e", "evaluate", "Evaluate"),
        Binding("c", "app.show_command", "Show the command"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._shown_session: RunSession | None = None
        self._log_shown = 0

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="train-ready"):  # at 80x24 the shell command ran past the bottom
            yield Static("", id="ready-text")
        with Vertical(id="train-live"):
            yield Static("", id="run-header")
            with Horizontal(id="progress-row"):
                yield ProgressBar(total=100, show_eta=False, id="progress")
                yield Static("", id="progress-text")
            yield Static("", id="run-stats")
            yield LossChart(id="loss-chart")
            yield RichLog(id="run-log", max_lines=2000, wrap=True, markup=False)

    def refresh_view(self) -> None:
        session = self.desk.session
        self.query_one("#train-ready").display = session is None
        self.query_one("#train-live").display = session is not None
        if session is None:
            self._show_ready()
            return
        if session is not self._shown_session:
            self._shown_session = session
            self._log_shown = 0
            self.query_one("#run-log", RichLog).clear()
        self._show_run(session)

    def _show_ready(self) -> None:
        draft = self.desk.draft
        missing = [name for name, ok in (("a model (1)", draft.model), ("data (2)", draft.train_file)) if not ok]
        lines = ["[b]Ready to train?[/b]\n"]
        if missing:
            lines.append(f"Choose {' and '.join(missing)} first, or press [b]d[/b] on Home for the demo.")
        else:
            try:
                cfg = draft.config()
            except ConfigError as err:
                lines.append(f"[red]The recipe is not valid:[/] {escape(str(err))}\nFix it on the Recipe step (3).")
            else:
                steps = f"{cfg.train.max_steps} steps" if cfg.train.max_steps else f"{cfg.train.epochs:g} epochs"
                batch = batch_text(cfg)
                valid = (f"[b]{escape(cfg.data.valid_file)}[/b]" if cfg.data.valid_file else
                         f"{cfg.data.val_fraction:g} of the training rows held out")
                sizing = sizing_text(draft, self.desk.data_report)
                lines += [
                    f"model   [b]{escape(cfg.model.name)}[/b]",
                    f"data    [b]{escape(cfg.data.train_file)}[/b]",
                    f"valid   {valid}",
                    f"recipe  [b]{escape('+'.join(draft.presets()))}[/b]: {cfg.train.method}, {steps}, "
                    f"lr {cfg.optim.lr:g}, {batch}",
                    *([sizing] if sizing else []),
                    "",
                    "Press [b]t[/b] to start. The run continues in the background if you close ft-desk.",
                    "",
                    "[dim]Same run from a shell:[/]",
                    f"[dim]{escape(draft.command_line())}[/]",
                ]
        self.query_one("#ready-text", Static).update("\n".join(lines))

    def _show_run(self, session: RunSession) -> None:
        h = session.history
        started = h.started
        status = session.status
        device = started.get("device", "")
        model = started.get("model") or session.state().get("model_name", "")
        header = Text.assemble((session.name, "bold"), "  ", (status, _status_style(status)))
        if model:
            header.append(f"   {model} · {started.get('method', '')}{' on ' + device if device else ''}", "dim")
        self.query_one("#run-header", Static).update(header)

        bar = self.query_one("#progress", ProgressBar)
        total = h.total_steps
        bar.update(total=total or 100, progress=h.step if total else 0)
        last = h.last_step
        if total:
            if h.finished:
                eta = str(h.finished.get("status", "finished"))
            elif session.ended:
                eta = "trainer gone"
            elif last:
                eta = f"ETA {format_duration(last.get('eta_s'))}"
            elif before_step_one(h):
                eta = escape(before_step_one(h) or "")  # what the trainer said it is doing (samples, validation)
            elif int((started.get("config") or {}).get("eval", {}).get("sample_prompts") or 0):
                eta = "answering held-out prompts before training…"
            else:
                eta = "first step…"
            text = f"step {h.step}/{total}  {eta}"
        else:
            text = "" if h.finished or session.ended else "loading the model and the data…"
            if text and h.model_import and h.model_import.get("phase") not in ("done", "reused"):
                text = str(h.model_import.get("message") or text)  # a GGUF base is being converted, once
        self.query_one("#progress-text", Static).update(text)

        stats = []
        if last:
            stats.append(f"loss [b]{last.get('loss', float('nan')):.4f}[/b]")
        best = h.best_eval
        if h.evals:
            stats.append(f"val [b]{h.evals[-1].val_loss:.4f}[/b]")
        if best is not None:
            stats.append(f"best {best.val_loss:.4f} @ {best.step}")
        if last:
            stats += [f"{float(last.get('tokens_per_s') or 0):.0f} tok/s",
                      f"mem {format_bytes(last.get('memory_bytes'))}",
                      f"lr {float(last.get('lr') or 0):.2e}",
                      f"epoch {float(last.get('epoch') or 0):.2f}"]
        elif h.model:
            stats.append(f"model {h.model.get('params', 0) / 1e6:.1f}M params, "
                         f"{h.model.get('trainable_params', 0) / 1e6:.2f}M trainable")
            if h.model_import.get("file_type") and h.model_import.get("dtype"):
                stats.append(f"dequantized from the GGUF's {escape(str(h.model_import['file_type']))} to "
                             f"{escape(str(h.model_import['dtype']))}")
        if h.finished and h.finished.get("status") == "failed":
            hint = h.finished.get("hint")
            stats = [f"[red]failed:[/] {escape(str(h.finished.get('error')))}"
                     + (f"\n[b]fix:[/] {escape(str(hint))}" if hint else "") + "\n[dim]l shows the full log[/]"]
        elif session.ended and not h.finished:
            stats = ["[red]The trainer exited without a final report.[/] l shows the log; r resumes from the last "
                     "checkpoint."]
        elif h.finished and h.finished.get("status") == "stopped":
            stats.append("[yellow]stopped[/]: r resumes from the checkpoint")
        elif h.finished:
            stats.append("[green]completed[/]: 5 evaluates, 6 exports")
        self.query_one("#run-stats", Static).update("  ·  ".join(stats))

        self.query_one(LossChart).show(h)
        log = self.query_one("#run-log", RichLog)
        for level, line in h.log_since(self._log_shown):
            log.write(Text(line, style=LEVEL_STYLE.get(level, "")))
        self._log_shown = h.log_total

    # Actions.
    def action_start(self) -> None:
        """Start a run with the wizard's draft (a finished run on screen is simply replaced)."""
        session = self.desk.session
        if session is not None and session.live:
            self.notify(f"{session.name} is training. Stop it first (s).", severity="warning")
            return
        draft = self.desk.draft
        if not draft.model or not draft.train_file:
            self.notify("Choose a model (1) and data (2) first, or start the demo with d on Home.",
                        severity="warning")
            return
        self.desk.start_training()

    def action_stop(self) -> None:
        self.desk.action_stop_run()

    def action_resume(self) -> None:
        session = self.followed_run()
        if session is None:
            return
        if session.live:
            self.notify(f"{session.name} is still training.", severity="warning")
            return
        if session.history.status == "completed":
            self.notify(f"{session.name} completed; start a new run to train more.", severity="warning")
            return
        self.desk.resume_run(session.run_dir)

    def action_log(self) -> None:
        self.desk.action_show_log()

    def action_evaluate(self) -> None:
        self.desk.switch_mode("evaluate")


def before_step_one(h) -> str | None:
    """The trainer's latest word on the work it does before step 1 (before-samples, the starting validation
    loss), or None: those take minutes on a CPU and are not steps."""
    for _level, text in reversed(h.log):
        if text.startswith("before step 1: "):
            said = text[len("before step 1: "):]
            return said.split(" (", 1)[0].rstrip("…") + "…"  # the details are in the log below
    return None


def _status_style(status: str) -> str:
    return {"running": "bold green", "starting": "yellow", "stopping": "yellow", "completed": "green",
            "stopped": "yellow", "failed": "bold red", "crashed": "bold red"}.get(status, "")
