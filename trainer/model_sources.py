"""Base models that are not Hugging Face folders: a .gguf file (llama.cpp, LM Studio) or a model in Ollama's store.
The public surface of hub/gguf_file.py, hub/ollama_store.py and hub/gguf_import.py for the CLI and the TUI.

Anywhere a model name is accepted (`--model`, `model.name`, the Model screen), such a model is named by its path
(`~/models/x.Q4_K_M.gguf`) or its Ollama name (`smollm2`, `smollm2:135m`, `ollama:ns/x:tag`; the rule that tells an
Ollama name from a Hub id is in hub/ollama_store.py). It is converted once into a safetensors folder in ft-desk's
data folder on first use, and reused after. Light imports only: the TUI imports this module (never torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ft_desk.trainer.errors import ModelError, UserError
from ft_desk.trainer.hub.gguf_file import dequantized_note, looks_like_gguf_path, read_gguf, storage_dtype
from ft_desk.trainer.hub.gguf_import import find_import, import_gguf, read_provenance
from ft_desk.trainer.hub.ollama_store import PREFIX, is_ollama_name, list_models, parse_name, store_dir
from ft_desk.trainer.hub.resolve import gguf_source

EventCallback = Callable[[dict[str, Any]], None]


def is_gguf_path(text: str) -> bool:
    """Whether `text` names a .gguf file that exists (the Model screen's input box takes one)."""
    path = Path(text.strip()).expanduser()
    return looks_like_gguf_path(text.strip()) and path.is_file()


def looks_like_ollama(text: str) -> bool:
    """Whether `text` can only be an Ollama name (an `ollama:` prefix or a `:tag`)."""
    return is_ollama_name(text)


def import_model(name: str, on_event: EventCallback | None = None) -> dict[str, Any]:
    """Convert the GGUF file or Ollama model `name` (or reuse its earlier import); the import's facts."""
    source = gguf_source(name)
    if source is None:
        raise ModelError(f"{name!r} is not a .gguf file or an Ollama model",
                         hint="give a path to a .gguf file, or an Ollama name such as smollm2:135m "
                              "(ft-desk models ollama lists them); Hub models are fetched with ft-desk models download")
    path, ollama = source
    imported = import_gguf(path, ollama=ollama, on_event=on_event)
    return {"source": name, "folder": str(imported.folder), "reused": imported.reused, "note": imported.note,
            "provenance": imported.provenance}


def source_note(name: str, model_dir: str | Path | None = None) -> str | None:
    """"weights dequantized from the GGUF's Q4_1 to bfloat16..." for a model imported from a GGUF, else None."""
    provenance = read_provenance(Path(model_dir)) if model_dir else None
    if provenance is None:
        try:
            source = gguf_source(name)
        except UserError:
            return None
        if source is None:
            return None
        found = find_import(source[0], source[1].sha256 if source[1] else None)
        provenance = found.provenance if found else None
    if provenance is None:
        return None
    return dequantized_note(provenance.get("file_type", "?"), provenance.get("stored_dtype", "?"))


def plan_note(name: str) -> str | None:
    """What a plan of a GGUF / Ollama base says about its weights (imported or not yet), else None."""
    try:
        source = gguf_source(name)
    except UserError:
        return None
    if source is None:
        return None
    path, ollama = source
    found = find_import(path, ollama.sha256 if ollama else None)
    if found is not None:
        return f"{found.note} (imported in {found.folder})"
    try:
        facts = read_gguf(path)
    except UserError as err:
        return err.message
    return (f"a {facts.file_type} GGUF: imported once on first use (about a minute per 100M parameters), "
            f"{dequantized_note(facts, storage_dtype(facts))}")


def ollama_source(name: str, model_dir: str | Path | None = None) -> dict[str, Any] | None:
    """For a run whose base is an Ollama model: {"name": short name, "template", "system", "params"} (what its
    Modelfile had), from the store or, when the store lost it, from the import record. None for other bases."""
    if not is_ollama_name(name) and not (parse_name(name) and model_dir and _imported_from_ollama(name, model_dir)):
        return None
    try:
        source = gguf_source(name)
    except UserError:
        source = None
    parsed = parse_name(name)
    short = parsed.short if parsed else name
    texts: dict[str, Any] = {}
    if source is not None and source[1] is not None:
        short, texts = source[1].name.short, dict(source[1].texts)
    elif model_dir:
        texts = dict(((read_provenance(Path(model_dir)) or {}).get("ollama") or {}).get(short) or {})
    return {"name": short, **texts}


def _imported_from_ollama(name: str, model_dir: str | Path) -> bool:
    parsed = parse_name(name)
    ollama = (read_provenance(Path(model_dir)) or {}).get("ollama") or {}
    return parsed is not None and parsed.short in ollama


def describe_model(name: str, fit=None) -> dict[str, Any] | None:
    """`ft-desk models info` for a GGUF file or an Ollama model (from its header, nothing converted); None when
    `name` is neither."""
    source = gguf_source(name)
    if source is None:
        return None
    path, ollama = source
    facts = read_gguf(path)
    found = find_import(path, ollama.sha256 if ollama else None)
    out: dict[str, Any] = {
        "id": name, "kind": "ollama" if ollama else "gguf", "path": str(path), "size_bytes": facts.size_bytes,
        "architecture": facts.architecture, "gguf_name": facts.name, "file_type": facts.file_type,
        "tensor_types": facts.tensor_types, "params": facts.params, "imported": found is not None,
        "folder": str(found.folder) if found else None, "note": dequantized_note(facts, storage_dtype(facts)),
        "ollama_name": ollama.name.short if ollama else None, "system": (ollama.texts.get("system") if ollama
                                                                        else None),
    }
    if fit is not None:
        out["fit"] = fit.plan(facts.config, model_name=name)
    return out


def ollama_listing(fit=None) -> dict[str, Any]:
    """Every model in Ollama's store with its size, GGUF type, architecture, parameters, whether it was imported,
    and (given a hub.search.FitCheck) the fit verdict of the run on this device - all from the GGUF headers."""
    root = store_dir()
    models, problems = list_models(root)
    rows = []
    for m in models:
        row: dict[str, Any] = {"name": m.name.short, "id": PREFIX + m.name.short, "size_bytes": m.size_bytes,
                               "blob": str(m.blob), "modified": m.modified, "system": m.texts.get("system")}
        try:
            facts = read_gguf(m.blob)
        except UserError as err:
            row.update({"problem": err.message, "fit": {"verdict": "unknown", "reason": err.message}})
            rows.append(row)
            continue
        found = find_import(m.blob, m.sha256)
        row.update({"file_type": facts.file_type, "architecture": facts.architecture, "params": facts.params,
                    "imported": found is not None, "folder": str(found.folder) if found else None,
                    "note": dequantized_note(facts, storage_dtype(facts))})
        if fit is not None:
            config = facts.config
            if found is not None and (found.folder / "config.json").is_file():
                import json

                config = json.loads((found.folder / "config.json").read_text(encoding="utf-8"))
            row["fit"] = fit.plan(config, model_name=m.name.short)
        rows.append(row)
    return {"store": str(root), "store_exists": (root / "manifests").is_dir(), "models": rows,
            "problems": problems}
