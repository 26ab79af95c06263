"""Wire format between ft-desk's child processes and the TUI (and anything else that watches them).

One event is one JSON object on one line: `{"v": V, "type": ..., "time": unix seconds, ...fields}`.
Each event type is declared once below as a TypedDict (its fields; `NotRequired` ones may be left out) and
listed in EVENT_TYPES; `make_event` refuses an event that does not match its declaration, so every emitter is
held to this contract whenever it runs, tests included. Adding a field is compatible; renaming or removing
one bumps V. Readers ignore types and fields they do not know.

Every command that streams events ends with one final event that says how it went: run_finished,
eval_finished, export_finished, download_finished / download_failed, a fatal chat_error, or command_failed
when the command failed before its own final event. A failure's final event carries error, hint and
exit_code (and status), so a reader never has to parse stderr. Stdlib only: the TUI imports this module.
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Protocol, TextIO, TypedDict

from ft_desk.trainer.redaction import dumps_redacted

try:
    from typing import NotRequired
except ImportError:  # Python 3.10: the same class, from the typing backport
    from typing_extensions import NotRequired

# No `from __future__ import annotations` here: TypedDict needs real annotations to tell NotRequired fields apart.

V = 1

# Exit codes of `ft-desk train`, documented in the README.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3  # SIGINT/SIGTERM: the current step finished and a checkpoint was saved
EXIT_INTERRUPTED = 130  # Ctrl-C (or the TUI cancelling) outside a training run

ENVELOPE = ("v", "type", "time")


class EventError(ValueError):
    """An event that does not match its declaration: a bug in the emitter, never the user's fault."""


# --- training (`ft-desk train` / `ft-desk demo`) ---------------------------------------------------------------

class RunStarted(TypedDict):
    run_dir: str
    run_name: str
    model: str
    method: str
    device: str
    total_steps: int
    resumed_from_step: int
    config: dict[str, Any]


class DataReady(TypedDict):
    train_rows: int
    val_rows: int
    train_tokens: int
    format: str
    truncated: int
    duplicates_dropped: int
    skipped_rows: int
    columns_note: NotRequired[str]  # what was assumed about the data's column names ("" or absent: nothing)
    tokenize_seconds: NotRequired[float]  # reading + tokenizing the data (or reading the cached tokens)
    tokens_cached: NotRequired[bool]  # the tokens came from an earlier run's cache (data/token_cache.py)


class ModelLoaded(TypedDict):
    params: int
    trainable_params: int
    dtype: str
    quantized: bool
    load_seconds: float
    memory_bytes: int | None
    model_dir: str | None
    startup_seconds: NotRequired[float]  # process start to ready to train: imports, load, quantize, tokenize


class Step(TypedDict):
    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float | None  # None on a skipped (non-finite) step
    tokens: int
    tokens_per_s: float
    elapsed_s: float
    eta_s: float | None
    memory_bytes: int | None
    skipped_steps: int


class Eval(TypedDict):
    step: int
    val_loss: float
    perplexity: float
    best_val_loss: float
    is_best: bool


class Sample(TypedDict):
    phase: str  # before | after
    index: int
    prompt: str
    output: str
    reference: str | None


class Checkpoint(TypedDict):
    step: int
    path: str
    is_best: bool


class Log(TypedDict):
    level: str  # info | warning | error
    message: str


class CheckpointRejected(TypedDict):
    """A resume passed over a damaged checkpoint (and moved it aside) for an older good one."""

    step: int
    path: str
    reason: str
    moved_to: str | None
    message: str


class BatchReplanned(TypedDict):
    """A step ran out of memory: micro-batch halved, accumulation doubled (same effective batch), training goes on
    from `resumed_from_step` (the last checkpoint, or the start of the failed step)."""

    step: int  # the step that ran out of memory
    resumed_from_step: int
    micro_batch_size: int
    grad_accum: int
    previous_micro_batch_size: int
    previous_grad_accum: int
    error: str  # the allocator's words
    message: str


class RunFinished(TypedDict):
    status: str  # completed | stopped | failed
    exit_code: int
    error: str | None
    hint: str | None
    best_val_loss: float | None
    best_step: int | None
    final_step: int | None
    adapter_path: str | None
    run_dir: str
    elapsed_s: float


# --- `ft-desk eval` ----------------------------------------------------------------------------------------------

class EvalStarted(TypedDict):
    run_dir: str
    run_name: str
    checkpoint: dict[str, Any]
    data: str
    examples: int
    metrics: list[str]
    device: str
    generation: dict[str, Any]


class EvalProgress(TypedDict):
    phase: str
    model: str  # base | tuned | both
    done: int
    total: int
    elapsed_s: float


class EvalReport(TypedDict):
    report_dir: str
    examples: int
    metrics: list[dict[str, Any]]
    retention: dict[str, Any] | None
    notes: list[str]
    top_rows: list[dict[str, Any]]


class EvalFinished(TypedDict):
    status: str  # completed | failed
    exit_code: int
    error: str | None
    hint: str | None
    elapsed_s: float
    # The result summary, on success only:
    report_dir: NotRequired[str]
    report_json: NotRequired[str]
    report_md: NotRequired[str]
    examples: NotRequired[int]
    checkpoint: NotRequired[dict[str, Any]]
    metrics: NotRequired[list[dict[str, Any]]]
    retention: NotRequired[dict[str, Any] | None]
    notes: NotRequired[list[str]]
    timings: NotRequired[dict[str, Any]]


# --- `ft-desk export` --------------------------------------------------------------------------------------------

class ExportStarted(TypedDict):
    run_dir: str
    format: str
    out_dir: str
    checkpoint: str
    step: int | None


class ExportProgress(TypedDict):
    phase: str
    done: int
    total: int
    message: str


class ExportFinished(TypedDict):
    status: str  # ok | unverified | failed
    exit_code: int
    out_dir: str
    files: list[str]
    bytes: int
    passed: bool | None
    fidelity: dict[str, Any] | None
    notes: list[str]
    command: str | None
    elapsed_s: float | None
    format: str
    error: str | None
    hint: str | None
    facts: NotRequired[dict[str, Any]]  # absent when the export failed before writing anything


# --- `ft-desk models download` -----------------------------------------------------------------------------------

class DownloadStarted(TypedDict):
    repo_id: str
    revision: str | None
    commit: str
    files: list[dict[str, Any]]
    total_bytes: int
    weights_format: str | None
    remote_code: Any
    gated: Any
    skipped_files: int
    resumable_bytes: int


class DownloadProgress(TypedDict):
    repo_id: str
    file: str | None
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    bytes_resumed: int
    rate_bytes_per_s: float | None
    eta_s: float | None
    elapsed_s: float


class DownloadFinished(TypedDict):
    repo_id: str
    commit: str
    path: str
    bytes_total: int
    bytes_downloaded: int
    elapsed_s: float
    already_cached: bool
    pinned_revision: str | None
    stale_partials_freed_bytes: int
    # Only when the Hub was asked (not for an offline cache hit):
    weights_format: NotRequired[str | None]
    files: NotRequired[int]
    bytes_resumed: NotRequired[int]
    files_hash_checked: NotRequired[int]


class DownloadFailed(TypedDict):
    status: str  # failed | cancelled
    exit_code: int
    repo_id: str
    error: str
    hint: str | None
    cancelled: bool


# --- `ft-desk chat --events jsonl` -------------------------------------------------------------------------------

class ModelImport(TypedDict):
    """A GGUF file or Ollama model being turned into a model folder once (hub/gguf_import.py), or reused."""

    phase: str  # hash | start | convert | write | done | reused
    source: str  # the GGUF path or the Ollama name
    message: str
    done: int
    total: int
    folder: NotRequired[str]
    file_type: NotRequired[str]  # the GGUF's weight type, e.g. Q4_1
    dtype: NotRequired[str]  # what the weights are stored as after dequantizing


class ChatReady(TypedDict):
    model: str
    device: str
    checkpoint: str
    base_available: bool
    format: NotRequired[str]  # the data format the run trained on: "text" runs are chatted with as plain text


class ChatToken(TypedDict):
    text: str


class ChatDone(TypedDict):
    text: str
    tokens: int
    seconds: float
    stopped: bool


class ChatError(TypedDict):
    error: str
    hint: str | None
    fatal: NotRequired[bool]  # the model could not be loaded: the process ends
    exit_code: NotRequired[int]  # with fatal


# --- any command -------------------------------------------------------------------------------------------------

class FailedCommand(TypedDict):
    """A command failed before its own final event (a bad --set, a missing run folder); printed by cli/main.py."""

    command: str
    status: str  # failed
    exit_code: int
    error: str
    hint: str | None


EVENT_TYPES: dict[str, type] = {
    "run_started": RunStarted, "data_ready": DataReady, "model_loaded": ModelLoaded, "step": Step, "eval": Eval,
    "sample": Sample, "checkpoint": Checkpoint, "log": Log, "run_finished": RunFinished,
    "checkpoint_rejected": CheckpointRejected, "batch_replanned": BatchReplanned,
    "eval_started": EvalStarted, "eval_progress": EvalProgress, "eval_report": EvalReport,
    "eval_finished": EvalFinished,
    "export_started": ExportStarted, "export_progress": ExportProgress, "export_finished": ExportFinished,
    "download_started": DownloadStarted, "download_progress": DownloadProgress,
    "download_finished": DownloadFinished, "download_failed": DownloadFailed, "model_import": ModelImport,
    "chat_ready": ChatReady, "chat_token": ChatToken, "chat_done": ChatDone, "chat_error": ChatError,
    "command_failed": FailedCommand,
}

def check_event(event: dict[str, Any]) -> None:
    """Raise EventError, naming the type and the field, when `event` does not match its declaration."""
    kind = event.get("type")
    declaration = EVENT_TYPES.get(kind)  # type: ignore[arg-type]
    if declaration is None:
        raise EventError(f"unknown event type {kind!r}; declare it in ft_desk.trainer.events.EVENT_TYPES")
    fields = set(event) - set(ENVELOPE)
    required = declaration.__required_keys__  # type: ignore[attr-defined]
    allowed = required | declaration.__optional_keys__  # type: ignore[attr-defined]
    missing = sorted(required - fields)
    if missing:
        raise EventError(f"{kind} event is missing field {missing[0]!r} (declared in {declaration.__name__})")
    unknown = sorted(fields - allowed)
    if unknown:
        raise EventError(f"{kind} event has undeclared field {unknown[0]!r}; add it to {declaration.__name__}")


def make_event(type_: str, **fields: Any) -> dict[str, Any]:
    """One event in the envelope, checked against its declaration (EventError when it does not match)."""
    clash = [key for key in ENVELOPE if key in fields]
    if clash:
        raise EventError(f"{type_} event: field {clash[0]!r} is part of the envelope")
    event = {"v": V, "type": type_, "time": round(time.time(), 3), **fields}
    check_event(event)
    return event


class EventSink(Protocol):
    def emit(self, event: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Writes events as JSON Lines to a text stream (stdout in `--events jsonl` mode), flushing each line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def emit(self, event: dict[str, Any]) -> None:
        try:
            self.stream.write(dumps_redacted(event, ensure_ascii=False) + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            # The reader went away (TUI closed): the run goes on; events.jsonl still has everything.
            pass

    def close(self) -> None:
        pass


def stdout_sink() -> JsonlSink:
    """A sink writing events to the real stdout, with sys.stdout pointed at stderr from now on so that stray
    prints from libraries cannot corrupt the event stream (`--events jsonl` / `--json` modes)."""
    real = sys.stdout
    sys.stdout = sys.stderr
    return JsonlSink(real)


class FileSink:
    """Appends events to RUN_DIR/events.jsonl; each line is flushed so a re-attaching reader sees it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = path.is_file() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
        self._file = open(path, "a", encoding="utf-8")
        if torn:  # a write cut short (killed, disk full): end that line so the next event is not glued to it
            self._file.write("\n")

    def emit(self, event: dict[str, Any]) -> None:
        self._file.write(dumps_redacted(event, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except (OSError, ValueError):
            pass
        self._file.close()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


class FanOut:
    """Sends each event to several sinks."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = list(sinks)

    def add(self, sink: EventSink) -> None:
        self.sinks.append(sink)

    def emit(self, event: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.emit(event)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class ListSink:
    """Keeps events in memory (tests, and callers that want the events back)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_]


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--:--"
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def format_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class PrettySink:
    """Human output for a terminal: a one-line progress bar for steps, plain lines for everything else."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self._bar_open = False

    def _line(self, text: str) -> None:
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def emit(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "step":
            total = event.get("total_steps") or 0
            step = event["step"]
            width = 24
            filled = int(width * step / total) if total else 0
            bar = "#" * filled + "-" * (width - filled)
            text = (
                f"[{bar}] {step}/{total}  loss {event['loss']:.4f}  lr {event['lr']:.2e}  "
                f"{event['tokens_per_s']:.0f} tok/s  mem {format_bytes(event.get('memory_bytes'))}  "
                f"ETA {format_duration(event.get('eta_s'))}"
            )
            if self.tty:
                self.stream.write("\r" + text.ljust(110))
                self.stream.flush()
                self._bar_open = True
            else:
                self._line(text)
            return
        self._line(describe_event(event))

    def close(self) -> None:
        if self._bar_open:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_open = False


def describe_event(event: dict[str, Any]) -> str:
    """One readable line for any event (used by PrettySink and the TUI's log pane)."""
    kind = event.get("type")
    if kind == "run_started":
        resumed = f", resumed at step {event['resumed_from_step']}" if event.get("resumed_from_step") else ""
        return (
            f"run {event['run_name']}: {event['method']} of {event['model']} on {event['device']}, "
            f"{event['total_steps']} steps{resumed}\n  folder: {event['run_dir']}"
        )
    if kind == "data_ready":
        extra = []
        if event.get("truncated"):
            extra.append(f"{event['truncated']} truncated")
        if event.get("duplicates_dropped"):
            extra.append(f"{event['duplicates_dropped']} duplicates dropped")
        if event.get("skipped_rows"):
            extra.append(f"{event['skipped_rows']} bad rows skipped")
        if event.get("tokens_cached"):
            extra.append("tokens from the cache")
        tail = f" ({', '.join(extra)})" if extra else ""
        note = f"\n  columns: {event['columns_note']}" if event.get("columns_note") else ""
        return (
            f"data: {event['format']} format, {event['train_rows']} train / {event['val_rows']} val rows, "
            f"{event['train_tokens']} train tokens{tail}{note}"
        )
    if kind == "model_loaded":
        q = "4-bit base, " if event.get("quantized") else ""
        return (
            f"model loaded in {event['load_seconds']:.1f}s: {event['params'] / 1e6:.1f}M params, {q}"
            f"{event['trainable_params'] / 1e6:.2f}M trainable, {event['dtype']}"
        )
    if kind == "eval":
        best = "  (best)" if event.get("is_best") else ""
        return f"step {event['step']}: val loss {event['val_loss']:.4f}  perplexity {event['perplexity']:.2f}{best}"
    if kind == "sample":
        return f"[{event['phase']}] {event['prompt']!r}\n  -> {event['output']!r}"
    if kind == "checkpoint":
        return f"checkpoint at step {event['step']}{' (best)' if event.get('is_best') else ''}: {event['path']}"
    if kind == "log":
        level = event.get("level", "info")
        prefix = "" if level == "info" else f"{level}: "
        return prefix + str(event.get("message", ""))
    if kind == "run_finished":
        status = event.get("status")
        if status == "failed":
            hint = f"\n  fix: {event['hint']}" if event.get("hint") else ""
            return f"run failed: {event.get('error')}{hint}"
        best = event.get("best_val_loss")
        best_txt = f", best val loss {best:.4f} at step {event.get('best_step')}" if best is not None else ""
        return f"run {status} at step {event.get('final_step')} in {format_duration(event.get('elapsed_s'))}{best_txt}"
    if kind == "step":
        return f"step {event['step']}/{event['total_steps']} loss {event['loss']:.4f}"
    # Events of other tools (export, eval, download) carry a message or are shown by type and fields.
    if event.get("message"):
        return str(event["message"])
    fields = {k: v for k, v in event.items() if k not in ("v", "type", "time")}
    brief = ", ".join(f"{k}={v}" for k, v in fields.items() if isinstance(v, (str, int, float)) and len(str(v)) < 80)
    return f"{str(kind).replace('_', ' ')}: {brief}" if brief else str(kind).replace("_", " ")


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """Events from an events.jsonl file; a torn last line (writer killed mid-write) is skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(event, dict) and "type" in event:
                    yield event
    except FileNotFoundError:
        return


def parse_line(line: str | bytes) -> dict[str, Any] | None:
    """One event from one line of a child's stdout, or None for anything that is not an event."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "type" in event else None


__all__ = [
    "V", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_STOPPED", "EVENT_TYPES", "EventError",
    "check_event", "make_event", "EventSink", "JsonlSink", "stdout_sink",
    "FileSink", "FanOut", "ListSink", "PrettySink", "describe_event", "read_events", "parse_line", "format_bytes",
]
