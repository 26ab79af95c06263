"""`ft-desk train` and `ft-desk demo`: build the config from presets and --set overrides, then run.

Exit codes: 0 completed, 1 failed (bug or environment; see run.log), 2 bad input (config, data, model),
3 stopped by SIGINT/SIGTERM after saving a checkpoint (resume with --resume RUN_DIR).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ft_desk.trainer import run_folder
from ft_desk.trainer.demo import is_demo_model
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.events import ListSink, PrettySink, make_event, read_events, stdout_sink
from ft_desk.trainer.hub.cache import find_snapshot
from ft_desk.trainer.hub.gguf_import import imports_dir, read_provenance
from ft_desk.trainer.paths import runs_home
from ft_desk.trainer.presets import load_config
from ft_desk.trainer.training.run import StopFlag, train


def add_arguments(parser: argparse.ArgumentParser, name: str = "train") -> None:
    parser.add_argument("--preset", action="append", default=None, metavar="NAME",
                        help="preset name or .yaml path; repeat to layer (e.g. --preset qlora --preset gpu-8gb)"
                        + (" [default: demo]" if name == "demo" else " [default: demo]"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set lora.r=32 --set optim.lr=1e-4")
    parser.add_argument("--model", help="shortcut for --set model.name=...: a Hub id, a model folder, a .gguf file "
                                        "or an Ollama model (name:tag; imported once on first use)")
    parser.add_argument("--data", help="shortcut for --set data.train_file=...")
    parser.add_argument("--columns", metavar="ROLE=COLUMN,...",
                        help="which data column fills which role, e.g. prompt=question,completion=answer "
                             "(shortcut for --set data.columns=...)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip unreadable data rows and report counts")
    parser.add_argument("--events", choices=["pretty", "jsonl", "none"], default=None,
                        help="jsonl: machine-readable events on stdout (the app uses this); "
                             "pretty: a progress bar (default in a terminal)")
    if name == "train":
        parser.add_argument("--resume", metavar="RUN_DIR", type=Path,
                            help="continue a stopped or crashed run from its last checkpoint")
    else:
        parser.set_defaults(demo=True)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


REAL_DEMO_MODELS = ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct")
"""Real small instruct models `ft-desk demo` uses when one is already on this machine, smallest first."""
REAL_DEMO_PRESET = "demo-real"
GET_REAL_DEMO = ("this demo trains a tiny random model: it shows the pipeline, not useful replies. For a real one, "
                 "get SmolLM2-135M-Instruct once (ft-desk models download HuggingFaceTB/SmolLM2-135M-Instruct, or "
                 "ft-desk train --model path/to/SmolLM2-135M-Instruct.gguf) and run ft-desk demo again")


def real_demo_model() -> str | None:
    """A real small instruct model already on disk - in the Hugging Face cache, or imported from its GGUF (its
    name or file name in the import's provenance) - or None. Never downloads."""
    cached = next((repo for repo in REAL_DEMO_MODELS if find_snapshot(repo) is not None), None)
    if cached is not None:
        return cached
    wanted = [repo.split("/")[1].lower() for repo in REAL_DEMO_MODELS]
    root = imports_dir()
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        provenance = read_provenance(folder) or {}
        names = f"{provenance.get('gguf_name') or ''} {Path(str(provenance.get('source_path') or '')).name}"
        if any(w in names.lower().replace(" ", "-") for w in wanted) and (folder / "config.json").is_file():
            return str(folder)
    return None


def resolve_config(args: argparse.Namespace):
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.data:
        overrides.append(f"data.train_file={args.data}")
    if getattr(args, "columns", None) is not None:
        overrides.append(f"data.columns={args.columns}")
    if args.skip_bad_rows:
        overrides.append("data.skip_bad_rows=true")
    presets = args.preset
    if getattr(args, "demo", False) and not presets and not args.model:
        real = real_demo_model()
        if real is not None:
            presets = [REAL_DEMO_PRESET]
            overrides.insert(0, f"model.name={real}")
    return load_config(presets, overrides)


def run(args: argparse.Namespace) -> int:
    resume = getattr(args, "resume", None)
    cfg = None
    if resume is None:
        cfg = resolve_config(args)
        if args.print_config:
            print(cfg.to_json())
            return 0
    elif args.preset or args.overrides or args.model or args.data or getattr(args, "columns", None):
        raise UserError("--resume continues a run with its saved config; it takes no --preset/--set/--model/--data",
                        hint="start a new run instead to change settings")
    mode = args.events or ("pretty" if sys.stderr.isatty() else "pretty")
    if mode == "jsonl":
        sink = stdout_sink()
    elif mode == "none":
        sink = ListSink()
    else:
        sink = PrettySink(sys.stderr)
    stop = StopFlag()
    stop.install()
    if getattr(args, "demo", False) and mode != "jsonl" and cfg is not None and is_demo_model(cfg.model.name):
        sink.emit(make_event("log", level="info", message=GET_REAL_DEMO))
    code, run_dir = train(cfg, sink, resume_dir=resume, stop=stop)
    sink.close()
    if isinstance(sink, ListSink):  # --events none still says, in one sentence, why a run did not complete
        _print_failure(sink)
    if mode == "pretty" and run_dir is not None:
        _print_summary(run_dir)
    return code


def _print_failure(sink: ListSink) -> None:
    finished = sink.of_type("run_finished")
    if finished and finished[-1].get("error"):
        event = finished[-1]
        hint = f"\n  fix: {event['hint']}" if event.get("hint") else ""
        print(f"ft-desk: {event['error']}{hint}", file=sys.stderr)


def _print_summary(run_dir: Path) -> None:
    """Before/after samples side by side and the validation curve, for a human at a terminal."""
    events = list(read_events(run_folder.events_path(run_dir)))
    evals = [e for e in events if e["type"] == "eval"]
    samples = {(e["phase"], e["index"]): e for e in events if e["type"] == "sample"}
    out = sys.stderr
    if evals:
        curve = "  ".join(f"{e['step']}:{e['val_loss']:.3f}" for e in evals)
        out.write(f"\nvalidation loss by step: {curve}\n")
        if len(evals) > 1:
            first, best = evals[0]["val_loss"], min(e["val_loss"] for e in evals)
            out.write(f"val loss {first:.3f} -> {best:.3f} ({(best - first) / first * 100:+.1f}%)\n")
    indexes = sorted({i for (_, i) in samples})
    for i in indexes:
        before, after = samples.get(("before", i)), samples.get(("after", i))
        ref = (before or after or {}).get("reference", "")
        out.write(f"\nsample {i + 1}\n  expected: {ref[:300]!r}\n")
        if before:
            out.write(f"  before:   {before['output'][:300]!r}\n")
        if after:
            out.write(f"  after:    {after['output'][:300]!r}\n")
    out.write(f"\nrun folder: {run_dir}\n")
    for line in next_steps(run_dir, run_folder.read_state(run_dir).get("status")):
        out.write(line + "\n")
    out.flush()


def next_steps(run_dir: Path, status: str | None) -> list[str]:
    """What to try after a run, as commands to copy: by the run's name when it lives in the runs folder."""
    if status != "completed":
        return [f"resume it with: ft-desk train --resume {run_dir}"] if status == "stopped" else []
    name = run_dir.name if run_dir.resolve().parent == runs_home().resolve() else str(run_dir)
    tries = [(f"ft-desk eval {name}", "base vs tuned on the held-out rows"),
             (f"ft-desk chat {name}", "talk to the tuned model (/base answers with the base model)"),
             (f"ft-desk export {name} --format gguf", "a file for llama.cpp (or: adapter, merged, ollama)"),
             ("ft-desk", "the app: this run on its Evaluate and Export screens")]
    width = max(len(command) for command, _ in tries)
    return ["", "next, try:"] + [f"  {command:<{width}}   {why}" for command, why in tries]
