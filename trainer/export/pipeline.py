"""One export from start to finish: read the run, check the target, write into a staging folder, verify, move
into place. `ft-desk export` (cli/export.py) calls `export_run`, and the TUI runs that command as a child process;
progress and the result go out as events (export_started, export_progress, export_finished, plus log; their fields
are declared in trainer/events.py) on the sink passed in.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ft_desk.quant.gguf_tensors import LLAMA_CPP_TYPES
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.events import EXIT_FAILED, EXIT_OK, EventSink, make_event
from ft_desk.trainer.export import llamacpp
from ft_desk.trainer.export import verify as v
from ft_desk.trainer.export.adapter import export_adapter
from ft_desk.trainer.export.gguf_writer import bytes_per_weight, export_gguf, readback_check
from ft_desk.trainer.export.llamacpp import require
from ft_desk.trainer.export.merged import export_merged, training_dtypes
from ft_desk.trainer.export.ollama import write_modelfile
from ft_desk.trainer.export.safetensors_io import read_header
from ft_desk.trainer.export.safety import Staging, check_target, export_lock
from ft_desk.trainer.export.source import ADAPTER_WEIGHTS, base_shards, load_run_tokenizer, open_run
from ft_desk.trainer.export.verify import VERIFY_LOGPROB_BYTES
from ft_desk.trainer.export_formats import FORMAT_NAMES, GGUF_FORMATS, default_gguf_type
from ft_desk.trainer.limits import check_ollama_name, check_text, export_file_stem
from ft_desk.trainer.run_folder import slug

FIDELITY_FILE = "fidelity.json"


@dataclass(frozen=True)
class ExportRequest:
    run_dir: Path
    format: str
    out: Path | None = None
    dtype: str = "bf16"
    """Merged weights: bf16 or fp16."""
    gguf_type: str | None = None
    """GGUF tensor type; None picks f16 for gguf and q8_0 for ollama."""
    merge_into: str = "quantized"
    checkpoint: str = "best"
    verify: bool = True
    force: bool = False
    name: str | None = None
    """Model name for `ollama create`."""
    extra: dict[str, Any] = field(default_factory=dict)


def default_out(request: ExportRequest) -> Path:
    base = Path(request.run_dir).expanduser() / "exports" / f"{request.format}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = base, 1
    while path.exists() or path.is_symlink():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _params_bytes(source) -> int:
    """Bytes of the base weights at 2 bytes per parameter (from the safetensors headers, no weights read)."""
    total = 0
    for shard in base_shards(source.base_dir):
        for entry in read_header(shard)[0]:
            total += entry.numel * 2
    return total


def estimate_bytes(source, request: ExportRequest) -> int:
    """Disk space the export needs while it runs (output plus work files), roughly."""
    verify = VERIFY_LOGPROB_BYTES * 2 if request.verify else 0
    if request.format == "adapter":
        return (source.weights_dir / ADAPTER_WEIGHTS).stat().st_size + verify
    merged = _params_bytes(source)
    if request.format == "merged":
        return merged * (2 if request.merge_into == "original" and request.verify else 1) + verify
    gguf_type = gguf_type_of(request)
    # llama.cpp quantizes from an F16 file written next to the export first.
    intermediate = merged if gguf_type in LLAMA_CPP_TYPES else 0
    return merged + intermediate + int(merged / 2 * bytes_per_weight(gguf_type)) + verify


def gguf_type_of(request: ExportRequest) -> str:
    """The GGUF tensor type an export writes: the one asked for, else f16 (gguf) or q8_0 (ollama)."""
    return request.gguf_type or default_gguf_type(request.format)


class _Progress:
    """Turns byte counts into export_progress events, at most a few per second."""

    def __init__(self, sink: EventSink, phase: str) -> None:
        self.sink, self.phase, self.last = sink, phase, 0.0

    def __call__(self, done: int, total: int, message: str) -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.5:
            return
        self.last = now
        self.sink.emit(make_event("export_progress", phase=self.phase, done=done, total=total, message=message))


def _note(sink: EventSink, phase: str):
    def emit(message: str) -> None:
        sink.emit(make_event("export_progress", phase=phase, done=0, total=0, message=message))

    return emit


def export_run(request: ExportRequest, sink: EventSink) -> dict[str, Any]:
    """Run one export; returns the export_finished event it emitted. UserErrors propagate after that event."""
    started = time.time()
    if request.format not in FORMAT_NAMES:
        raise UserError(f"--format must be one of {', '.join(FORMAT_NAMES)}, got {request.format!r}")
    request = check_request(request)
    if request.format in GGUF_FORMATS:
        require(gguf_type_of(request))
    source = open_run(request.run_dir, request.checkpoint)
    out = Path(request.out).expanduser() if request.out else default_out(request)
    target = check_target(out, request.force)
    with export_lock(target.folder):
        return _export(request, source, target, sink, started)


def check_request(request: ExportRequest) -> ExportRequest:
    """The names and paths of an export, checked once before anything is read or written (trainer/limits.py):
    --name becomes an Ollama-style model name (so the GGUF file name has no separator and nothing lands outside
    --out), --out and the run folder are paths without control characters or pasted tokens."""
    check_text(str(request.run_dir), "RUN_DIR", "a run folder")
    if request.out is not None:
        check_text(str(request.out), "--out", "a folder")
    if request.name is None:
        return request
    return dataclasses.replace(request, name=check_ollama_name(request.name))


def _export(request: ExportRequest, source, target, sink: EventSink, started: float) -> dict[str, Any]:
    sink.emit(make_event("export_started", run_dir=str(source.run_dir), format=request.format,
                         out_dir=str(target.folder), checkpoint=request.checkpoint, step=source.step))
    tokenizer = load_run_tokenizer(source)
    needed = estimate_bytes(source, request)
    notes: list[str] = []
    with Staging(target, needed) as stage:
        facts, fidelity = _write_and_verify(request, source, tokenizer, stage, sink, notes)
        provenance = {"ft_desk_export": 1, "format": request.format, "run": str(source.run_dir),
                      "checkpoint": request.checkpoint, "step": source.step, "base_model": source.cfg.model.name,
                      "method": source.method, "created": datetime.now().astimezone().isoformat(timespec="seconds")}
        if fidelity is not None:
            fidelity = {**provenance, **fidelity}
            (stage.path / FIDELITY_FILE).write_text(json.dumps(fidelity, indent=2), encoding="utf-8")
        sink.emit(make_event("export_progress", phase="write", done=0, total=0, message="moving files into place"))
        files = stage.commit(provenance)
    if facts.get("ollama_name"):
        facts["command"] = f"ollama create {facts['ollama_name']} -f {target.folder / 'Modelfile'}"
    total_bytes = sum((target.folder / f).stat().st_size for f in files if (target.folder / f).is_file())
    passed = None if fidelity is None else fidelity["passed"]
    event = make_event(
        "export_finished",
        status="unverified" if fidelity is None else ("ok" if passed else "failed"),
        exit_code=EXIT_FAILED if passed is False else EXIT_OK,
        out_dir=str(target.folder), files=files, bytes=total_bytes, passed=passed, fidelity=fidelity,
        notes=notes + list(facts.get("notes", [])), command=facts.get("command"), facts=facts,
        elapsed_s=round(time.time() - started, 1), format=request.format,
        error=None if passed is not False else "the export does not behave like the trained model",
        hint=None if passed is not False else f"see {target.folder / FIDELITY_FILE}",
    )
    sink.emit(event)
    return event


def _write_and_verify(request: ExportRequest, source, tokenizer, stage: Staging, sink: EventSink,
                      notes: list[str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    fmt = request.format
    reference = None
    if request.verify:
        reference = v.build_reference(source, stage.work / "reference", _note(sink, "verify"))
    comparisons: dict[str, Any] = {}

    if fmt == "adapter":
        facts = export_adapter(source, stage.path, tokenizer)
        if reference is not None:
            result = v.run_reload_check(_adapter_args(source, stage.path, reference), stage.work, "adapter")
            comparisons["adapter_vs_trained"] = v.judge(result, reference, v.THRESHOLDS["exact"])
        return facts, _fidelity(reference, comparisons, notes)

    merged_dir = stage.path if fmt == "merged" else stage.work / "merged"
    merged_dir.mkdir(parents=True, exist_ok=True)
    facts = export_merged(source, merged_dir, tokenizer, request.dtype, request.merge_into,
                          _Progress(sink, "merge"))
    merged_lp = stage.work / "merged-logprobs" if fmt in GGUF_FORMATS else None
    if reference is not None:
        _note(sink, "verify")("reloading the merged model with plain transformers")
        result = v.run_reload_check(_hf_args(merged_dir, reference, merged_lp), stage.work, "merged")
        original = facts["merge_into"] == "original" and source.method == "qlora"
        comparisons["merged_vs_trained"] = v.judge(result, reference, v.THRESHOLDS[request.dtype],
                                                   gate_numbers=not original)
        if original:
            comparisons.update(_compare_quantized_merge(source, tokenizer, request, stage, reference, sink))
    if fmt == "merged":
        return facts, _fidelity(reference, comparisons, notes)

    gguf_type = gguf_type_of(request)
    gguf_facts = export_gguf(merged_dir, stage.path, gguf_type, name=_model_name(source, request),
                             progress=_Progress(sink, "gguf"), work_dir=stage.work)
    facts = {**{k: v_ for k, v_ in facts.items() if k != "weights"}, **gguf_facts,
             "notes": facts.get("notes", []) + gguf_facts.get("notes", [])}
    if reference is not None and not gguf_facts["transformers_can_load"]:
        notes.append(f"transformers cannot load {gguf_facts['architecture']} GGUF files, so the file was checked "
                     "by reading every tensor back with the gguf package instead of by reloading the model")
        comparisons["gguf_readback"] = readback_check(stage.path / gguf_facts["file"], merged_dir)
    elif reference is not None:
        _note(sink, "verify")("reloading the GGUF file with transformers' GGUF loader")
        args = _hf_args(stage.path, reference, None)
        args.update(kind="gguf", gguf_file=gguf_facts["file"], compare_dirs={"merged": str(merged_lp)},
                    extra_eos=gguf_facts["stop_ids"], config_dir=str(merged_dir))
        result = v.run_reload_check(args, stage.work, "gguf")
        notes.extend(result.get("notes", []))
        limits = v.THRESHOLDS[gguf_type]
        comparisons["gguf_vs_merged"] = v.judge(result, reference, limits, label="merged")
        comparisons["gguf_vs_trained"] = v.judge(result, reference, limits)
    if reference is not None and llamacpp.installed_version():
        _note(sink, "verify")("running the GGUF file in llama.cpp (llama-cpp-python is installed)")
        result = llamacpp.score(stage.path / gguf_facts["file"], reference, stage.work)
        comparisons["llama_cpp"] = llamacpp.judge(result, reference, v.THRESHOLDS[gguf_type])
    if fmt == "ollama":
        facts.update(write_modelfile(stage.path, gguf_facts, tokenizer, source, request.name))
    return facts, _fidelity(reference, comparisons, notes)


def _model_name(source, request: ExportRequest) -> str:
    """The GGUF's name (in its metadata and file name): --name with '/' and ':' as '-', else the run's slug."""
    return export_file_stem(request.name) if request.name else slug(f"{source.run_name}")


def _hf_args(folder: Path, reference, save_dir: Path | None) -> dict[str, Any]:
    return {"kind": "merged", "model_dir": str(folder), "reference_dir": str(reference.folder),
            "save_dir": str(save_dir) if save_dir else None, "dtype": "float32", "device": reference.device}


def _adapter_args(source, folder: Path, reference) -> dict[str, Any]:
    compute, weights = training_dtypes(source)
    quant = None
    if source.method == "qlora":
        q = source.cfg.quant
        quant = {"quant_type": q.quant_type, "double_quant": q.double_quant, "compute_dtype": compute,
                 "skip_modules": list(q.skip_modules)}
    return {"kind": "adapter", "model_dir": str(folder), "base_dir": str(source.base_dir), "quant": quant,
            "base_dtype": weights, "reference_dir": str(reference.folder), "dtype": "float32",
            "device": reference.device}


def _compare_quantized_merge(source, tokenizer, request: ExportRequest, stage: Staging, reference,
                             sink: EventSink) -> dict[str, Any]:
    """--merge-into original: also measure the NF4 merge, so the report shows which one is closer."""
    other = stage.work / "merged-quantized"
    other.mkdir()
    _note(sink, "verify")("merging into the NF4 weights too, for comparison")
    export_merged(source, other, tokenizer, request.dtype, "quantized", None)
    result = v.run_reload_check(_hf_args(other, reference, None), stage.work, "merged-quantized")
    report = v.judge(result, reference, v.THRESHOLDS[request.dtype])
    report["informational"] = True
    return {"quantized_merge_vs_trained": report}


def _fidelity(reference, comparisons: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    if reference is None:
        return None
    gated = {k: c for k, c in comparisons.items() if not c.get("informational")}
    closer = None
    if "quantized_merge_vs_trained" in comparisons and "merged_vs_trained" in comparisons:
        q = comparisons["quantized_merge_vs_trained"]["mean_kl"]
        o = comparisons["merged_vs_trained"]["mean_kl"]
        closer = "quantized" if q <= o else "original"
        notes.append(f"merging into the NF4 weights gives mean KL {q:.2e}, into the original weights {o:.2e}: "
                     f"the {closer} merge is closer to the trained model")
    return {
        "passed": all(c["passed"] for c in gated.values()),
        "reference": {
            "model": "the run's weights on its base, loaded as training evaluates them",
            "device": reference.device,
            "tokens": reference.data["tokens"],
            "val_loss": reference.data["loss"],
            "stop_ids": reference.stop_ids,
            "turn_end_ids": reference.turn_end_ids,
            "generations": [{"stopped": p["stopped"], "text": p["text"]} for p in reference.data["prompts"]],
        },
        "comparisons": comparisons,
        "closer_merge": closer,
        "notes": list(notes),
    }
