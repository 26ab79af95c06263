"""Models in Ollama's local store, by the names Ollama gives them. Stdlib only; never runs or contacts Ollama.

The store is `$OLLAMA_MODELS`, else `~/.ollama/models`. A model `host/namespace/model:tag` has a manifest at
manifests/<host>/<namespace>/<model>/<tag> (JSON); its layer with mediaType `application/vnd.ollama.image.model`
names the GGUF blob as a digest `sha256:<hex>`, stored at blobs/sha256-<hex>. The template, system and params
layers (also blobs) hold the chat TEMPLATE, the SYSTEM prompt and the PARAMETERs of the model's Modelfile.

Names, as Ollama reads them: `smollm2` is registry.ollama.ai/library/smollm2:latest, `smollm2:135m` the same with
tag 135m, `ns/x:tag` a namespace of the default registry, `host/ns/x:tag` another registry.

How ft-desk tells an Ollama name from a Hugging Face Hub id (`owner/name`), in `is_ollama_name`:
  1. `ollama:NAME` always means Ollama (`ollama:smollm2`, `ollama:library/smollm2:135m`);
  2. a name with a `:tag` means Ollama - a Hub id cannot contain `:`;
  3. a name without a tag is a Hub id, except when it is not in the Hugging Face cache and Ollama's store has it
     (as `:latest`) - so every name that meant a Hub model before still does (hub/resolve.py applies this order).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft_desk.trainer.errors import ModelError

PREFIX = "ollama:"
DEFAULT_REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MODEL_MEDIA = "application/vnd.ollama.image.model"
TEXT_LAYERS = {"application/vnd.ollama.image.template": "template",
               "application/vnd.ollama.image.system": "system",
               "application/vnd.ollama.image.params": "params"}
# Ollama's own name rules: letters, digits, '_', '-', '.', the first part not starting with a symbol.
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(:[0-9]+)?$")
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


def store_dir() -> Path:
    """Ollama's model store: OLLAMA_MODELS, else ~/.ollama/models (read at call time)."""
    configured = os.environ.get("OLLAMA_MODELS")
    return Path(configured).expanduser() if configured else Path.home() / ".ollama" / "models"


@dataclass(frozen=True)
class OllamaName:
    registry: str
    namespace: str
    model: str
    tag: str

    @property
    def short(self) -> str:
        """The name as `ollama list` shows it: no default registry or namespace."""
        base = self.model if self.namespace == DEFAULT_NAMESPACE else f"{self.namespace}/{self.model}"
        if self.registry != DEFAULT_REGISTRY:
            base = f"{self.registry}/{self.namespace}/{self.model}"
        return f"{base}:{self.tag}"

    def manifest(self, root: Path) -> Path:
        return root / "manifests" / self.registry / self.namespace / self.model / self.tag


def parse_name(name: str) -> OllamaName | None:
    """The parts of an Ollama model name (the `ollama:` prefix is optional), or None when it cannot be one."""
    text = name.strip()
    if text.startswith(PREFIX):
        text = text[len(PREFIX):]
    if not text or text.startswith(("/", ".", "~")) or "\\" in text or ".." in text:
        return None
    parts = text.split("/")
    last = parts[-1]
    tag = DEFAULT_TAG
    if ":" in last:
        last, tag = last.rsplit(":", 1)
    parts[-1] = last
    if len(parts) == 1:
        registry, namespace, model = DEFAULT_REGISTRY, DEFAULT_NAMESPACE, parts[0]
    elif len(parts) == 2:
        registry, (namespace, model) = DEFAULT_REGISTRY, parts
    elif len(parts) == 3:
        registry, namespace, model = parts
    else:
        return None
    if not (_HOST.match(registry) and _PART.match(namespace) and _PART.match(model) and _TAG.match(tag)):
        return None
    return OllamaName(registry, namespace.lower(), model.lower(), tag)


def is_ollama_name(name: str) -> bool:
    """Rules 1 and 2 of the module docstring: an explicit `ollama:` prefix, or a `:tag` (no Hub id has one)."""
    text = name.strip()
    if text.startswith(PREFIX):
        return True
    if text.startswith(("/", ".", "~")) or text.lower().endswith(".gguf"):
        return False
    return ":" in text.split("/")[-1] and parse_name(text) is not None


def without_prefix(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


@dataclass(frozen=True)
class OllamaModel:
    name: OllamaName
    manifest_path: Path
    blob: Path
    """The GGUF weights (blobs/sha256-<hex>)."""
    sha256: str
    size_bytes: int
    texts: dict[str, Any] = field(default_factory=dict)
    """template / system (strings) and params (a dict) of the model's Modelfile, where it has them."""
    modified: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name.short, "ref": PREFIX + self.name.short, "blob": str(self.blob),
                "sha256": self.sha256, "size_bytes": self.size_bytes, "manifest": str(self.manifest_path),
                "modified": self.modified, **{k: v for k, v in self.texts.items()}}


def _blob_path(root: Path, digest: str) -> Path | None:
    match = _DIGEST.match(str(digest))
    return root / "blobs" / f"sha256-{match.group(1)}" if match else None


def read_manifest(name: OllamaName, path: Path, root: Path) -> OllamaModel:
    """The model a manifest describes; a ModelError when it is unreadable or its weights blob is missing."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        layers = list(data.get("layers") or [])
    except (OSError, ValueError, AttributeError, TypeError):
        raise ModelError(f"Ollama's manifest of {name.short} ({path}) is not readable JSON",
                         hint=f"pull it again: ollama pull {name.short}") from None
    model_layer = next((layer for layer in layers if isinstance(layer, dict)
                        and layer.get("mediaType") == MODEL_MEDIA), None)
    blob = _blob_path(root, model_layer.get("digest", "")) if model_layer else None
    if blob is None:
        raise ModelError(f"Ollama's manifest of {name.short} names no GGUF weights layer",
                         hint="only models with GGUF weights can be trained; see: ollama show " + name.short)
    if not blob.is_file():
        raise ModelError(f"Ollama's weights of {name.short} are missing from its store ({blob})",
                         hint=f"pull it again: ollama pull {name.short}")
    texts: dict[str, Any] = {}
    for layer in layers:
        kind = TEXT_LAYERS.get(layer.get("mediaType")) if isinstance(layer, dict) else None
        text_blob = _blob_path(root, layer.get("digest", "")) if kind else None
        if kind is None or text_blob is None or not text_blob.is_file():
            continue
        try:
            raw = text_blob.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if kind == "params":
            try:
                parsed = json.loads(raw)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                texts["params"] = parsed
        else:
            texts[kind] = raw
    size = blob.stat().st_size
    return OllamaModel(name=name, manifest_path=path, blob=blob, sha256=blob.name[len("sha256-"):],
                       size_bytes=size, texts=texts, modified=path.stat().st_mtime)


def find_model(name: str, root: Path | None = None) -> OllamaModel | None:
    """The store's model called `name`, or None when the store has no such manifest."""
    parsed = parse_name(name)
    if parsed is None:
        return None
    root = root or store_dir()
    path = parsed.manifest(root)
    if not path.is_file():
        return None
    return read_manifest(parsed, path, root)


def tags_of(name: str, root: Path | None = None) -> list[str]:
    """The tags the store has of `name`'s model (for "did you mean" hints)."""
    parsed = parse_name(name)
    if parsed is None:
        return []
    root = root or store_dir()
    folder = root / "manifests" / parsed.registry / parsed.namespace / parsed.model
    if not folder.is_dir():
        return []
    return sorted(OllamaName(parsed.registry, parsed.namespace, parsed.model, p.name).short
                  for p in folder.iterdir() if p.is_file())


def list_models(root: Path | None = None) -> tuple[list[OllamaModel], list[str]]:
    """(every model in the store, newest first; a sentence per manifest that could not be read)."""
    root = root or store_dir()
    manifests = root / "manifests"
    found: list[OllamaModel] = []
    problems: list[str] = []
    if not manifests.is_dir():
        return found, problems
    for path in sorted(manifests.glob("*/*/*/*")):
        if not path.is_file():
            continue
        registry, namespace, model, tag = path.relative_to(manifests).parts
        try:
            found.append(read_manifest(OllamaName(registry, namespace, model, tag), path, root))
        except ModelError as err:
            problems.append(err.message)
    found.sort(key=lambda m: (-m.modified, m.name.short))
    return found, problems
