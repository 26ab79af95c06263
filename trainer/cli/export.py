"""`ft-desk export RUN_DIR --format adapter|merged|gguf|ollama`: a trained run as files other tools load, verified.

Human output: progress lines on stderr, the fidelity report on stdout. `--json` (or `--events jsonl`): JSON-lines
events on stdout - export_started, export_progress..., export_finished (the result, with the fidelity report) -
for the TUI. Exit status: 0 exported (verified, or --no-verify), 1 exported but verification failed (the files
are kept and fidelity.json says why), 2 bad input.

`--gguf-type q4_k_m` is quantized by llama.cpp itself and needs llama-cpp-python; without it the type is refused with
the install command. With llama-cpp-python installed, every GGUF export is also run in llama.cpp and judged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ft_desk.trainer.errors import UserError
from ft_desk.trainer.events import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, format_bytes, make_event, stdout_sink
from ft_desk.trainer.export.pipeline import ExportRequest, export_run
from ft_desk.trainer.export.verify import describe
from ft_desk.trainer.export_formats import FORMAT_NAMES, GGUF_TYPES, MERGED_DTYPES
from ft_desk.trainer.run_folder import resolve_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run folder or a run's name (see: ft-desk runs)")
    p.add_argument("--format", required=True, choices=FORMAT_NAMES,
                   help="adapter: peft folder; merged: standalone safetensors model; gguf: one .gguf file; "
                        "ollama: GGUF + Modelfile")
    p.add_argument("--out", type=Path, default=None,
                   help="new or empty folder to write (default: RUN_DIR/exports/<format>-<time>)")
    p.add_argument("--dtype", choices=MERGED_DTYPES, default="bf16", help="merged weights dtype (default bf16)")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default=None,
                   help="GGUF tensor type (default f16 for gguf, q8_0 for ollama); q4_k_m needs llama-cpp-python")
    p.add_argument("--merge-into", choices=("quantized", "original"), default="quantized",
                   help="QLoRA runs: merge into the NF4 weights the adapter trained against (default) or into the "
                        "original 16-bit weights; the report shows which is closer")
    p.add_argument("--checkpoint", default="best", help="best (default), last, or a step number")
    p.add_argument("--name", default=None, help="model name for `ollama create` (default: the run name)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reloading the export and comparing it with the trained model")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty folder or through a symlink (never deletes files ft-desk did not "
                        "write)")
    p.add_argument("--json", action="store_true", help="JSON-lines events on stdout, the last one is the result")
    p.add_argument("--events", choices=("jsonl",), default=None, help="same as --json")


class _HumanSink:
    """Progress on stderr, one line per phase change, per note, or every 10%."""

    def __init__(self) -> None:
        self.last: tuple[str, int, str | None] | None = None

    def emit(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "export_started":
            step = f" (step {event['step']})" if event.get("step") is not None else ""
            print(f"exporting {event['run_dir']} checkpoint {event['checkpoint']}{step} as {event['format']}\n"
                  f"  into {event['out_dir']}", file=sys.stderr)
        elif kind == "export_progress":
            total = event.get("total") or 0
            pct = int(100 * event.get("done", 0) / total) // 10 * 10 if total else -1
            key = (event["phase"], pct, event.get("message") if pct < 0 else None)
            if key != self.last:
                self.last = key
                where = f" {pct}%" if pct >= 0 else ""
                print(f"  {event['phase']}{where}: {event.get('message', '')}", file=sys.stderr)
        elif kind == "log":
            print(event.get("message", ""), file=sys.stderr)

    def close(self) -> None:
        pass


def report_lines(event: dict[str, Any]) -> list[str]:
    """The export_finished event as the report printed for a person."""
    lines = [f"exported {event['format']} to {event['out_dir']} ({format_bytes(event.get('bytes'))}, "
             f"{len(event.get('files') or [])} files) in {event.get('elapsed_s')} s"]
    facts = event.get("facts") or {}
    if facts.get("tensor_types"):
        types = ", ".join(f"{n} {t}" for t, n in sorted(facts["tensor_types"].items(), key=lambda kv: -kv[1]))
        made = f", quantized by {facts['quantized_by']}" if facts.get("quantized_by") else ""
        lines.append(f"GGUF {facts['file']}: tensors stored as {types}{made}")
    fidelity = event.get("fidelity")
    if fidelity is None:
        lines.append("not verified (--no-verify)")
    else:
        ref = fidelity["reference"]
        lines.append(f"fidelity: {'PASS' if fidelity['passed'] else 'FAIL'} (reference: {ref['model']} on "
                     f"{ref['device']}; {ref['tokens']} validation tokens, val loss {ref['val_loss']:.4f})")
        titles = {"adapter_vs_trained": "adapter reloaded with peft vs trained",
                  "merged_vs_trained": "merged model vs trained",
                  "quantized_merge_vs_trained": "merge into NF4 weights vs trained (for comparison)",
                  "gguf_vs_merged": "GGUF (transformers' loader) vs merged",
                  "gguf_vs_trained": "GGUF vs trained",
                  "gguf_readback": "GGUF tensors read back vs merged",
                  "llama_cpp": "GGUF run by llama.cpp vs trained"}
        for key, comp in fidelity["comparisons"].items():
            lines += ["  " + line for line in describe(comp, titles.get(key, key))]
        gens = ref.get("generations") or []
        if gens:
            lines.append(f"  trained model's own greedy replies stop at the turn end on "
                         f"{sum(1 for g in gens if g['stopped'])}/{len(gens)} held-out prompts")
        lines.append(f"  full report: {Path(event['out_dir']) / 'fidelity.json'}")
    for note in event.get("notes") or []:
        lines.append(f"note: {note}")
    if event.get("command") and event.get("passed") is False:
        lines.append("next: the export failed its own check, so it is not ready to use; look at fidelity.json, and "
                     "try a wider type (--gguf-type f16) or --format merged")
    elif event.get("command"):
        lines.append(f"next: {event['command']}")
    return lines


def run(args: argparse.Namespace) -> int:
    machine = bool(args.json or args.events)
    if machine:
        sink: Any = stdout_sink()
    else:
        sink = _HumanSink()
    try:
        run_dir = resolve_run(args.run_dir)
    except UserError as err:
        if machine:
            sink.emit(make_event("export_finished", status="failed", exit_code=EXIT_BAD_INPUT,
                                 out_dir=str(args.out or ""), files=[], bytes=0, passed=None, fidelity=None,
                                 notes=[], command=None, elapsed_s=None, format=args.format, error=err.message,
                                 hint=err.hint))
            err.reported = True
        raise
    request = ExportRequest(run_dir=run_dir, format=args.format, out=args.out, dtype=args.dtype,
                            gguf_type=args.gguf_type, merge_into=args.merge_into, checkpoint=str(args.checkpoint),
                            verify=args.verify, force=args.force, name=args.name)
    try:
        event = export_run(request, sink)
    except UserError as err:
        if machine:
            sink.emit(make_event("export_finished", status="failed", exit_code=EXIT_BAD_INPUT,
                                 out_dir=str(args.out or ""), files=[], bytes=0, passed=None, fidelity=None,
                                 notes=[], command=None, elapsed_s=None, format=args.format, error=err.message,
                                 hint=err.hint))
            err.reported = True  # cli/main.py prints no second failure
        raise
    if not machine:
        print("\n".join(report_lines(event)))
    return EXIT_FAILED if event.get("passed") is False else EXIT_OK
