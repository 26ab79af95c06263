"""The headless command line: `ft-desk <command> ...`. The TUI launches these same commands as child processes.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; modules keep
heavy imports (torch, transformers) inside functions so `ft-desk --help` stays fast. A `UserError` becomes one
readable message on stderr (exit 2); any other exception is a bug and is printed with its traceback.

A machine reader gets every failure as data too, so it never parses stderr: a command that streams events
(`--events jsonl`, or `--json` for eval, export and models download) ends with a `command_failed` event unless
it already emitted its own final event (it then sets `reported = True` on the exception); a one-object `--json`
command prints `{"ok": false, "error": ..., "hint": ..., "exit_code": ...}` instead of its result.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, TextIO

from ft_desk.trainer.errors import UserError
from ft_desk.trainer.events import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, make_event
from ft_desk.trainer.hub.credentials import redact
from ft_desk.trainer.quiet import quiet_libraries

# command -> (module in this package, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("train", "run the demo: a tiny local model fine-tuned on bundled data, offline"),
    "train": ("train", "fine-tune a model (QLoRA by default); --resume RUN_DIR continues a run"),
    "runs": ("runs", "list runs and their status"),
    "chat": ("chat", "chat with a trained model (adapter on, or off with /base) in the terminal"),
    "eval": ("eval", "base vs tuned on held-out examples: task metrics, retention check, report"),
    "data": ("data", "check a data file: format, token lengths, duplicates, broken rows"),
    "plan": ("plan", "will it fit? peak memory of a run from config.json alone, and how to make it fit"),
    "doctor": ("doctor", "this machine: OS, Python, libraries, CUDA/MPS/CPU, RAM, whether 4-bit works"),
    "models": ("models", "search, inspect, download, list and remove base models (Hub + local cache)"),
    "export": ("export", "export a run as adapter, merged model, GGUF or Ollama, verified against it"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ft-desk",
        description="Fine-tune an open LLM on this machine. Run without arguments for the terminal app.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"{__package__}.{module_name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p, name) if _takes_name(module) else module.add_arguments(p)
        p.set_defaults(_module=module.__name__)
    return parser


def _takes_name(module) -> bool:
    import inspect

    return len(inspect.signature(module.add_arguments).parameters) == 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    quiet_libraries()  # before any command imports torch/transformers: no library bars or warnings on screen
    module = importlib.import_module(args._module)
    stdout = sys.stdout  # commands in jsonl mode point sys.stdout at stderr; the failure report goes to the real one
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        # a token must never reach the screen or a pasted bug report
        print(f"ft-desk: {redact(err.full())}", file=sys.stderr)
        _report_failure(args, err, stdout, "failed", redact(err.message), redact(err.hint) or None, EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as err:
        print("ft-desk: interrupted", file=sys.stderr)
        _report_failure(args, err, stdout, "cancelled", "interrupted", None, EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug: the traceback still goes to stderr, the reader gets the failure as data
        _report_failure(args, err, stdout, "failed", redact(f"internal error: {type(err).__name__}: {err}"),
                        "this is a bug in ft-desk; the traceback is on stderr", EXIT_FAILED)
        raise


def streams_events(args: argparse.Namespace) -> bool:
    """Whether this command line prints JSON-lines events (rather than one JSON object, or text)."""
    if getattr(args, "events", None) == "jsonl":
        return True
    event_commands = args.command in ("eval", "export") or getattr(args, "models_command", None) == "download"
    return bool(getattr(args, "json", False)) and event_commands


def _report_failure(args: argparse.Namespace, err: BaseException, stdout: TextIO, status: str, error: str,
                    hint: str | None, exit_code: int) -> None:
    """The failure as data on stdout, for a machine reader (nothing in human mode, or when the command did it)."""
    if getattr(err, "reported", False):
        return
    out: dict[str, Any]
    if streams_events(args):
        out = make_event("command_failed", command=args.command, status=status, error=error, hint=hint,
                         exit_code=exit_code)
    elif getattr(args, "json", False):
        out = {"ok": False, "error": error, "hint": hint, "exit_code": exit_code}
    else:
        return
    try:
        stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
        stdout.flush()
    except (BrokenPipeError, ValueError):
        pass  # the reader went away


if __name__ == "__main__":  # python -m ft_desk.trainer.cli.main (or python -m ft_desk.trainer.cli)
    sys.exit(main())
