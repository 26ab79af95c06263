"""From a ModelConfig to a checked local folder: the demo model, a folder on disk, a snapshot in the Hugging Face
cache, or a GGUF file / Ollama model imported once into ft-desk's data folder (hub/gguf_import.py). Never touches
the network (downloading is `ft-desk models download`, hub/download.py); every folder it returns has passed
`check_model_folder`.

Which kind a name is, in order: `demo`; an existing folder; a file (a GGUF, by its signature or a .gguf name);
an Ollama name by rules 1-2 of hub/ollama_store.py (`ollama:` prefix, or a `:tag`); a Hub id in the cache; and
last an untagged name Ollama's store has as `:latest` (rule 3), so a Hub id keeps meaning the Hub model.
"""

from __future__ import annotations

from pathlib import Path

from ft_desk.trainer.config import ModelConfig
from ft_desk.trainer.demo import ensure_demo_model, is_demo_model
from ft_desk.trainer.errors import ModelError
from ft_desk.trainer.hub.cache import find_snapshot
from ft_desk.trainer.hub.folder_check import check_model_folder
from ft_desk.trainer.hub.gguf_file import is_gguf_file, looks_like_gguf_path
from ft_desk.trainer.hub.gguf_import import EventCallback, find_import, import_gguf
from ft_desk.trainer.hub.names import is_repo_id
from ft_desk.trainer.hub.ollama_store import (
    OllamaModel,
    find_model,
    is_ollama_name,
    parse_name,
    store_dir,
    tags_of,
    without_prefix,
)


def _missing_ollama(name: str) -> ModelError:
    short = without_prefix(name)
    root = store_dir()
    if not (root / "manifests").is_dir():
        return ModelError(f"{short!r} is an Ollama model name, but there is no Ollama store at {root}",
                          hint="pull it with `ollama pull " + short + "`, or set OLLAMA_MODELS to where Ollama keeps "
                               "its models")
    others = tags_of(short, root)
    also = f"; the store has {', '.join(others)}" if others else ""
    return ModelError(f"Ollama model {short!r} is not in Ollama's store ({root}){also}",
                      hint=f"use one of those, or pull it with: ollama pull {short}" if others
                      else f"pull it with: ollama pull {short} (ollama list shows what is there)")


def gguf_source(name: str) -> tuple[Path, OllamaModel | None] | None:
    """(GGUF file, its Ollama model or None) when `name` is a GGUF file or an Ollama model, None for every other
    kind of name; nothing is converted. A .gguf path that does not exist, or an Ollama name the store lacks when
    it can only be Ollama (rules 1-2), is a ModelError."""
    if is_demo_model(name):
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return None
    if path.is_file() and (looks_like_gguf_path(name) or is_gguf_file(path)):
        return path, None
    if looks_like_gguf_path(name):
        raise ModelError(f"GGUF file {path} does not exist", hint="check the path")
    if is_ollama_name(name):
        found = find_model(name)
        if found is None:
            raise _missing_ollama(name)
        return found.blob, found
    if is_repo_id(name) and not name.startswith((".", "~", "/")) and parse_name(name) is not None \
            and find_snapshot(name) is None:
        found = find_model(name)  # rule 3: untagged, not a cached Hub model, and Ollama has it as :latest
        if found is not None:
            return found.blob, found
    return None


def imported_dir(name: str) -> Path | None:
    """The folder a GGUF / Ollama `name` was imported into before, found without converting or hashing (None when
    it has not been imported, or is not such a name)."""
    try:
        source = gguf_source(name)
    except ModelError:
        return None
    if source is None:
        return None
    path, ollama = source
    found = find_import(path, ollama.sha256 if ollama else None)
    return found.folder if found else None


def resolve_model_dir(cfg: ModelConfig, on_event: EventCallback | None = None) -> Path:
    """A local folder holding the model named by `cfg`, checked for safety and completeness (no network). A GGUF
    or Ollama model is imported on first use; `on_event` gets its `model_import` progress events."""
    if is_demo_model(cfg.name):
        return ensure_demo_model()
    path = Path(cfg.name).expanduser()
    if path.is_dir():
        check_model_folder(path, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
        return path
    source = gguf_source(cfg.name)
    if source is not None:
        gguf_path, ollama = source
        imported = import_gguf(gguf_path, ollama=ollama, on_event=on_event)
        check_model_folder(imported.folder, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
        return imported.folder
    if path.exists():
        raise ModelError(f"{path} is a file but not a GGUF; model.name must be a model folder, a .gguf file, "
                         "an Ollama model, a Hub id or `demo`")
    if not is_repo_id(cfg.name) or cfg.name.startswith((".", "~", "/")):
        raise ModelError(f"model folder {path} does not exist",
                         hint="check the path, or give a Hub id like Qwen/Qwen2.5-0.5B-Instruct")
    snapshot = find_snapshot(cfg.name, cfg.revision)
    if snapshot is None:
        at = f" at revision {cfg.revision}" if cfg.revision else ""
        pin = f" --revision {cfg.revision}" if cfg.revision else ""
        others = tags_of(cfg.name) if parse_name(cfg.name) else []
        also = f"; Ollama's store has {', '.join(others)} (use that name to train it)" if others else ""
        raise ModelError(
            f"model {cfg.name!r}{at} is not a folder and not in the local Hugging Face cache{also}",
            hint=f"download it first: ft-desk models download {cfg.name}{pin}",
        )
    check_model_folder(snapshot, name=cfg.name, trust_remote_code=cfg.trust_remote_code,
                       allow_pickle=cfg.allow_pickle, pinned_revision=cfg.revision, hub_model=True)
    return snapshot
