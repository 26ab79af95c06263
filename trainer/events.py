"""Wire format between the trainer child process and the TUI (and anything else that watches a run).

One event is one JSON object on one line: `{"v": V, "type": ..., "time": unix seconds, ...fields}`.
Adding a field is compatible; renaming or removing one bumps V. Readers ignore types they do not know.
Stdlib only: the TUI imports this module.

Event types and their fields:
  run_started    run_dir, run_name, model, method, device, total_steps, resumed_from_step, config
  data_ready     train_rows, val_rows, train_tokens, truncated, duplicates_dropped, skipped_rows, format
  model_loaded   params, trainable_params, dtype, quantized, load_seconds, memory_bytes
  step           step, total_steps, epoch, loss, lr, grad_norm, tokens, tokens_per_s, elapsed_s, eta_s,
                 memory_bytes, skipped_steps
  eval           step, val_loss, perplexity, best_val_loss, is_best
  sample         phase (before|after), index, prompt, output, reference
  checkpoint     step, path, is_best
  log            level (info|warning|error), message
  run_finished   status (completed|stopped|failed), exit_code, error, hint, best_val_loss, best_step,
                 final_step, adapter_path, elapsed_s
  eval_started, eval_progress, eval_report, eval_finished   `ft-desk eval` (fields: trainer/evaluate.py)
Tools other than training (eval, export, hub download) use the same envelope with their own types.
"""

from __future__ import annotations


import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Protocol, TextIO

V = 1

# Exit codes of `ft-desk train`, documented in the README.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3  # SIGINT/SIGTERM: the current step finished and a checkpoint was saved


def make_event(type_: str, **fields: Any) -> dict[str, Any]:
    return {"v": V, "type": type_, "time": round(time.time(), 3), **fields}


class EventSink(Protocol):
    def emit(self, event: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Writes events as JSON Lines to a text stream (stdout in `--events jsonl` mode), flushing each line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def emit(self, event: dict[str, Any]) -> None:
        try:
            self.stream.write(json.dumps(event, ensure_ascii=False) + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            # The reader went away (TUI closed): the run goes on; events.jsonl still has everything.
            pass

    def close(self) -> None:
        pass


class FileSink:
    """Appends events to RUN_DIR/events.jsonl; each line is flushed so a re-attaching reader sees it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def emit(self, event: dict[str, Any]) -> None:
        self._file.write(json.dumps(event, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except (OSError, ValueError):
            pass
        self._file.close()


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
        tail = f" ({', '.join(extra)})" if extra else ""
        return (
            f"data: {event['format']} format, {event['train_rows']} train / {event['val_rows']} val rows, "
            f"{event['train_tokens']} train tokens{tail}"
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
    "V", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_STOPPED", "make_event", "EventSink", "JsonlSink",
    "FileSink", "FanOut", "ListSink", "PrettySink", "describe_event", "read_events", "parse_line", "format_bytes",
]
