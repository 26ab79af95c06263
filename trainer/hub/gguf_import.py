"""A GGUF file (llama.cpp, LM Studio, an Ollama blob) turned once into a Hugging Face model folder ft-desk trains.

transformers' GGUF loader (`from_pretrained(folder, gguf_file=...)`) dequantizes the file into a model and a
tokenizer; they are saved as safetensors in ft-desk's data folder, `imported-models/<sha256[:16]>/`, keyed by the
GGUF's sha256, with `ft-desk-import.json` saying where it came from (source path, sha256, size, architecture,
tensor types with counts, the dtype stored, converted-by versions, date). The next call reuses the folder: a
source whose size and mtime match what `sources.json` recorded is not hashed again, and an Ollama blob is named by
its sha256 already.

Conversion writes into a hidden temp folder beside the final one and renames it into place, so a failure - a
truncated file, not a GGUF, an architecture the loader cannot read, a full disk, Ctrl-C - leaves nothing behind,
and is one sentence. Temp folders of killed processes are removed on the next import. The dtype stored is the
GGUF's own when it is F16/BF16/F32, else bfloat16 (hub/gguf_file.py `storage_dtype` says why); every surface
says plainly that the weights were dequantized from the GGUF's type. Progress is reported as `model_import`
events (transformers' own tqdm bar is kept off the screen).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from ft_desk.trainer.atomic import write_json
from ft_desk.trainer.errors import ModelError
from ft_desk.trainer.events import format_bytes, make_event
from ft_desk.trainer.hub.gguf_file import GGUFFacts, dequantized_note, read_gguf, storage_dtype
from ft_desk.trainer.hub.ollama_store import OllamaModel
from ft_desk.trainer.paths import data_home

PROVENANCE = "ft-desk-import.json"
SOURCES_INDEX = "sources.json"
TEMP_PREFIX = ".importing-"
# Note: bytes per stored weight, and the room kept free beyond the estimate (tokenizer, config, file system).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DISK_MARGIN_BYTES = 64 * 1024**2

EventCallback = Callable[[dict[str, Any]], None]


def imports_dir() -> Path:
    """Where imported GGUF models live (FT_DESK_HOME/imported-models in tests)."""
    return data_home() / "imported-models"


@dataclass(frozen=True)
class ImportedModel:
    folder: Path
    provenance: dict[str, Any]
    reused: bool

    @property
    def note(self) -> str:
        return dequantized_note(self.provenance.get("file_type", "?"), self.provenance.get("stored_dtype", "?"))


def _emit(on_event: EventCallback | None, phase: str, source: str, message: str, done: int = 0, total: int = 0,
          **extra: Any) -> None:
    if on_event is not None:
        on_event(make_event("model_import", phase=phase, source=source, message=message, done=done, total=total,
                            **extra))


# ---------------------------------------------------------------------------------------------------------------
# What transformers can read


def supported_architectures() -> list[str]:
    """The GGUF architectures the installed transformers reads, from its own tables (not a copy): the legacy
    loader's, and transformers 5's newer GGUF integration where it exists."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES  # heavy import

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    except ImportError:
        pass
    # The legacy table also holds the non-architecture sections of its key mapping.
    return sorted(names - {"general", "tokenizer"})


def _norm(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def check_architecture(facts: GGUFFacts) -> None:
    """A ModelError naming the families the loader reads when it cannot read this file's architecture.

    The loader spells a few names differently from llama.cpp (qwen2moe / qwen2_moe, gpt-oss / gpt_oss), so names are
    compared without '_' and '-', as the loader itself maps them."""
    import transformers  # heavy import

    known = supported_architectures()
    if _norm(facts.architecture) in {_norm(a) for a in known}:
        return
    raise ModelError(
        f"{facts.path.name} holds a {facts.architecture!r} model, which the GGUF loader of transformers "
        f"{transformers.__version__} cannot read; it reads {', '.join(known)}",
        hint="use the model's original Hugging Face folder or Hub id instead, or a newer transformers",
    )


# ---------------------------------------------------------------------------------------------------------------
# Finding an earlier import


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def folder_for(sha256: str) -> Path:
    return imports_dir() / sha256[:16]


def _complete(folder: Path, sha256: str) -> dict[str, Any] | None:
    """The provenance of a finished import of `sha256`, or None."""
    provenance = _read_json(folder / PROVENANCE)
    if provenance is None or provenance.get("sha256") != sha256 or not (folder / "config.json").is_file():
        return None
    return provenance


def known_sha256(path: Path) -> str | None:
    """The sha256 recorded for `path` when its size and mtime are unchanged since (no hashing), else None."""
    entry = (_read_json(imports_dir() / SOURCES_INDEX) or {}).get(str(path.resolve()))
    try:
        same = isinstance(entry, dict) and {k: entry.get(k) for k in ("size", "mtime_ns")} == _stamp(path)
    except OSError:
        return None
    return entry.get("sha256") if same else None


def find_import(path: Path, sha256: str | None = None) -> ImportedModel | None:
    """An earlier import of the GGUF at `path`, found without hashing it (None when unknown or changed)."""
    sha256 = sha256 or known_sha256(Path(path).expanduser())
    if not sha256:
        return None
    folder = folder_for(sha256)
    provenance = _complete(folder, sha256)
    return ImportedModel(folder, provenance, reused=True) if provenance else None


def _remember(path: Path, sha256: str) -> None:
    index_path = imports_dir() / SOURCES_INDEX
    index = _read_json(index_path) or {}
    index[str(path.resolve())] = {**_stamp(path), "sha256": sha256}
    index_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(index_path, index)


def sha256_of(path: Path, on_event: EventCallback | None = None, source: str = "") -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done, last = 0, 0.0
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
            done += len(block)
            now = time.monotonic()
            if now - last >= 2.0 or done == total:
                last = now
                _emit(on_event, "hash", source, f"checking {path.name}: {format_bytes(done)} / {format_bytes(total)}",
                      done, total)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Converting


def _sweep_stale_temps(root: Path) -> None:
    """Remove temp folders whose process is gone (killed mid-import); a live import's folder is left alone."""
    import psutil

    for folder in root.glob(TEMP_PREFIX + "*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and psutil.pid_exists(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _check_disk(root: Path, facts: GGUFFacts, dtype: str) -> int:
    needed = facts.params * DTYPE_BYTES[dtype] + DISK_MARGIN_BYTES
    free = shutil.disk_usage(root).free
    if free < needed:
        raise ModelError(f"importing {facts.path.name} needs about {format_bytes(needed)} of disk in {root} and only "
                         f"{format_bytes(free)} is free",
                         hint="free some disk space, or point FT_DESK_HOME at a bigger disk")
    return needed


class _ProgressIter:
    """Stands in for transformers' tqdm over the GGUF's tensors: reports every few seconds as an event."""

    def __init__(self, on_event: EventCallback | None, source: str, file_type: str) -> None:
        self.on_event, self.source, self.file_type = on_event, source, file_type

    def __call__(self, iterable, *args: Any, **kwargs: Any):
        items = list(iterable)
        total, last = len(items), 0.0
        for i, item in enumerate(items, 1):
            yield item
            now = time.monotonic()
            if now - last >= 2.0 or i == total:
                last = now
                _emit(self.on_event, "convert", self.source,
                      f"dequantizing {self.file_type} tensors: {i}/{total}", i, total)


@contextlib.contextmanager
def _quiet_loader(progress: _ProgressIter):
    """Keep transformers' output off the user's screen while it converts: its GGUF loader's tqdm bar becomes
    `model_import` progress events, its own progress bars are switched off, and what it logs or prints goes to
    the log (the run log during training)."""
    import logging

    from transformers import modeling_gguf_pytorch_utils as loader  # heavy imports
    from transformers.utils import logging as hf_logging

    log = logging.getLogger("ft_desk.gguf_import")
    original = getattr(loader, "tqdm", None)
    if original is not None:
        loader.tqdm = progress
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hf_root = logging.getLogger("transformers")
    handlers, propagate = list(hf_root.handlers), hf_root.propagate
    captured = io.StringIO()
    for handler in handlers:
        hf_root.removeHandler(handler)
    forward = logging.StreamHandler(captured)
    hf_root.addHandler(forward)
    hf_root.propagate = False
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            yield
    finally:
        if original is not None:
            loader.tqdm = original
        if bars_were_on:
            hf_logging.enable_progress_bar()
        hf_root.removeHandler(forward)
        for handler in handlers:
            hf_root.addHandler(handler)
        hf_root.propagate = propagate
        if captured.getvalue().strip():
            log.info("transformers' GGUF loader said:\n%s", captured.getvalue()[-4000:])


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("ft-desk", "transformers", "gguf", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _convert(gguf_path: Path, facts: GGUFFacts, dtype: str, out: Path, progress: _ProgressIter) -> None:
    """Load the GGUF with transformers and save it as a safetensors model folder in `out`."""
    import torch  # heavy imports
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The loader takes a folder and a file name in it: link the source under a plain name in a scratch folder, so
    # an Ollama blob (no .gguf suffix) and a path with odd characters load the same way.
    scratch = out / ".source"
    scratch.mkdir()
    link = scratch / "model.gguf"
    try:
        link.symlink_to(gguf_path.resolve())
    except OSError:  # no symlinks here (some Windows setups): load the file where it is
        scratch, link = gguf_path.parent, gguf_path
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    try:
        # transformers 5 can keep GGUF weights packed for inference; training needs them unpacked (and savable).
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantizes
        pass
    try:
        with _quiet_loader(progress):
            _emit(progress.on_event, "convert", progress.source, "reading the tokenizer from the GGUF")
            tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=link.name)
            _emit(progress.on_event, "convert", progress.source, f"reading and dequantizing the {facts.file_type} "
                  f"tensors ({facts.params / 1e6:.0f}M parameters)")
            model = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=link.name, **kwargs)
            if any(not p.is_floating_point() for p in model.parameters()):
                raise ModelError(f"transformers kept some weights of {facts.path.name} packed, so they cannot be "
                                 "trained", hint="update transformers, or use the model's original Hugging Face folder")
            model.hf_quantizer = None  # a dequantized model is a plain one; the loader's marker blocks saving
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            _emit(progress.on_event, "write", progress.source, "writing the model as safetensors")
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
    finally:
        if scratch == out / ".source":
            shutil.rmtree(scratch, ignore_errors=True)


def load_gguf_tokenizer(path: Path):
    """The tokenizer stored in a GGUF, read without converting the weights (what `ft-desk data check` needs before
    the model was ever imported); the same object an import saves, so it counts the same tokens."""
    from transformers import AutoTokenizer  # heavy import

    facts = read_gguf(path)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ft-desk-gguf-") as scratch:
        link = Path(scratch) / "model.gguf"
        try:
            link.symlink_to(Path(path).resolve())
            folder, name = Path(scratch), link.name
        except OSError:
            folder, name = Path(path).parent, Path(path).name
        try:
            with _quiet_loader(_ProgressIter(None, str(path), facts.file_type)):
                return AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except Exception as exc:  # noqa: BLE001 - the loader raises many types for files it cannot read
            raise _explain(exc, facts) from exc


def _explain(exc: BaseException, facts: GGUFFacts) -> ModelError:
    """One sentence for a loader failure the header checks did not catch."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "not supported" in text.lower() and "architecture" in text.lower():
        return ModelError(f"{facts.path.name} holds a {facts.architecture!r} model, which transformers' GGUF loader "
                          f"cannot read ({text[:160]})",
                          hint="use the model's original Hugging Face folder or Hub id instead")
    return ModelError(f"transformers could not convert {facts.path.name} ({facts.architecture}, {facts.file_type}): "
                      f"{text[:200]}",
                      hint="use the model's original Hugging Face folder or Hub id instead; details are in the log")


def import_gguf(path: Path | str, *, ollama: OllamaModel | None = None,
                on_event: EventCallback | None = None) -> ImportedModel:
    """The model folder converted from the GGUF at `path` (an Ollama blob when `ollama` is given): reused when it
    exists, else converted now. Every failure is a ModelError and leaves no folder behind."""
    path = Path(path).expanduser()
    source = ollama.name.short if ollama is not None else str(path)
    sha256 = ollama.sha256 if ollama is not None else known_sha256(path)
    provenance = _complete(folder_for(sha256), sha256) if sha256 else None
    if provenance is None:
        facts = read_gguf(path)  # not a GGUF / truncated / damaged: one sentence, before anything is written
        check_architecture(facts)  # a family transformers cannot read: one sentence listing those it can
        if sha256 is None:
            sha256 = sha256_of(path, on_event, source)
            _remember(path, sha256)
        provenance = _complete(folder_for(sha256), sha256)
    folder = folder_for(sha256)
    if provenance is not None:
        provenance = _note_ollama(folder, provenance, ollama)
        found = ImportedModel(folder, provenance, reused=True)
        _emit(on_event, "reused", source, f"using {source}, imported before: {folder} ({found.note})",
              folder=str(folder), file_type=provenance.get("file_type"), dtype=provenance.get("stored_dtype"))
        return found

    dtype = storage_dtype(facts)
    root = imports_dir()
    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(root)
    needed = _check_disk(root, facts, dtype)
    tmp = root / f"{TEMP_PREFIX}{sha256[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    started = time.monotonic()
    _emit(on_event, "start", source,
          f"importing {source} once ({facts.architecture}, {facts.params / 1e6:.0f}M parameters, {facts.file_type}, "
          f"{format_bytes(facts.size_bytes)}): the weights are dequantized to {dtype}, about {format_bytes(needed)}",
          0, 0, file_type=facts.file_type, dtype=dtype)
    try:
        try:
            _convert(path, facts, dtype, tmp, _ProgressIter(on_event, source, facts.file_type))
        except ModelError:
            raise
        except MemoryError:
            raise ModelError(f"this machine ran out of memory converting {facts.path.name}",
                             hint="close other programs, or convert the model on a machine with more RAM") from None
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                raise ModelError(f"the disk filled up while importing {facts.path.name}",
                                 hint="free some disk space and try again") from None
            raise _explain(exc, facts) from exc
        except Exception as exc:  # noqa: BLE001 - the loader raises many types for files it cannot read
            raise _explain(exc, facts) from exc
        provenance = {
            "ft_desk_import": 1,
            "source_path": str(path.resolve()),
            "source_kind": "ollama" if ollama is not None else "gguf",
            "sha256": sha256,
            "size_bytes": facts.size_bytes,
            "architecture": facts.architecture,
            "gguf_name": facts.name,
            "file_type": facts.file_type,
            "tensor_types": facts.tensor_types,
            "params": facts.params,
            "stored_dtype": dtype,
            "dequantized": facts.quantized,
            "converted_by": _versions(),
            "created": datetime.now().astimezone().isoformat(timespec="seconds"),
            "convert_seconds": round(time.monotonic() - started, 1),
            "ollama": {},
        }
        if ollama is not None:
            provenance["ollama"][ollama.name.short] = dict(ollama.texts)
        write_json(tmp / PROVENANCE, provenance)
        _emit(on_event, "write", source, "moving the converted model into place")
        try:
            os.rename(tmp, folder)
        except OSError:
            if _complete(folder, sha256) is None:  # not another process finishing the same import first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            provenance = _complete(folder, sha256) or provenance
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = ImportedModel(folder, provenance, reused=False)
    _emit(on_event, "done", source, f"imported {source} in {provenance['convert_seconds']:.0f}s into {folder}: "
          f"{done.note}", folder=str(folder), file_type=facts.file_type, dtype=dtype)
    return done


def _note_ollama(folder: Path, provenance: dict[str, Any], ollama: OllamaModel | None) -> dict[str, Any]:
    """Record an Ollama name's template/system/params on an import made from another name (or a plain file)."""
    if ollama is None or provenance.get("ollama", {}).get(ollama.name.short) == ollama.texts:
        return provenance
    provenance = {**provenance, "ollama": {**provenance.get("ollama", {}), ollama.name.short: dict(ollama.texts)}}
    try:
        write_json(folder / PROVENANCE, provenance)
    except OSError:  # read-only data folder: the export falls back to the store
        pass
    return provenance


def read_provenance(folder: Path) -> dict[str, Any] | None:
    """The import record of a model folder, or None when it was not imported from a GGUF."""
    return _read_json(Path(folder) / PROVENANCE)
