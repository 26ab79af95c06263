"""Downloading from the local Hub-compatible server: only training files, progress, completeness, safety.

Resuming interrupted downloads is in test_hub_resume.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fake_hub import TOKEN_DENIED, TOKEN_GRANTED

from ft_desk.trainer.config import ModelConfig
from ft_desk.trainer.errors import ModelError
from ft_desk.trainer.hub.resolve import resolve_model_dir

TRAINING = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


def events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def snapshot_files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def test_download_fetches_only_training_files_with_progress_events(hub, cli):
    code, out, _ = cli("models", "download", "acme/tiny-chat", "--json")
    assert code == 0
    evs = events(out)
    assert evs[0]["type"] == "download_started" and evs[-1]["type"] == "download_finished"
    progress = [e for e in evs if e["type"] == "download_progress"]
    done = [e["bytes_done"] for e in progress]
    assert done == sorted(done) and done[-1] == progress[-1]["bytes_total"] == evs[0]["total_bytes"]
    assert {"rate_bytes_per_s", "eta_s", "file", "files_done", "files_total"} <= set(progress[-1])

    result = evs[-1]
    snapshot = Path(result["path"])
    assert snapshot_files(snapshot) == TRAINING | {"model.safetensors"}
    for never in ("pytorch_model.bin", "onnx/model.onnx", "README.md", "original/consolidated.pth"):
        assert not hub.server.file_requests(never) and not hub.server.file_requests(never, "HEAD")
    # usable by name, offline-style: refs/main points at the commit that was downloaded
    assert resolve_model_dir(ModelConfig(name="acme/tiny-chat")) == snapshot
    assert result["commit"] == snapshot.name == hub.server.repos["acme/tiny-chat"].sha

    before = hub.server.count()
    code, out, _ = cli("models", "download", "acme/tiny-chat", "--json")
    assert code == 0 and events(out)[-1]["already_cached"] is True
    assert not [r for r in hub.server.requests[before:] if r.method == "GET" and "/resolve/" in r.path
                and r.path.endswith(".safetensors")]


def test_sharded_weights_skip_the_duplicate_consolidated_file_and_show_a_bar(hub, cli):
    code, out, err = cli("models", "download", "acme/tiny-sharded")
    assert code == 0
    assert "ETA" in err and "100.0%" in err and "/s" in err  # the human progress bar goes to stderr
    assert "downloaded acme/tiny-sharded" in out
    snapshot = resolve_model_dir(ModelConfig(name="acme/tiny-sharded"))
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"} <= snapshot_files(snapshot)
    assert not hub.server.file_requests("consolidated.safetensors")


def test_incomplete_snapshot_is_refused_and_repaired(hub, cli):
    assert cli("models", "download", "acme/tiny-chat", "--json")[0] == 0
    weights = resolve_model_dir(ModelConfig(name="acme/tiny-chat")) / "model.safetensors"
    blob = weights.resolve()
    blob.write_bytes(blob.read_bytes()[:-1000])  # an interrupted copy / damaged file
    with pytest.raises(ModelError, match="model.safetensors is cut off.*interrupted download") as info:
        resolve_model_dir(ModelConfig(name="acme/tiny-chat"))
    assert "ft-desk models download acme/tiny-chat" in info.value.hint

    _, out, _ = cli("models", "list", "--json")
    listed = json.loads(out)["models"][0]
    assert listed["repo_id"] == "acme/tiny-chat" and listed["complete"] is False

    assert cli("models", "download", "acme/tiny-chat", "--json")[0] == 0
    assert resolve_model_dir(ModelConfig(name="acme/tiny-chat")) == weights.parent


def test_gated_repo_explains_access_and_login(hub, cli, monkeypatch):
    code, out, err = cli("models", "download", "acme/gated-tiny")
    assert code == 2
    assert "gated" in err and f"{hub.url}/acme/gated-tiny" in err
    assert "hf auth login" in err and "HF_TOKEN" in err and "not logged in" in err

    monkeypatch.setenv("HF_TOKEN", TOKEN_DENIED)
    code, out, err = cli("models", "download", "acme/gated-tiny", "--json")
    assert code == 2 and "does not have access" in err
    failed = events(out)[-1]
    assert failed["type"] == "download_failed" and "gated" in failed["error"]
    assert TOKEN_DENIED not in out + err

    monkeypatch.setenv("HF_TOKEN", TOKEN_GRANTED)
    code, out, err = cli("models", "download", "acme/gated-tiny", "--json")
    assert code == 0 and TOKEN_GRANTED not in out + err
    assert resolve_model_dir(ModelConfig(name="acme/gated-tiny")).is_dir()


def test_pickle_only_weights_need_allow_pickle(hub, cli):
    code, _, err = cli("models", "download", "acme/pickle-only")
    assert code == 2 and "pickle" in err and "--allow-pickle" in err
    assert not (hub.cache / "models--acme--pickle-only").exists()  # refused before anything was written
    assert not hub.server.file_requests("pytorch_model.bin")

    assert cli("models", "download", "acme/pickle-only", "--allow-pickle", "--json")[0] == 0
    with pytest.raises(ModelError, match="only pickle weights"):
        resolve_model_dir(ModelConfig(name="acme/pickle-only"))
    assert (resolve_model_dir(ModelConfig(name="acme/pickle-only", allow_pickle=True)) / "pytorch_model.bin").is_file()


def test_remote_code_needs_trust_and_is_pinned_to_the_reviewed_commit(hub, cli):
    commit = hub.server.repos["acme/remote-code"].sha
    code, _, err = cli("models", "download", "acme/remote-code")
    assert code == 2 and "Python code" in err and "--trust-remote-code" in err and commit in err
    assert not (hub.cache / "models--acme--remote-code").exists()

    code, out, _ = cli("models", "download", "acme/remote-code", "--trust-remote-code")
    assert code == 0 and f"--set model.revision={commit}" in out
    snapshot = hub.cache / "models--acme--remote-code" / "snapshots" / commit
    assert {"configuration_acme.py", "modeling_acme.py"} <= snapshot_files(snapshot)

    with pytest.raises(ModelError, match="needs to run Python code"):
        resolve_model_dir(ModelConfig(name="acme/remote-code"))
    with pytest.raises(ModelError, match="must pin the commit") as info:
        resolve_model_dir(ModelConfig(name="acme/remote-code", trust_remote_code=True))
    assert commit in info.value.hint
    assert resolve_model_dir(ModelConfig(name="acme/remote-code", trust_remote_code=True, revision=commit)) == snapshot


def test_file_names_escaping_the_folder_reject_the_repo_before_writing(hub, cli, tmp_path):
    code, _, err = cli("models", "download", "acme/evil-names")
    assert code == 2 and "escape the download folder" in err and "../evil" in err
    assert not (hub.cache / "models--acme--evil-names").exists()
    assert not list(tmp_path.rglob("evil*"))
    assert not [r for r in hub.server.requests if "/resolve/" in r.path]


def test_list_and_remove_cached_models(hub, cli, monkeypatch):
    assert cli("models", "download", "acme/tiny-chat", "--json")[0] == 0
    assert cli("models", "download", "acme/tiny-sharded", "--json")[0] == 0
    code, out, _ = cli("models", "list", "--json")
    listed = {m["repo_id"]: m for m in json.loads(out)["models"]}
    assert set(listed) == {"acme/tiny-chat", "acme/tiny-sharded"}
    assert all(m["complete"] and m["size_bytes"] > 500_000 for m in listed.values())
    assert listed["acme/tiny-chat"]["revisions"][0]["refs"] == ["main"]
    code, out, _ = cli("models", "list")
    assert "acme/tiny-sharded" in out and "KB" in out and "2 model(s)" in out

    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    code, out, _ = cli("models", "rm", "acme/tiny-chat")
    assert code == 1 and "nothing removed" in out and (hub.cache / "models--acme--tiny-chat").is_dir()
    code, _, err = cli("models", "rm", "acme/tiny-chat", "--json")
    assert code == 2 and "--yes" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    code, out, _ = cli("models", "rm", "acme/tiny-chat")
    assert code == 0 and "freed" in out and not (hub.cache / "models--acme--tiny-chat").exists()
    code, out, _ = cli("models", "rm", "acme/tiny-sharded", "--yes", "--json")
    assert code == 0 and json.loads(out)["freed_bytes"] > 500_000
    assert json.loads(cli("models", "list", "--json")[1])["models"] == []
    assert cli("models", "rm", "acme/tiny-sharded", "--yes")[0] == 2  # nothing left to remove


def test_progress_reports_bytes_rate_and_eta_from_the_clock():
    from ft_desk.trainer.events import ListSink
    from ft_desk.trainer.hub.download import DownloadProgress

    now = [0.0]
    sink = ListSink()
    progress = DownloadProgress(sink, "acme/x", total_bytes=1000, files_total=2, clock=lambda: now[0], interval=0)
    progress.file_started("a.safetensors")
    progress.resume(100)  # kept from an interrupted download: counts as done, not towards the rate
    now[0] = 1.0
    progress.add(100)
    last = sink.events[-1]
    assert (last["bytes_done"], last["rate_bytes_per_s"], last["eta_s"]) == (200, 100.0, 8.0)
    assert last["bytes_resumed"] == 100
    now[0] = 2.0
    progress.add(300)
    assert (sink.events[-1]["rate_bytes_per_s"], sink.events[-1]["eta_s"]) == (200.0, 2.5)
    now[0] = 10.0  # a stall: the rate follows the last seconds, not the whole download
    progress.add(100)
    assert sink.events[-1]["rate_bytes_per_s"] == 12.5
    progress.file_finished()
    assert sink.events[-1]["files_done"] == 1 and sink.events[-1]["type"] == "download_progress"
