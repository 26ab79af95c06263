"""The headless command line: `ft-desk <command> ...`. The TUI launches these same commands as child processes.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; modules keep
heavy imports (torch, transformers) inside functions so `ft-desk --help` stays fast.

One rule for every command, enforced here: a user never sees a traceback. Every failure is one sentence naming
the problem and a `fix:` line, and the exit code says which kind:
  2  bad input - a `UserError` (config, data, model, names), or a command line argparse refuses
  1  failed - anything else (a bug, the environment); its traceback goes to the run's run.log when the command
     names a run folder, else to a log file in ft-desk's log folder (`paths.log_home()`), and the sentence says where
  130  interrupted (Ctrl-C)
A reader that went away (`ft-desk runs | head -1`) ends the command quietly with 141, as a Unix tool killed by
SIGPIPE does. Everything printed is redacted (hub/credentials.redact): a token never reaches the screen.

A machine reader gets every failure as data too, so it never parses stderr: a command that streams events
(`--events jsonl`, or `--json` for eval, export and models download) ends with a `command_failed` event unless
it already emitted its own final event (it then sets `reported = True` on the exception); a one-object `--json`
command prints `{"ok": false, "error": ..., "hint": ..., "exit_code": ...}` instead of its result.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
import tempfile
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

from ft_desk.trainer import paths, run_folder
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.events import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, make_event
from ft_desk.trainer.hub.credentials import redact
from ft_desk.trainer.quiet import quiet_libraries

EXIT_BROKEN_PIPE = 141
"""The reader of stdout went away (128 + SIGPIPE, what a shell shows for a tool killed by the signal)."""


class CommandLineError(UserError):
    """argparse refused the command line (an unknown flag, a bad choice, a value out of bounds)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a refused command line is one sentence (and a fix), not the usage block and an exit."""

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(f"{self.prog}: {message}", hint=f"`{self.prog} --help` lists the arguments")

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
    parser = _Parser(
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
    stdout = sys.stdout  # commands in jsonl mode point sys.stdout at stderr; the failure report goes to the real one
    try:
        return _main(argv, stdout)
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:  # while the commands were being loaded
        _say("ft-desk: interrupted")
        return EXIT_INTERRUPTED
    except Exception as err:  # before any command ran: a broken install (an import failing), say it the same way
        log_file = write_traceback(argparse.Namespace(command="ft-desk"), err)
        error, hint = describe_failure(err, log_file)
        if isinstance(err, ImportError):
            hint = f"reinstall ft-desk and its dependencies in this Python environment; {hint.split('; ')[-1]}"
        _say(redact(f"{error}\n  fix: {hint}"))
        return EXIT_FAILED


def _main(argv: list[str] | None, stdout: TextIO) -> int:
    parser = build_parser()
    raw = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(raw)
    except CommandLineError as err:
        _say(redact(err.full()))
        _report_failure(_guess_args(raw), err, stdout, "failed", err.message, err.hint, EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    quiet_libraries()  # before any command imports torch/transformers: no library bars or warnings on screen
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except BrokenPipeError:
        raise
    except UserError as err:
        if not err.hint:  # every failure says what to do; where a raise site has no better fix, the options do
            err.hint = f"`ft-desk {args.command} --help` explains what it accepts"
        # a token must never reach the screen or a pasted bug report
        _say(redact(err.full()))
        _report_failure(args, err, stdout, "failed", redact(err.message), redact(err.hint) or None, EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as err:
        _say("ft-desk: interrupted")
        _report_failure(args, err, stdout, "cancelled", "interrupted", None, EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug or the environment: one sentence here, the traceback in a log file
        log_file = write_traceback(args, err)
        error, hint = describe_failure(err, log_file)
        _say(redact(f"{error}\n  fix: {hint}"))
        _report_failure(args, err, stdout, "failed", redact(error), redact(hint), EXIT_FAILED)
        return EXIT_FAILED


def _say(text: str) -> None:
    """One message on stderr, prefixed `ft-desk: ` (a closed stderr is not worth a traceback either)."""
    try:
        print(text if text.startswith("ft-desk") else f"ft-desk: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush cannot complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _guess_args(raw: list[str]) -> argparse.Namespace:
    """What a refused command line said about its output mode, for the machine-readable failure."""
    command = next((a for a in raw if not a.startswith("-")), "ft-desk")
    pairs = zip(raw, raw[1:] + [""])
    events = "jsonl" if "--events=jsonl" in raw or ("--events", "jsonl") in pairs else None
    return argparse.Namespace(command=command, events=events, json="--json" in raw,
                              models_command="download" if command == "models" and "download" in raw else None)


def log_folder() -> Path:
    """Where tracebacks of commands without a run folder go: ft-desk's log folder, else the temp folder."""
    for folder in (paths.log_home(), Path(tempfile.gettempdir()) / "ft-desk-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    return Path(tempfile.gettempdir())


def write_traceback(args: argparse.Namespace, err: BaseException) -> Path | None:
    """Append the traceback to the run's run.log (when the command names a run folder), else to a new file in
    the log folder; returns the file, or None when nothing could be written."""
    trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    stamp = datetime.now().astimezone().isoformat(timespec="seconds")
    text = redact(f"{stamp} ft-desk {getattr(args, 'command', '?')} failed:\n{trace}\n")
    candidates: list[Path] = []
    run_dir = getattr(args, "run_dir", None) or getattr(args, "resume", None)
    if run_dir is not None and run_folder.is_run_folder(Path(run_dir)):
        candidates.append(run_folder.log_path(Path(run_dir)))
    candidates.append(log_folder() / f"{datetime.now():%Y%m%d-%H%M%S}-{getattr(args, 'command', 'ft-desk')}-"
                                     f"{os.getpid()}.log")
    for path in candidates:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None


def describe_failure(err: BaseException, log_file: Path | None) -> tuple[str, str]:
    """(sentence, fix) for an exception that is not a UserError."""
    where = f"the traceback is in {log_file}" if log_file else "no log file could be written"
    if isinstance(err, OSError) and err.errno is not None:
        target = f" {err.filename}" if getattr(err, "filename", None) else ""
        if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return f"the disk is full (writing{target})", f"free some space and run the command again; {where}"
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason = "read-only file system" if err.errno == errno.EROFS else "permission denied"
            return f"cannot write{target}: {reason}", f"choose a folder you can write to; {where}"
        if err.errno == errno.ENOTDIR:
            return f"a file is in the way of a folder ({target.strip() or 'a path'})", \
                f"move the file or choose another folder; {where}"
        return f"{err.strerror or type(err).__name__}{target}", f"{where}"
    if isinstance(err, MemoryError):
        return "ran out of memory", f"close other programs or use smaller inputs; {where}"
    text = str(err).splitlines()[0] if str(err) else ""
    return (f"internal error: {type(err).__name__}: {text}".rstrip(": "),
            f"this is a bug in ft-desk; {where}")


def streams_events(args: argparse.Namespace) -> bool:
    """Whether this command line prints JSON-lines events (rather than one JSON object, or text)."""
    if getattr(args, "events", None) == "jsonl":
        return True
    event_commands = args.command in ("eval", "export") or getattr(args, "models_command", None) in ("download",
                                                                                                     "import")
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
