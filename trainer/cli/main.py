"""The headless command line: `ft-desk <command> ...`. The TUI launches these same commands as child processes.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; modules keep
heavy imports (torch, transformers) inside functions so `ft-desk --help` stays fast. A `UserError` becomes one
readable message on stderr (exit 2); any other exception is a bug and is printed with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ft_desk.trainer.errors import UserError
from ft_desk.trainer.events import EXIT_BAD_INPUT

# command -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ft_desk.trainer.cli.train", "run the demo: a tiny local model fine-tuned on bundled data, offline"),
    "train": ("ft_desk.trainer.cli.train", "fine-tune a model (QLoRA by default); --resume RUN_DIR continues a run"),
    "runs": ("ft_desk.trainer.cli.runs", "list runs and their status"),
    "chat": ("ft_desk.trainer.cli.chat", "chat with a trained model (adapter on, or off with /base) in the terminal"),
    "eval": ("ft_desk.trainer.cli.eval", "base vs tuned on held-out examples: task metrics, retention check, report"),
    "data": ("ft_desk.trainer.cli.data", "check a data file: format, token lengths, duplicates, broken rows"),
    "plan": ("ft_desk.trainer.cli.plan", "will it fit? peak memory of a run from config.json alone, and how to make it fit"),
    "doctor": ("ft_desk.trainer.cli.doctor", "this machine: OS, Python, libraries, CUDA/MPS/CPU, RAM, whether 4-bit works"),
    "models": ("ft_desk.trainer.cli.models", "search, inspect, download, list and remove base models (Hub + local cache)"),
    "export": ("ft_desk.trainer.cli.export", "export a run as adapter, merged model, GGUF or Ollama, verified against it"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ft-desk",
        description="Fine-tune an open LLM on this machine. Run without arguments for the terminal app.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p, name) if _takes_name(module) else module.add_arguments(p)
        p.set_defaults(_module=module_name)
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
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        from ft_desk.trainer.hub.credentials import redact  # a token must never reach the screen or a pasted bug report

        print(f"ft-desk: {redact(err.full())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("ft-desk: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m ft_desk.trainer.cli.main (or python -m ft_desk.trainer.cli)
    sys.exit(main())
