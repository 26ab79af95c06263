"""GGUF files and a fake Ollama store for the model-source tests: tiny GGUFs written by ft-desk's own GGUF writer
from the tiny random model, damaged copies of them, and Ollama's on-disk layout (manifests + blobs) built around
any GGUF, so no test needs Ollama or the network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest


def _write_gguf(model_dir: Path, out: Path, tensor_type: str) -> Path:
    from ft_desk.trainer.export.gguf_writer import export_gguf

    out.mkdir(parents=True, exist_ok=True)
    facts = export_gguf(model_dir, out, tensor_type, name="tiny")
    return out / facts["file"]


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama as an F16 GGUF (as llama.cpp's converter would write it)."""
    return _write_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf-f16"), "f16")


@pytest.fixture(scope="session")
def tiny_gguf_q8(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama quantized to Q8_0, so importing it dequantizes."""
    return _write_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf-q8"), "q8_0")


@pytest.fixture
def fresh_home(tmp_path, monkeypatch) -> Path:
    """An empty FT_DESK_HOME, so every test converts from scratch (the session home is shared)."""
    home = tmp_path / "home"
    monkeypatch.setenv("FT_DESK_HOME", str(home))
    return home


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _blob(root: Path, data: bytes | None = None, source: Path | None = None) -> tuple[str, int]:
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    if source is not None:
        digest = sha256_of(source)
        target = blobs / f"sha256-{digest}"
        if not target.exists():
            try:
                os.symlink(source.resolve(), target)  # Ollama's blobs are plain files; a link saves copying weights
            except OSError:
                shutil.copyfile(source, target)
        return digest, source.stat().st_size
    digest = hashlib.sha256(data).hexdigest()
    (blobs / f"sha256-{digest}").write_bytes(data)
    return digest, len(data)


def add_ollama_model(root: Path, gguf: Path, name: str = "tiny", tag: str = "latest", namespace: str = "library",
                     registry: str = "registry.ollama.ai", system: str | None = None,
                     template: str | None = None, params: dict | None = None) -> Path:
    """Put `gguf` in an Ollama store at `root` as registry/namespace/name:tag, the way `ollama pull` lays it out."""
    digest, size = _blob(root, source=gguf)
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": size}]
    for media, text in (("template", template), ("system", system),
                        ("params", json.dumps(params) if params is not None else None)):
        if text is not None:
            d, n = _blob(root, data=text.encode())
            layers.append({"mediaType": f"application/vnd.ollama.image.{media}", "digest": f"sha256:{d}", "size": n})
    config_digest, config_size = _blob(root, data=json.dumps({"model_format": "gguf"}).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                           "digest": f"sha256:{config_digest}", "size": config_size},
                "layers": layers}
    path = root / "manifests" / registry / namespace / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest), encoding="utf-8")
    return path


@pytest.fixture
def ollama_store(tmp_path, monkeypatch) -> Path:
    """An empty Ollama store that OLLAMA_MODELS points at; fill it with add_ollama_model."""
    root = tmp_path / "ollama-models"
    (root / "manifests").mkdir(parents=True)
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    return root
