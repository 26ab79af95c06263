"""Importing a GGUF file: converted once into a safetensors folder with a provenance record, reused after, and
every bad file refused in one sentence with nothing half-converted left behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ft_desk.trainer.config import ModelConfig
from ft_desk.trainer.errors import ModelError
from ft_desk.trainer.hub import gguf_import
from ft_desk.trainer.hub.gguf_file import read_gguf
from ft_desk.trainer.hub.gguf_import import PROVENANCE, import_gguf, imports_dir, supported_architectures
from ft_desk.trainer.hub.resolve import resolve_model_dir
from tests.trainer.sources.conftest import sha256_of


def _left_behind() -> list[str]:
    """Folders in the imports folder: a failed import must leave none (sources.json alone may remain)."""
    root = imports_dir()
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _logits(folder: Path, dtype="float32"):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 42, 7]])).logits.float()


def test_import_converts_once_records_where_it_came_from_and_reproduces_the_model(tiny_gguf, tiny_model_dir,
                                                                                  fresh_home):
    events = []
    imported = import_gguf(tiny_gguf, on_event=events.append)
    assert not imported.reused
    folder = imported.folder
    assert folder.parent == imports_dir() and (folder / "model.safetensors").is_file()
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    provenance = json.loads((folder / PROVENANCE).read_text())
    header = read_gguf(tiny_gguf)
    assert provenance["sha256"] == sha256_of(tiny_gguf) and folder.name == provenance["sha256"][:16]
    assert provenance["source_path"] == str(tiny_gguf.resolve())
    assert provenance["size_bytes"] == tiny_gguf.stat().st_size
    assert provenance["architecture"] == "llama" and provenance["file_type"] == "F16"
    assert provenance["tensor_types"] == header.tensor_types and sum(header.tensor_types.values()) > 10
    assert provenance["stored_dtype"] == "float16" and provenance["dequantized"] is False
    assert "transformers" in provenance["converted_by"] and provenance["created"]
    phases = [e["phase"] for e in events]
    assert phases[0] == "hash" and "start" in phases and phases[-1] == "done"
    assert all(e["type"] == "model_import" for e in events)
    # The imported folder computes what the original model computes (F16 rounding only).
    import torch

    assert torch.allclose(_logits(folder), _logits(tiny_model_dir, "float16"), atol=2e-2)

    # The next call reuses it without hashing or converting; a touched file is hashed again, still reused.
    events.clear()
    again = import_gguf(tiny_gguf, on_event=events.append)
    assert again.reused and again.folder == folder and [e["phase"] for e in events] == ["reused"]
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    events.clear()
    touched = import_gguf(tiny_gguf, on_event=events.append)
    assert touched.reused and touched.folder == folder
    assert [e["phase"] for e in events][-1] == "reused" and "hash" in [e["phase"] for e in events]
    assert _left_behind() == [folder.name]


def test_a_quantized_gguf_is_dequantized_to_bf16_and_says_so(tiny_gguf_q8, fresh_home):
    events = []
    imported = import_gguf(tiny_gguf_q8, on_event=events.append)
    assert imported.provenance["file_type"] == "Q8_0" and imported.provenance["stored_dtype"] == "bfloat16"
    config = json.loads((imported.folder / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert "dequantized from the GGUF's Q8_0 to bfloat16" in imported.note
    assert "dequantized from the GGUF's Q8_0" in events[-1]["message"]
    assert events[-1]["file_type"] == "Q8_0" and events[-1]["dtype"] == "bfloat16"


def test_resolve_model_dir_imports_a_gguf_path_on_first_use(tiny_gguf, fresh_home):
    folder = resolve_model_dir(ModelConfig(name=str(tiny_gguf)))
    assert (folder / PROVENANCE).is_file()
    assert resolve_model_dir(ModelConfig(name=str(tiny_gguf))) == folder


# --- bad files: one sentence each, nothing left behind ------------------------------------------------------

def test_a_truncated_gguf_is_refused_in_one_sentence(tiny_gguf, tmp_path, fresh_home):
    cut = tmp_path / "cut.gguf"
    data = tiny_gguf.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError) as err:
        import_gguf(cut)
    assert "cut.gguf is truncated" in err.value.message and "\n" not in err.value.message
    assert "again" in err.value.hint
    assert _left_behind() == []
    header_cut = tmp_path / "header-cut.gguf"
    header_cut.write_bytes(data[:200])
    with pytest.raises(ModelError, match="truncated"):
        resolve_model_dir(ModelConfig(name=str(header_cut)))
    assert _left_behind() == []


def test_a_file_that_is_not_a_gguf_is_refused_in_one_sentence(tmp_path, fresh_home):
    fake = tmp_path / "model.gguf"
    fake.write_text("<html>404 not found</html>")
    with pytest.raises(ModelError) as err:
        resolve_model_dir(ModelConfig(name=str(fake)))
    assert err.value.message == f"{fake} is not a GGUF file (it does not start with the GGUF signature)"
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_dir(ModelConfig(name=str(tmp_path / "missing.gguf")))
    assert _left_behind() == []


def test_an_architecture_transformers_cannot_read_names_those_it_can(tmp_path, fresh_home):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(path, "fancyformer")
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError) as err:
        import_gguf(path)
    message = err.value.message
    assert "holds a 'fancyformer' model, which the GGUF loader of transformers" in message
    known = supported_architectures()
    assert "llama" in known and "general" not in known
    assert message.endswith("it reads " + ", ".join(known))
    assert _left_behind() == []


def test_a_conversion_that_fails_midway_leaves_no_folder_and_says_why(tiny_gguf, fresh_home, monkeypatch):
    def broken(gguf_path, facts, dtype, out, progress):
        (out / "model.safetensors").write_bytes(b"half")  # something was written before it failed
        raise RuntimeError("unexpected tensor layout")

    monkeypatch.setattr(gguf_import, "_convert", broken)
    with pytest.raises(ModelError) as err:
        import_gguf(tiny_gguf)
    assert "could not convert" in err.value.message and "unexpected tensor layout" in err.value.message
    assert _left_behind() == []


def test_a_temp_folder_of_a_killed_import_is_swept_on_the_next_one(tiny_gguf, fresh_home):
    root = imports_dir()
    root.mkdir(parents=True)
    stale = root / f"{gguf_import.TEMP_PREFIX}0123456789abcdef-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    imported = import_gguf(tiny_gguf)
    assert not stale.exists() and _left_behind() == [imported.folder.name]


def test_not_enough_disk_is_said_before_converting(tiny_gguf, fresh_home, monkeypatch):
    usage = shutil.disk_usage(Path.cwd())
    monkeypatch.setattr(gguf_import.shutil, "disk_usage", lambda _p: usage._replace(free=1024))
    with pytest.raises(ModelError, match="needs about .* of disk .* and only 1.0 KB is free"):
        import_gguf(tiny_gguf)
    assert _left_behind() == []
