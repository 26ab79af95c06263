"""Search, the curated list and model details against the local Hub-compatible server."""

from __future__ import annotations

import json

from ft_desk.trainer.hub.folder_check import safetensors_param_count
from ft_desk.trainer.hub.search import load_catalog


def ids(result: dict) -> list[str]:
    return [m["id"] for m in result["models"]]


def test_search_sorts_filters_and_follows_pages(hub, cli, tiny_repo_dir):
    code, out, _ = cli("models", "search", "tiny", "--sort", "likes", "--no-fit", "--json")
    assert code == 0
    result = json.loads(out)
    # text-generation models only (the classifier is filtered out), most liked first
    assert ids(result) == ["acme/tiny-sharded", "acme/tiny-chat", "acme/tiny-coder"] + ids(result)[3:]
    assert "acme/tiny-classifier" not in ids(result)
    assert len(ids(result)) == 4  # more than the server's page size of 3: the Link pages were followed
    assert any("cursor" in r.query for r in hub.server.requests if r.path == "/api/models")

    _, out, _ = cli("models", "search", "tiny", "--sort", "downloads", "--no-fit", "--json")
    assert ids(json.loads(out))[:3] == ["acme/tiny-chat", "acme/tiny-coder", "acme/tiny-sharded"]
    _, out, _ = cli("models", "search", "tiny", "--sort", "updated", "--no-fit", "--json")
    assert ids(json.loads(out))[0] == "acme/tiny-coder"

    row = next(m for m in result["models"] if m["id"] == "acme/tiny-sharded")
    params = safetensors_param_count(tiny_repo_dir / "model.safetensors")
    assert row["params"] == params  # from the Hub's safetensors metadata
    assert row["size_bytes"] == params * 4  # float32 weights
    assert row["license"] == "mit" and row["gated"] is False
    assert row["last_modified"].startswith("2024-05-01")
    gated = next(m for m in result["models"] if m["id"] == "acme/gated-tiny")
    assert gated["gated"] is True


def test_search_without_query_lists_curated_models_first(hub, cli):
    code, out, _ = cli("models", "search", "--no-fit", "--json")
    assert code == 0
    result = json.loads(out)
    curated = [e.id for e in load_catalog()]
    assert ids(result)[: len(curated)] == curated
    assert all(m["curated"] for m in result["models"][: len(curated)])
    assert "acme/tiny-chat" in ids(result)[len(curated):]  # then the Hub's most downloaded
    assert result["source"] == "curated+hub" and result["offline"] is False


def test_human_search_output_is_a_table(hub, cli):
    code, out, _ = cli("models", "search", "tiny", "--no-fit")
    assert code == 0
    header = out.splitlines()[0]
    for column in ("MODEL", "PARAMS", "SIZE", "LICENSE", "GATED", "UPDATED", "FIT"):
        assert column in header
    assert "acme/tiny-chat" in out and "gated" in out


def test_model_info_reports_size_license_gated_and_weights(hub, cli, tiny_files):
    code, out, _ = cli("models", "info", "acme/tiny-chat", "--no-fit", "--json")
    assert code == 0
    info = json.loads(out)
    training = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "model.safetensors"]
    assert info["size_bytes"] == sum(len(tiny_files[f]) for f in training)  # not the .bin/.onnx extras
    assert info["repo_size_bytes"] > info["size_bytes"]
    assert info["files_to_download"] == len(training)
    assert info["license"] == "apache-2.0" and info["gated"] is False and info["weights_format"] == "safetensors"
    assert info["last_modified"].startswith("2024-03-01") and info["remote_code"] is None
    assert info["model_page"] == f"{hub.url}/acme/tiny-chat"

    _, out, _ = cli("models", "info", "acme/gated-tiny", "--no-fit", "--json")
    assert json.loads(out)["gated"] is True
    _, out, _ = cli("models", "info", "acme/remote-code", "--no-fit", "--json")
    assert "configuration_acme" in json.loads(out)["remote_code"]
    _, out, _ = cli("models", "info", "acme/evil-names", "--no-fit", "--json")
    assert "../evil" in json.loads(out)["unsafe_file_names"]

    code, _, err = cli("models", "info", "acme/no-such-model", "--no-fit")
    assert code == 2 and "acme/no-such-model was not found on the Hub" in err
    code, _, err = cli("models", "download", "../acme/tiny-chat")
    assert code == 2 and "is not a Hub model id" in err


def test_fit_verdict_from_config_alone(hub, cli):
    code, out, _ = cli("models", "info", "acme/tiny-chat", "--json", "--set", "train.device=cpu")
    assert code == 0
    fit = json.loads(out)["fit"]
    assert fit["verdict"] in ("fits", "tight", "does not fit", "unknown device")
    assert fit["total_bytes"] > 0 and fit["components"]
    # config.json was read in memory, never written to the cache
    assert not (hub.cache / "models--acme--tiny-chat").exists()

    _, out, _ = cli("models", "search", "tiny", "--json", "--set", "train.device=cpu")
    rows = {m["id"]: m for m in json.loads(out)["models"]}
    assert rows["acme/tiny-chat"]["fit"]["verdict"] in ("fits", "tight", "does not fit", "unknown device")
    assert rows["acme/gated-tiny"]["fit"]["verdict"] == "unknown"  # its config.json needs access


def test_every_curated_entry_is_complete():
    entries = load_catalog()
    assert len(entries) >= 12 and len({e.id for e in entries}) == len(entries)
    for e in entries:
        assert "/" in e.id and e.params > 50_000_000 and e.max_length >= 512
        assert e.lora_target_modules and e.license and e.chat_template and e.note
