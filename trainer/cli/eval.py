"""`ft-desk eval RUN_DIR`: base vs tuned on held-out examples, task metrics, retention check, report files.

Human mode (default): progress on stderr, the report table on stdout. `--json` (same as `--events jsonl`):
JSON Lines events on stdout - eval_started, eval_progress..., eval_report, then eval_finished, whose fields are the
result (report paths, metrics, retention, notes); a failure ends with eval_finished status=failed before the
non-zero exit. What is measured: trainer/evaluate/run.py; the event fields: their declarations in trainer/events.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ft_desk.trainer.columns import columns_setting
from ft_desk.trainer.config import choices
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.evaluate.report import terminal
from ft_desk.trainer.evaluate.run import EvalOptions, evaluate_run, parse_metrics, result_summary
from ft_desk.trainer.events import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, make_event, stdout_sink
from ft_desk.trainer.limits import MAX_NEW_TOKENS, float_arg, int_arg
from ft_desk.trainer.run_folder import resolve_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run folder or a run's name (see: ft-desk runs)")
    parser.add_argument("--data", metavar="FILE",
                        help="held-out examples in any supported format [default: RUN_DIR/data/val.jsonl]")
    parser.add_argument("--format", choices=choices("data.format"), default="auto",
                        help="row format of the held-out file [default: auto]")
    parser.add_argument("--columns", metavar="ROLE=COLUMN,...", default="",
                        help="which column of --data fills which role, e.g. prompt=question,completion=answer")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or a step number")
    parser.add_argument("--metrics", metavar="LIST",
                        help="comma-separated: loss,exact,rouge,chrf,bleu,json,regex,stop,length,semantic,retention "
                             "[default: all that apply]")
    parser.add_argument("--json-schema", metavar="FILE", help="JSON Schema the outputs should match (adds json)")
    parser.add_argument("--regex", metavar="PATTERN", help="pattern the outputs should match (Python re.search)")
    parser.add_argument("--max-new-tokens", type=int_arg(1, MAX_NEW_TOKENS), metavar="N",
                        help="generation limit [default: room for the longest reference]")
    parser.add_argument("--batch-size", type=int_arg(1, 4096), default=8, metavar="N",
                        help="prompts per batch, 1 to 4096 [default: 8]")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float_arg(0.0, 100.0), default=0.7, help="with --sample [default: 0.7]")
    parser.add_argument("--top-p", type=float_arg(0.0, 1.0), default=0.95, help="with --sample [default: 0.95]")
    parser.add_argument("--seed", type=int_arg(0, 2**32 - 1), default=0,
                        help="with --sample: base and tuned use the same seed")
    parser.add_argument("--limit", type=int_arg(1, 10_000_000), metavar="N", help="evaluate only the first N examples")
    parser.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default=None,
                        help="where to run [default: the run's train.device]")
    parser.add_argument("--threads", type=int_arg(0, 1024), metavar="N",
                        help="CPU threads for torch [default: the run's train.threads; 0: the free cores]")
    parser.add_argument("--probe", metavar="FILE",
                        help="plain-text retention probe, one passage a line [default: the shipped English probe]")
    parser.add_argument("--events", choices=("pretty", "jsonl"), default=None,
                        help="jsonl: events on stdout (the app uses this); pretty: progress on stderr [default]")
    parser.add_argument("--json", action="store_true", help="JSON Lines events on stdout, the last one the result")


class ProgressLines:
    """eval_* events as short lines on a terminal (stderr): phases, one line per finished phase."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self._open = False

    def _write(self, text: str, transient: bool = False) -> None:
        if transient and self.tty:
            self.stream.write("\r" + text.ljust(78))
            self._open = True
        elif transient:
            return
        else:
            if self._open:
                self.stream.write("\n")
                self._open = False
            self.stream.write(text + "\n")
        self.stream.flush()

    def emit(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "eval_started":
            ck = event["checkpoint"]
            self._write(f"evaluating {event['run_name']} (checkpoint {ck['requested']}: {ck['folder']}) on "
                        f"{event['examples']} examples, {event['device']}")
        elif kind == "eval_progress":
            if event["phase"] == "load":
                self._write("loading the model…")
                return
            text = (f"  {event['model']:5} {event['phase']:9} {event['done']}/{event['total']}  "
                    f"{event['elapsed_s']:.0f}s")
            self._write(text, transient=event["done"] < event["total"])
        # A failure is not written here: cli/main.py prints its one sentence and fix.

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def options_from(args: argparse.Namespace):
    return EvalOptions(checkpoint=str(args.checkpoint), data=args.data, format=args.format,
                       columns=columns_setting(args.columns),
                       metrics=parse_metrics(args.metrics), json_schema=args.json_schema, regex=args.regex,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, sample=args.sample,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed, limit=args.limit,
                       device=args.device, threads=args.threads, probe=args.probe)


def run(args: argparse.Namespace) -> int:
    jsonl = args.json or args.events == "jsonl"
    sink = stdout_sink() if jsonl else ProgressLines(sys.stderr)
    started = time.time()
    try:
        options = options_from(args)
        report = evaluate_run(resolve_run(args.run_dir), options, sink)
    except UserError as err:
        sink.emit(make_event("eval_finished", status="failed", exit_code=EXIT_BAD_INPUT, error=err.message,
                             hint=err.hint or None, elapsed_s=round(time.time() - started, 3)))
        err.reported = jsonl  # cli/main.py prints no second failure
        sink.close()
        raise
    except BaseException as exc:  # a bug or the environment: the reader still gets a final event
        if not isinstance(exc, KeyboardInterrupt):
            sink.emit(make_event("eval_finished", status="failed", exit_code=EXIT_FAILED,
                                 error=f"internal error: {type(exc).__name__}: {exc}", hint=None,
                                 elapsed_s=round(time.time() - started, 3)))
            exc.reported = jsonl
        sink.close()
        raise
    sink.emit(make_event("eval_finished", status="completed", exit_code=EXIT_OK, error=None, hint=None,
                         elapsed_s=round(time.time() - started, 3), **result_summary(report)))
    sink.close()
    if not jsonl:
        print(terminal(report))
    return EXIT_OK
