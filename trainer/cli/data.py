"""`ft-desk data check FILE`: lint a data file against a model's tokenizer before training on it.

Prints the detected format, row counts, a token-length histogram against data.max_length, truncated rows,
duplicates, empty turns, broken rows with file:line, and a sample rendered as training sees it with the
trained tokens marked (`--samples`: also the longest, shortest and a truncated row). `--json` prints
`LintReport.to_dict()` (or {"ok": false, "error": ...}) as one object.
Exit 0 when training could start on the file, 2 when it has broken rows (unless --skip-bad-rows) or cannot be
used at all. Only the tokenizer is loaded, never the model weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from ft_desk.quant.device import resolve_device
from ft_desk.trainer.config import choices
from ft_desk.trainer.data.formats import resolve_data_path
from ft_desk.trainer.data.lint import lint_file
from ft_desk.trainer.errors import DataError, UserError
from ft_desk.trainer.events import EXIT_BAD_INPUT, EXIT_OK
from ft_desk.trainer.hub.gguf_import import load_gguf_tokenizer
from ft_desk.trainer.hub.resolve import gguf_source, imported_dir, resolve_model_dir
from ft_desk.trainer.planning import local_model_config
from ft_desk.trainer.presets import load_config
from ft_desk.trainer.recipe_sizing import length_counts, size_batches
from ft_desk.trainer.training.model import load_tokenizer

BAR_WIDTH = 40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    check = sub.add_parser(
        "check",
        help="lint a data file: format, token lengths vs max length, duplicates, broken rows, rendered samples",
        description=(
            "Lint a training data file (.jsonl, .json, .csv, .parquet, .arrow, gzipped .jsonl/.json/.csv, or a "
            "datasets save_to_disk / cache folder) for a model. Formats: text, prompt/completion, Alpaca "
            "(instruction/input/output), ShareGPT (conversations with from/value), chat messages (role/content); "
            "other column names are mapped with --columns. Exit 0 when the file is usable, 2 when it has broken "
            "rows."
        ),
    )
    check.add_argument("file", help="the data file, or `demo` for the bundled sample")
    check.add_argument("--model", help="model whose tokenizer and chat template to use (default: the preset's)")
    check.add_argument("--preset", action="append", default=[], help="preset(s) to layer, in order (default: demo)")
    check.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set data.max_length=1024 (repeatable)")
    check.add_argument("--format", choices=choices("data.format"), help="row format (default: detect it)")
    check.add_argument("--columns", metavar="ROLE=COLUMN,...",
                       help="which column fills which role, e.g. prompt=question,completion=answer (data.columns)")
    check.add_argument("--max-length", type=int, help="longest sequence in tokens (data.max_length)")
    check.add_argument("--skip-bad-rows", action="store_true",
                       help="broken rows are reported but do not fail the check (as training would skip them)")
    check.add_argument("--samples", action="store_true",
                       help="show every picked sample (first row, longest, shortest, truncated), not just the first")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of the report")


def _config(args):
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.format:
        overrides.append(f"data.format={args.format}")
    if args.columns is not None:
        overrides.append(f"data.columns={args.columns}")
    if args.max_length is not None:
        overrides.append(f"data.max_length={args.max_length}")
    if args.skip_bad_rows:
        overrides.append("data.skip_bad_rows=true")
    return load_config(args.preset or None, overrides)


def check_tokenizer(model_cfg):
    """The tokenizer of a model (local folder, HF cache or the demo) exactly as training sets it up; no weights.
    A GGUF or Ollama base not imported yet is not converted for this: its tokenizer is read from the GGUF."""
    source = None if imported_dir(model_cfg.name) else gguf_source(model_cfg.name)
    if source is not None:
        tokenizer = load_gguf_tokenizer(source[0])
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # as load_tokenizer sets it up for training
        return tokenizer
    return load_tokenizer(resolve_model_dir(model_cfg), model_cfg)


def run(args) -> int:
    if args.data_command == "check":
        return _check(args)
    raise UserError(f"unknown data subcommand {args.data_command!r}", "use: ft-desk data check FILE")


def _check(args) -> int:
    try:
        cfg = _config(args)
        path = resolve_data_path(args.file)
        tokenizer = check_tokenizer(cfg.model)
        report = lint_file(path, tokenizer, cfg.data)
        # The model's context bounds auto max length; the demo model is built by check_tokenizer already.
        preview = recipe_preview(cfg, report, local_model_config(cfg.model.name, cfg.model.revision) or {})
    except UserError as err:
        if not args.json:
            raise
        where = err.where if isinstance(err, DataError) else None
        print(json.dumps({"ok": False, "error": str(err), "where": where, "hint": err.hint,
                          "exit_code": EXIT_BAD_INPUT}))
        err.reported = True  # cli/main.py adds the stderr line, not a second JSON object
        raise
    ok = report.ok(cfg.data.skip_bad_rows)
    if args.json:
        # "hint" mirrors the failure form ({"ok", "error", "where", "hint"}) so a reader handles both alike.
        out = {"ok": ok, "model": cfg.model.name, **report.to_dict(), "hint": report.error_hint,
               "recipe": {**preview, "sizing": preview["sizing"].to_dict()} if preview else None}
        print(json.dumps(out, ensure_ascii=False))
    else:
        colour = sys.stdout.isatty()
        print(format_report(report, cfg.model.name, cfg.data.skip_bad_rows, colour, all_samples=args.samples))
        if preview is not None:
            print(f"recipe (about; the run prints the exact figures): {preview['sizing'].summary()}")
            if preview["sizing"].warning:
                print(f"warning: {preview['sizing'].warning}")
    return EXIT_OK if ok else EXIT_BAD_INPUT


def recipe_preview(cfg, report, model_config: dict) -> dict | None:
    """What the run would be sized to from this file with this recipe (recipe_sizing.py), or None without token
    counts: {"sizing", "length_counts", "device", "context"} - the TUI re-sizes from the last three as the recipe
    is edited. An estimate: validation rows are taken off by count, as the run's split takes them."""
    if not report.lengths:
        return None
    lengths = list(report.lengths)
    if not cfg.data.valid_file:
        n = len(lengths)
        held = min(round(cfg.data.val_fraction * n), cfg.data.max_val_rows)
        held = max(0, min(max(held, 1) if cfg.data.val_fraction > 0 and n >= 2 else held, n - 1))
        lengths = lengths[held:]
    context = model_config.get("max_position_embeddings")
    context = context if isinstance(context, int) else None
    device = cfg.train.device if cfg.train.device != "auto" else resolve_device("auto")
    _, sizing = size_batches(cfg, lengths, device, context)
    return {"sizing": sizing, "length_counts": length_counts(lengths), "device": device, "context": context}


def _histogram_lines(report) -> list[str]:
    peak = max((b["count"] for b in report.histogram), default=0) or 1
    lines = []
    for bucket in report.histogram:
        label = f"{bucket['lo']}-{bucket['hi']}" if bucket["hi"] is not None else f">{report.max_length}"
        bar = "#" * math.ceil(bucket["count"] * BAR_WIDTH / peak) if bucket["count"] else ""
        over = "  (truncated)" if bucket["hi"] is None and bucket["count"] else ""
        lines.append(f"  {label:>11} | {bar:<{BAR_WIDTH}} {bucket['count']}{over}")
    return lines


def _sample_text(segments, colour: bool) -> str:
    out = []
    for text, trained in segments:
        if not trained:
            out.append(text)
        elif colour:
            out.append(f"\x1b[1;32m{text}\x1b[0m")
        else:
            out.append(f"[[{text}]]")
    return "".join(out)


def _locations(report, items, count: int) -> str:
    """`at 12, 40 (= 3), ...`: locations inside the checked file shown by line (or #index) only."""

    def short(where: str) -> str:
        prefix = f"{report.path}:"
        return where[len(prefix):] if where.startswith(prefix) else where

    shown = [short(i) if isinstance(i, str) else f"{short(i['where'])} (= {short(i['same_as'])})" for i in items]
    more = ", ..." if count > len(shown) else ""
    return "at " + ", ".join(shown) + more


def format_report(report, model: str, skip_bad_rows: bool, colour: bool = False, all_samples: bool = False) -> str:
    """The human-readable report."""
    lines = [f"{report.path}: {report.format} format, {report.rows} rows, {report.usable_rows} usable"]
    if report.columns_note:
        lines.append(f"columns: {report.columns_note}")
    if report.error and report.columns:
        lines.append("columns found: " + ", ".join(f"{c['name']!r} (e.g. {c['sample']!r})" for c in report.columns))
    if report.rendering:
        if report.format == "text":
            rendering, target = "raw text + EOS", "every token"
        else:
            rendering = "the model's chat template" if report.rendering == "chat_template" else "plain text"
            target = "assistant replies only" if report.train_on == "assistant" else "every token"
        lines.append(f"model {model}: rendered with {rendering}; loss on {target}; max length {report.max_length}")
    if report.token_stats:
        s = report.token_stats
        lines.append(
            f"tokens per row: min {s['min']}, median {s['median']}, mean {s['mean']}, p95 {s['p95']}, max {s['max']}"
            f"  ({report.total_tokens} tokens, {report.trained_tokens} trained)"
        )
        lines += _histogram_lines(report)
    if report.rendering:
        lines.append(f"truncated rows: {report.truncated}" + (
            f" ({_locations(report, report.truncated_where, report.truncated)})" if report.truncated else ""))
    if report.no_target:
        lines.append(f"rows with no reply within max length (dropped in training): {report.no_target}"
                     f" ({_locations(report, report.no_target_where, report.no_target)})")
    action = "dropped in training" if report.dedupe else "kept: data.dedupe is off"
    lines.append(f"duplicates: {report.duplicates}" + (
        f" ({action}; {_locations(report, report.duplicates_where, report.duplicates)})" if report.duplicates else ""))
    lines.append(f"empty turns: {report.empty_turns}" + (
        f" ({_locations(report, report.empty_turns_where, report.empty_turns)})" if report.empty_turns else ""))
    lines.append(f"broken rows: {report.broken_count}" + (
        " (" + ", ".join(f"{k}: {n}" for k, n in sorted(report.broken_by_reason.items())) + ")"
        if report.broken_count else ""))
    for row in report.broken_rows:
        lines.append(f"  {row['where']}: {row['reason']}")
    if report.broken_count > len(report.broken_rows):
        lines.append(f"  ... and {report.broken_count - len(report.broken_rows)} more")
    mark = "green" if colour else "inside [[ ]]"
    shown = report.samples if all_samples else report.samples[:1]
    for sample in shown:
        cut = ", cut at max length" if sample["truncated"] else ""
        lines.append(f"sample: {sample['label']}, {sample['where']} ({sample['tokens']} tokens, "
                     f"{sample['trained_tokens']} trained, shown {mark}{cut}):")
        lines.append(_sample_text(sample["segments"], colour))
    others = report.samples[len(shown):]
    if others:
        lines.append("other samples: " + ", ".join(f"{s['label']} ({s['where']})" for s in others)
                     + " - add --samples to show them")
    if report.error:
        lines.append(f"not usable: {report.error}" + (f"\n  fix: {report.error_hint}" if report.error_hint else ""))
    elif report.broken_count and not skip_bad_rows:
        lines.append("not usable as is: fix the broken rows, or train with --set data.skip_bad_rows=true")
    elif report.broken_count:
        lines.append(f"usable: {report.broken_count} broken rows will be skipped")
    else:
        lines.append("usable: ready to train")
    return "\n".join(lines)

