"""`ft-desk models search|list|info|download|rm`: choose, fetch and manage base models.

  search [QUERY] [--sort downloads|likes|updated]   curated list first without a query or without the Hub
  list                                              models in the local Hugging Face cache, sizes, completeness
  info ID|FOLDER|FILE.gguf                          params, size, license, gated, weights, remote code, fit
  download ID [--allow-pickle] [--trust-remote-code] only the files training needs, with progress, resumable
  rm ID [--yes]                                     delete from the cache after confirmation
  ollama                                            models in Ollama's store: size, quant type, fit, imported
  import FILE.gguf|OLLAMA_NAME                      convert a GGUF / Ollama model once (train does it on first use)

Every subcommand takes --json (one JSON object on stdout, for the TUI); `download --json` (or `--events jsonl`) writes
JSON Lines events instead - download_started, download_progress..., download_finished (the result) - and a
download_failed event before exiting non-zero; `import --json` writes model_import events (a failure ends with
command_failed). Human output: data on stdout, the progress bar on stderr.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ft_desk.trainer.errors import UserError
from ft_desk.trainer.events import EXIT_BAD_INPUT, EXIT_INTERRUPTED, JsonlSink, format_bytes, make_event
from ft_desk.trainer.hub.cache import (
    cached_models,
    hf_cache_dir,
    partial_download_bytes,
    removal_plan,
    remove_model,
    resumable_downloads,
)
from ft_desk.trainer.hub.credentials import redact
from ft_desk.trainer.hub.download import download_model
from ft_desk.trainer.hub.folder_check import check_model_folder
from ft_desk.trainer.hub.search import FitCheck, model_details, search_models
from ft_desk.trainer.limits import int_arg
from ft_desk.trainer.model_sources import describe_model, import_model, ollama_listing

SUBCOMMANDS = ("search", "list", "info", "download", "rm", "ollama", "import")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout (for the TUI)")
        return p

    def fit_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--no-fit", action="store_true", help="skip the fit verdict (no device probe)")
        p.add_argument("--preset", action="append", default=None, metavar="NAME",
                       help="recipe the fit verdict is computed for (default: qlora); repeatable")
        p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                       help="override a config value for the fit verdict, e.g. data.max_length=1024")

    p = add("search", "search the Hub for text-generation models (curated list first without a query)")
    p.add_argument("query", nargs="?", default=None, help="words in the model id; omit for the curated list")
    p.add_argument("--sort", choices=("downloads", "likes", "updated"), default="downloads")
    p.add_argument("--limit", type=int_arg(1, 1000), default=20, help="Hub results to show, 1 to 1000 (default 20)")
    fit_args(p)

    add("list", "list models in the local Hugging Face cache with their sizes")

    p = add("info", "details of one model: params, size, license, gated, weights format, remote code, fit")
    p.add_argument("model_id", metavar="ID")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    fit_args(p)

    p = add("download", "download only the files training needs into the Hugging Face cache")
    p.add_argument("model_id", metavar="ID")
    p.add_argument("--revision", default=None, help="branch, tag or commit to fetch (default: main)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept *.bin (pickle) weights when the model has no safetensors")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accept a model that runs its own Python code; the download pins the reviewed commit")
    p.add_argument("--verify-hashes", action="store_true",
                   help="also re-check the sha256 of files already in the cache (downloaded files are always checked)")
    p.add_argument("--events", choices=("jsonl",), default=None, help="JSON Lines events on stdout (same as --json)")

    p = add("rm", "remove a model from the local Hugging Face cache")
    p.add_argument("model_id", metavar="ID")
    p.add_argument("--revision", default=None, help="remove only this revision (commit or branch)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p = add("ollama", "list the models in Ollama's store (OLLAMA_MODELS or ~/.ollama/models) with their fit")
    fit_args(p)

    p = add("import", "convert a .gguf file or an Ollama model into a model folder once (train does it on first use)")
    p.add_argument("source", metavar="FILE_OR_NAME", help="path to a .gguf file, or an Ollama model name")
    parser.set_defaults(_models_parser=parser)


def run(args: argparse.Namespace) -> int:
    command = getattr(args, "models_command", None)
    if command is None:
        args._models_parser.print_help()
        return 0
    return {"search": _search, "list": _list, "info": _info, "download": _download, "rm": _rm,
            "ollama": _ollama, "import": _import}[command](args)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, default=str))


def _fit_check(args):
    if args.no_fit:
        return None
    return FitCheck.from_presets(args.preset, args.overrides)


def _params(n: int | None) -> str:
    if not n:
        return "?"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}".replace(".0", "")
    return str(n)


def _date(value: str | float | None) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc).strftime("%Y-%m-%d")
    return str(value)[:10]


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------

def _search(args) -> int:
    result = search_models(args.query, sort=args.sort, limit=args.limit, fit=_fit_check(args))
    if args.json:
        _print_json(result)
        return 0
    if result["note"]:
        print(f"note: {result['note']}")
    rows = []
    for m in result["models"]:
        fit = (m.get("fit") or {}).get("verdict") or ""
        flags = " ".join(f for f, on in (("curated", m.get("curated")), ("cached", m.get("cached"))) if on)
        size = ("~" if m.get("size_estimated") else "") + format_bytes(m["size_bytes"]) if m.get("size_bytes") else "?"
        rows.append([m["id"], _params(m.get("params")), size, m.get("license") or "?",
                     "gated" if m.get("gated") else "", _date(m.get("last_modified")), fit, flags])
    if not rows:
        print("no text-generation models found" + (f" for {args.query!r}" if args.query else ""))
        return 0
    print(_table(rows, ["MODEL", "PARAMS", "SIZE", "LICENSE", "GATED", "UPDATED", "FIT", ""]))
    print("\ndetails: ft-desk models info ID    download: ft-desk models download ID")
    return 0


def _list(args) -> int:
    models = cached_models()
    partial = partial_download_bytes()
    resumable = resumable_downloads()
    if args.json:
        _print_json({"cache_dir": str(hf_cache_dir()), "total_bytes": sum(m.size_bytes for m in models),
                     "partial_download_bytes": partial, "resumable_downloads": resumable,
                     "models": [m.to_dict() for m in models]})
        return 0
    for repo_id, size in sorted(resumable.items()):
        print(f"{repo_id}: {format_bytes(size)} downloaded so far; `ft-desk models download {repo_id}` continues "
              f"from there (`ft-desk models rm {repo_id}` removes it)")
    if not models:
        print(f"no models in the Hugging Face cache ({hf_cache_dir()})")
        print("download one with: ft-desk models download ID   (see: ft-desk models search)")
        return 0
    rows = []
    for m in models:
        for i, r in enumerate(m.revisions):
            status = "ok" if r.status.get("complete") else f"incomplete: {r.status.get('problem')}"
            if r.status.get("remote_code"):
                status += " (runs repo code)"
            rows.append([m.repo_id if i == 0 else "", format_bytes(m.size_bytes) if i == 0 else "",
                         r.commit[:12], ",".join(r.refs), _date(r.last_modified), status])
    print(_table(rows, ["MODEL", "SIZE", "COMMIT", "REFS", "MODIFIED", "STATUS"]))
    print(f"\n{len(models)} model(s), {format_bytes(sum(m.size_bytes for m in models))} in {hf_cache_dir()}")
    if partial:
        print(f"{format_bytes(partial)} of unfinished downloads are left in the cache (`hf cache prune` cleans them)")
    return 0


def _print_fields(lines: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")


def _fit_line(fit: dict, model_id: str) -> tuple[str, str]:
    total = f", about {format_bytes(fit['total_bytes'])}" if fit.get("total_bytes") else ""
    reason = f" ({fit['reason']})" if fit.get("reason") else ""
    return "fit", f"{fit.get('verdict')}{total}{reason}; breakdown: ft-desk plan {model_id}"


def _gguf_info(args, details: dict) -> int:
    if args.json:
        _print_json(details)
        return 0
    types = ", ".join(f"{t} x{n}" for t, n in details["tensor_types"].items())
    lines = [("model", details["id"]), ("file", details["path"]), ("architecture", details["architecture"]),
             ("parameters", _params(details["params"])), ("size", format_bytes(details["size_bytes"])),
             ("quant type", f"{details['file_type']} ({types})"), ("weights", details["note"]),
             ("imported", details["folder"] or "not yet: on first use, or now with ft-desk models import")]
    if details.get("system"):
        lines.append(("system prompt", details["system"][:200]))
    if details.get("fit"):
        lines.append(_fit_line(details["fit"], details["id"]))
    _print_fields(lines)
    return 0


def folder_details(path: Path, fit: FitCheck | None) -> dict[str, Any]:
    """`models info` of a model folder on disk (a Hugging Face layout): what check_model_folder found, its size on
    disk, whether it has a chat template, and the fit verdict. Raises ModelError for a folder train would refuse."""
    report = check_model_folder(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    tok_config = path / "tokenizer_config.json"
    template = (path / "chat_template.jinja").is_file() or (
        tok_config.is_file() and "chat_template" in json.loads(tok_config.read_text(encoding="utf-8")))
    out = {"id": str(path), "kind": "folder", **report.to_dict(),
           "size_bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
           "architecture": (config.get("architectures") or [None])[0], "chat_template": template}
    if fit is not None:
        out["fit"] = fit.plan(config, model_name=str(path))
    return out


def _folder_info(args, path: Path) -> int:
    details = folder_details(path, _fit_check(args))
    if args.json:
        _print_json(details)
        return 0
    lines = [("model", details["id"]), ("architecture", details["architecture"] or details["model_type"] or "?"),
             ("parameters", _params(details["params"])), ("size on disk", format_bytes(details["size_bytes"])),
             ("weights", f"{details['weights_format']} ({len(details['weight_files'])} file(s))"),
             ("chat template", "yes" if details["chat_template"] else
              "none: conversations are rendered as plain text")]
    if details.get("fit"):
        lines.append(_fit_line(details["fit"], details["id"]))
    _print_fields(lines)
    return 0


def _info(args) -> int:
    local = describe_model(args.model_id, fit=_fit_check(args))
    if local is not None:
        return _gguf_info(args, local)
    folder = Path(args.model_id).expanduser()
    if folder.is_dir():
        return _folder_info(args, folder)
    details = model_details(args.model_id, args.revision, fit=_fit_check(args))
    if args.json:
        _print_json(details)
        return 0
    if details.get("note"):
        print(f"note: {details['note']}")
    cached = details.get("cached")
    lines = [
        ("model", details["id"]), ("page", details["model_page"]),
        ("commit", details.get("commit") or "?"), ("parameters", _params(details.get("params"))),
        ("download size", format_bytes(details["size_bytes"]) if details.get("size_bytes") is not None else "?"),
        ("license", details.get("license") or "?"),
        ("gated", {True: f"yes ({details.get('gated_mode')})", False: "no"}.get(details.get("gated"), "?")),
        ("last modified", _date(details.get("last_modified")) or "?"),
        ("weights", details.get("weights_format") or "?"),
        ("remote code", details.get("remote_code") or "not needed"),
        ("cached", (cached["path"] + ("" if cached["complete"] else f" (incomplete: {cached['problem']})"))
         if cached else "no"),
    ]
    curated = details.get("curated")
    if curated:
        lines += [("chat template", curated["chat_template"]),
                  ("LoRA targets", ", ".join(curated["lora_target_modules"])),
                  ("max length", str(curated["max_length"])), ("note", curated["note"])]
    if details.get("unsafe_file_names"):
        lines.append(("UNSAFE", f"file names that escape the folder: {details['unsafe_file_names']}"))
    if details.get("fit"):
        lines.append(_fit_line(details["fit"], details["id"]))
    _print_fields(lines)
    return 0


class DownloadBar:
    """Human rendering of download events on stderr: one redrawn bar on a terminal, a line every 5 s otherwise."""

    def __init__(self, stream=None, clock=time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.clock = clock
        self._last_line = float("-inf")
        self._open = False

    def emit(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "download_started":
            self._write(f"downloading {event['repo_id']} at {event['commit'][:12]}: {len(event['files'])} files, "
                        f"{format_bytes(event['total_bytes'])} ({event['weights_format']} weights)\n")
        elif kind == "download_progress":
            total = event["bytes_total"] or 0
            frac = event["bytes_done"] / total if total else 1.0
            bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
            rate = f"{format_bytes(event['rate_bytes_per_s'])}/s" if event.get("rate_bytes_per_s") else "--/s"
            eta = event.get("eta_s")
            eta_txt = f"{int(eta) // 60:02d}:{int(eta) % 60:02d}" if eta is not None else "--:--"
            text = (f"[{bar}] {frac * 100:5.1f}%  {format_bytes(event['bytes_done'])} / {format_bytes(total)}  "
                    f"{rate}  ETA {eta_txt}  {event.get('file') or ''}")
            if self.tty:
                self.stream.write("\r" + text[:120].ljust(120))
                self.stream.flush()
                self._open = True
            elif self.clock() - self._last_line >= 5.0 or event["bytes_done"] >= total:
                self._last_line = self.clock()
                self._write(text + "\n")
        elif kind == "download_finished":
            self._write("")

    def _write(self, text: str) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        self._write("")


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _download(args) -> int:
    jsonl = args.json or args.events == "jsonl"
    sink = JsonlSink(sys.stdout) if jsonl else DownloadBar()
    # The TUI cancels a download with SIGTERM: turn it into KeyboardInterrupt so the download stops cleanly and keeps
    # the partial file the next run continues from.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = download_model(args.model_id, args.revision, allow_pickle=args.allow_pickle,
                                trust_remote_code=args.trust_remote_code, sink=sink,
                                verify_hashes=args.verify_hashes)
    except UserError as err:
        if jsonl:
            sink.emit(make_event("download_failed", status="failed", exit_code=EXIT_BAD_INPUT,
                                 repo_id=args.model_id, error=redact(err.message), hint=redact(err.hint),
                                 cancelled=False))
            err.reported = True  # cli/main.py prints no second failure
        raise
    except KeyboardInterrupt as interrupt:
        if jsonl:
            sink.emit(make_event("download_failed", status="cancelled", exit_code=EXIT_INTERRUPTED,
                                 repo_id=args.model_id, error="download cancelled",
                                 hint="run the same command again: it continues where this download stopped",
                                 cancelled=True))
            interrupt.reported = True  # cli/main.py prints no second failure
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        sink.close()
    if jsonl:
        return 0
    if result["already_cached"]:
        print(f"{result['repo_id']} is already in the cache: {result['path']}")
    else:
        rate = result["bytes_downloaded"] / result["elapsed_s"] if result["elapsed_s"] else 0
        print(f"downloaded {result['repo_id']} ({format_bytes(result['bytes_total'])}, "
              f"{format_bytes(rate)}/s) into {result['path']}")
    if result.get("pinned_revision"):
        print(f"this model runs its own code; train it pinned to the reviewed commit:\n"
              f"  --set model.trust_remote_code=true --set model.revision={result['pinned_revision']}")
    pickle = " --set model.allow_pickle=true" if result.get("weights_format") == "pickle" else ""
    print(f"train with: ft-desk train --set model.name={result['repo_id']}{pickle} --set data.train_file=FILE")
    return 0


def _rm(args) -> int:
    _, freed, commits = removal_plan(args.model_id, args.revision)
    what = f"{args.model_id}" + (f" revision {args.revision}" if args.revision else "")
    if not args.yes:
        if args.json:
            raise UserError(f"not removing {what} without confirmation", hint="add --yes to remove it")
        try:
            answer = input(f"remove {what} ({len(commits)} revision(s), {format_bytes(freed)}) from "
                           f"{hf_cache_dir()}? [y/N] ")
        except EOFError:  # no one to ask (stdin closed)
            raise UserError(f"not removing {what} without confirmation", hint="add --yes to remove it") from None
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    freed = remove_model(args.model_id, args.revision)
    if args.json:
        _print_json({"removed": args.model_id, "revision": args.revision, "commits": commits, "freed_bytes": freed})
    else:
        print(f"removed {what}, freed {format_bytes(freed)}")
    return 0


def _ollama(args) -> int:
    result = ollama_listing(_fit_check(args))
    if args.json:
        _print_json(result)
        return 0
    for problem in result["problems"]:
        print(f"note: {problem}")
    if not result["models"]:
        print(f"no Ollama models in {result['store']}" + ("" if result["store_exists"] else
              " (no store there; set OLLAMA_MODELS to where Ollama keeps its models)"))
        return 0
    rows = []
    for m in result["models"]:
        fit = (m.get("fit") or {}).get("verdict") or ""
        rows.append([m["name"], _params(m.get("params")), format_bytes(m["size_bytes"]), m.get("file_type") or "?",
                     m.get("architecture") or "?", fit, "imported" if m.get("imported") else ""])
    print(_table(rows, ["MODEL", "PARAMS", "SIZE", "QUANT", "ARCH", "FIT", ""]))
    print(f"\n{len(rows)} model(s) in {result['store']}; train one with: ft-desk train --model NAME --data FILE"
          "\n(the weights are dequantized from the GGUF's quant type once, on first use)")
    return 0


def _import(args) -> int:
    sink = JsonlSink(sys.stdout) if args.json else None
    screen = sys.stderr  # bound now: the conversion redirects sys.stderr to keep transformers' output off screen

    def show(event: dict) -> None:
        if sink is not None:
            sink.emit(event)
        else:
            print(event["message"], file=screen, flush=True)

    result = import_model(args.source, on_event=show)
    if sink is not None:
        sink.close()
        return 0
    print(result["folder"])
    print(f"train with: ft-desk train --model {args.source} --data FILE", file=sys.stderr)
    return 0
