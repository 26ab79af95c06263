"""Ollama models as a base: names as Ollama reads them, found in a store laid out as `ollama pull` leaves it, told
apart from Hub ids, imported like any GGUF, planned before importing, listed with their fit, and exported back
under the source's name with its system prompt."""

from __future__ import annotations

import json

import pytest

from ft_desk.trainer.config import ModelConfig
from ft_desk.trainer.errors import ModelError
from ft_desk.trainer.hub.gguf_import import PROVENANCE, imports_dir
from ft_desk.trainer.hub.ollama_store import find_model, is_ollama_name, list_models, parse_name
from ft_desk.trainer.hub.resolve import gguf_source, resolve_model_dir
from ft_desk.trainer.model_sources import ollama_listing, ollama_source
from ft_desk.trainer.planning import load_model_config, local_model_config, plan_run
from ft_desk.trainer.presets import load_config
from tests.trainer.sources.conftest import add_ollama_model, sha256_of


@pytest.mark.parametrize(("name", "short"), [
    ("smollm2", "smollm2:latest"),
    ("smollm2:135m", "smollm2:135m"),
    ("ollama:smollm2:135m", "smollm2:135m"),
    ("library/smollm2:135m", "smollm2:135m"),
    ("ns/x:tag", "ns/x:tag"),
    ("host.example:5000/ns/x:q4", "host.example:5000/ns/x:q4"),
])
def test_ollama_names_parse_as_ollama_reads_them(name, short):
    assert parse_name(name).short == short


def test_an_ollama_name_is_told_apart_from_a_hub_id():
    assert is_ollama_name("smollm2:135m") and is_ollama_name("ollama:smollm2") and is_ollama_name("ns/x:tag")
    assert not is_ollama_name("Qwen/Qwen2.5-0.5B-Instruct")  # no tag: a Hub id (rule 3 decides at resolve time)
    assert not is_ollama_name("smollm2") and not is_ollama_name("./x:y") and not is_ollama_name("m:tag.gguf")
    assert parse_name("a/b/c/d") is None and parse_name("../x") is None


def test_the_store_is_read_as_ollama_lays_it_out(ollama_store, tiny_gguf):
    add_ollama_model(ollama_store, tiny_gguf, "tiny", "q8", system="You are terse.", template="{{ .Prompt }}",
                     params={"stop": ["<|im_end|>"], "temperature": 0.2})
    found = find_model("tiny:q8")
    assert found.blob.name == f"sha256-{sha256_of(tiny_gguf)}" and found.sha256 == sha256_of(tiny_gguf)
    assert found.size_bytes == tiny_gguf.stat().st_size
    assert found.texts == {"system": "You are terse.", "template": "{{ .Prompt }}",
                           "params": {"stop": ["<|im_end|>"], "temperature": 0.2}}
    assert find_model("tiny") is None  # no :latest
    models, problems = list_models()
    assert [m.name.short for m in models] == ["tiny:q8"] and problems == []


def test_resolving_an_ollama_name_imports_its_blob_once(ollama_store, tiny_gguf, fresh_home):
    add_ollama_model(ollama_store, tiny_gguf, "tiny", "latest", system="Be brief.")
    folder = resolve_model_dir(ModelConfig(name="tiny:latest"))
    provenance = json.loads((folder / PROVENANCE).read_text())
    assert provenance["source_kind"] == "ollama" and provenance["sha256"] == sha256_of(tiny_gguf)
    assert provenance["ollama"]["tiny:latest"]["system"] == "Be brief."
    # Every spelling of the same model is the same import, and an untagged name finds :latest (rule 3).
    for name in ("ollama:tiny", "library/tiny:latest", "tiny"):
        assert resolve_model_dir(ModelConfig(name=name)) == folder
    assert [p.name for p in imports_dir().iterdir() if p.is_dir()] == [folder.name]
    # The same file given by path reuses the import too (same sha256).
    assert resolve_model_dir(ModelConfig(name=str(tiny_gguf))) == folder


def test_a_missing_ollama_model_names_the_tags_the_store_has(ollama_store, tiny_gguf, fresh_home):
    add_ollama_model(ollama_store, tiny_gguf, "tiny", "q8")
    with pytest.raises(ModelError) as err:
        resolve_model_dir(ModelConfig(name="tiny:q4"))
    assert err.value.message == f"Ollama model 'tiny:q4' is not in Ollama's store ({ollama_store}); the store has " \
                                "tiny:q8"
    with pytest.raises(ModelError, match="Ollama's store has tiny:q8"):
        resolve_model_dir(ModelConfig(name="tiny"))  # untagged: not in the HF cache either, and no :latest
    (ollama_store / "blobs" / f"sha256-{sha256_of(tiny_gguf)}").unlink()
    with pytest.raises(ModelError, match="weights of tiny:q8 are missing from its store"):
        resolve_model_dir(ModelConfig(name="tiny:q8"))


def test_no_store_at_all_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="no Ollama store at .*nowhere") as err:
        gguf_source("smollm2:135m")
    assert "OLLAMA_MODELS" in err.value.hint


def test_a_plan_needs_no_import(ollama_store, tiny_gguf, tiny_model_dir, fresh_home):
    add_ollama_model(ollama_store, tiny_gguf, "tiny", "latest")
    tiny = json.loads((tiny_model_dir / "config.json").read_text())
    for name in ("tiny:latest", str(tiny_gguf)):
        config = load_model_config(name)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size"):
            assert config[key] == tiny[key], key
        assert config["model_type"] == "llama" and config["torch_dtype"] == "float16"
        assert local_model_config(name) == config
    run = load_config(["qlora"], ["model.name=tiny:latest"])
    plan = plan_run(load_model_config("tiny:latest"), run, None)
    assert plan.to_dict()["params"] > 100_000
    assert not imports_dir().exists() or not any(p.is_dir() for p in imports_dir().iterdir())


def test_the_listing_has_size_quant_type_and_fit(ollama_store, tiny_gguf_q8, fresh_home):
    from ft_desk.quant.device import DeviceFacts
    from ft_desk.trainer.hub.search import FitCheck

    add_ollama_model(ollama_store, tiny_gguf_q8, "tiny", "q8", system="Hi.")
    fit = FitCheck(load_config(["qlora"], []), DeviceFacts(type="cpu", total_memory=64 * 2**30,
                                                           free_memory=64 * 2**30))
    listing = ollama_listing(fit)
    assert listing["store"] == str(ollama_store) and listing["store_exists"]
    (row,) = listing["models"]
    assert row["name"] == "tiny:q8" and row["id"] == "ollama:tiny:q8" and row["file_type"] == "Q8_0"
    assert row["size_bytes"] == tiny_gguf_q8.stat().st_size and row["architecture"] == "llama"
    assert row["imported"] is False and row["fit"]["verdict"] == "fits"
    assert "dequantized from the GGUF's Q8_0" in row["note"]


def test_export_names_the_tuned_model_after_its_ollama_source(ollama_store, tiny_gguf, fresh_home):
    from ft_desk.trainer.export.ollama import modelfile_text, ollama_model_name

    add_ollama_model(ollama_store, tiny_gguf, "smollm2", "135m", system="You are SmolLM.", template="{{ .Prompt }}")
    folder = resolve_model_dir(ModelConfig(name="smollm2:135m"))
    origin = ollama_source("smollm2:135m", folder)
    assert origin["name"] == "smollm2:135m" and origin["system"] == "You are SmolLM."
    assert ollama_model_name("20261202-sql", None, origin) == "smollm2:ft-20261202-sql"
    assert ollama_model_name("20261202-sql", "My Model:v 2", origin) == "my-model:v-2"
    assert ollama_model_name("20261202-sql", None, None) == "20261202-sql"
    assert ollama_source(str(tiny_gguf), folder) is None  # a plain GGUF path has no Ollama origin
    # The store lost the model: the import record still knows its system prompt.
    (ollama_store / "manifests" / "registry.ollama.ai" / "library" / "smollm2" / "135m").unlink()
    assert ollama_source("smollm2:135m", folder)["system"] == "You are SmolLM."
    text = modelfile_text("m.gguf", None, ["<|im_end|>"], 2048, system=origin["system"], template=origin["template"])
    assert 'SYSTEM """You are SmolLM."""' in text and 'TEMPLATE """{{ .Prompt }}"""' in text


def test_run_names_read_well_for_gguf_and_ollama_bases():
    from ft_desk.trainer.run_folder import slug

    assert slug("/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct.q4_1"
    assert slug("smollm2:135m") == "smollm2-135m" and slug("ollama:ns/x:q4") == "x-q4"
