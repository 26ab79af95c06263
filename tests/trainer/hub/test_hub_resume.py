"""Interrupted downloads continue from their last byte, in the same process (a cut connection) and in the next one
(a cancel with SIGTERM, a SIGKILL); what lands in the cache is checked against the Hub's checksums and laid out the
way huggingface_hub and transformers read it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_hub import Repo, git_blob_sha1

from ft_desk.trainer.config import ModelConfig
from ft_desk.trainer.errors import ModelError
from ft_desk.trainer.hub import download as hub_download
from ft_desk.trainer.hub.resolve import resolve_model_dir

SHARD = "model-00001-of-00002.safetensors"  # ~400 KB: the last, largest file of acme/tiny-sharded
PLAN_READS = {"config.json", "tokenizer_config.json", "model.safetensors.index.json"}  # read in memory every time


def events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def range_start(request) -> int | None:
    value = request.headers.get("range")
    return int(value.removeprefix("bytes=").rstrip("-")) if value else None


def partials(hub, repo_id: str) -> list[Path]:
    return list((hub.cache / ("models--" + repo_id.replace("/", "--")) / "blobs").glob("*.ftdesk-partial"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def start_slow_download(hub, repo_id: str, path: str) -> subprocess.Popen:
    """`ft-desk models download` in a child process, with `path` on the wire (trickling) when this returns."""
    hub.server.slow[(repo_id, path)] = 0.3  # 16 KB every 0.3 s: ~8 s for the shard, plenty of time to stop it
    child = subprocess.Popen([sys.executable, "-m", "ft_desk.trainer.cli", "models", "download", repo_id, "--json"],
                             env=hub.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while hub.server.trickled.get((repo_id, path), 0) < 64 * 1024:
        assert child.poll() is None and time.monotonic() < deadline, "the slow file never started"
        time.sleep(0.05)
    return child


def test_cut_transfer_resumes_with_a_range_request(hub, cli, monkeypatch, tiny_files):
    monkeypatch.setattr(hub_download, "RETRY_WAIT_S", 0.0)
    hub.server.cut_once.add(("acme/tiny-chat", "model.safetensors"))
    code, out, _ = cli("models", "download", "acme/tiny-chat", "--json")
    assert code == 0
    gets = hub.server.file_requests("model.safetensors")
    assert len(gets) == 2 and range_start(gets[0]) is None
    assert 0 < range_start(gets[1]) < len(tiny_files["model.safetensors"])
    path = Path(events(out)[-1]["path"]) / "model.safetensors"
    assert sha256(path.read_bytes()) == sha256(tiny_files["model.safetensors"])
    final = [e for e in events(out) if e["type"] == "download_progress"][-1]
    assert final["bytes_done"] == final["bytes_total"]  # the retry did not double-count the first half
    assert final["bytes_resumed"] == 0  # it was received in this process: it counts towards the rate


def test_cancelled_download_keeps_the_partial_file_and_continues_from_its_last_byte(hub, cli, tiny_files):
    child = start_slow_download(hub, "acme/tiny-sharded", SHARD)
    child.send_signal(signal.SIGTERM)  # how the TUI cancels
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130
    evs = events(out)
    assert evs[-1]["type"] == "download_failed" and evs[-1]["cancelled"] is True
    during = [e["bytes_done"] for e in evs if e["type"] == "download_progress" and e["file"] == SHARD]
    assert len(set(during)) >= 2  # the bar moved while the shard was on the wire, not only between files
    [partial] = partials(hub, "acme/tiny-sharded")
    kept = partial.stat().st_size
    shard_bytes = len(hub.server.repos["acme/tiny-sharded"].files[SHARD])
    assert 0 < kept < shard_bytes and partial.name == sha256(hub.server.repos["acme/tiny-sharded"].files[SHARD]) \
        + ".ftdesk-partial"
    assert not list(hub.cache.rglob("*.incomplete"))
    with pytest.raises(ModelError):
        resolve_model_dir(ModelConfig(name="acme/tiny-sharded"))  # never mistaken for a whole snapshot
    listing = json.loads(cli("models", "list", "--json")[1])
    assert listing["resumable_downloads"] == {"acme/tiny-sharded": kept}
    assert "`ft-desk models download acme/tiny-sharded` continues from there" in cli("models", "list")[1]

    del hub.server.slow[("acme/tiny-sharded", SHARD)]
    before = hub.server.count()
    code, out, _ = cli("models", "download", "acme/tiny-sharded", "--json")
    assert code == 0
    gets = [r for r in hub.server.requests[before:] if r.method == "GET" and "/resolve/" in r.path
            and r.path.rsplit("/", 1)[-1] not in PLAN_READS]
    assert [g.path.rsplit("/", 1)[-1] for g in gets] == [SHARD]  # files finished before the cancel are kept
    assert range_start(gets[0]) == kept
    evs = events(out)
    assert evs[0]["resumable_bytes"] == kept
    result = evs[-1]
    assert result["bytes_resumed"] == kept and result["bytes_downloaded"] == shard_bytes - kept
    assert [e for e in evs if e["type"] == "download_progress"][-1]["bytes_done"] == result["bytes_total"]
    snapshot = resolve_model_dir(ModelConfig(name="acme/tiny-sharded"))
    assert (snapshot / SHARD).read_bytes() == hub.server.repos["acme/tiny-sharded"].files[SHARD]
    assert partials(hub, "acme/tiny-sharded") == []


def test_killed_download_resumes_and_a_concurrent_one_is_refused(hub, cli, tiny_files):
    repo = hub.server.repos["acme/tiny-sharded"]
    child = start_slow_download(hub, "acme/tiny-sharded", SHARD)
    try:
        # A second download of the same repo meanwhile: it takes the finished files and stops at the busy one.
        code, out, err = cli("models", "download", "acme/tiny-sharded", "--json")
        assert code == 2 and "another download of" in err and SHARD in err
        assert "ft-desk models download acme/tiny-sharded" in err
        assert events(out)[-1]["type"] == "download_failed"
    finally:
        child.kill()  # SIGKILL: no cleanup at all, like a crash or a power cut
        child.communicate(timeout=60)
    [partial] = partials(hub, "acme/tiny-sharded")
    kept = partial.stat().st_size
    assert 0 < kept <= hub.server.trickled[("acme/tiny-sharded", SHARD)] < len(repo.files[SHARD])

    del hub.server.slow[("acme/tiny-sharded", SHARD)]
    before = hub.server.count()
    code, out, _ = cli("models", "download", "acme/tiny-sharded", "--json")
    assert code == 0
    [get] = [r for r in hub.server.requests[before:] if r.method == "GET" and r.path.endswith("/" + SHARD)]
    assert get.headers["range"] == f"bytes={kept}-"
    snapshot = resolve_model_dir(ModelConfig(name="acme/tiny-sharded"))
    assert sha256((snapshot / SHARD).read_bytes()) == sha256(repo.files[SHARD])


def test_server_ignoring_range_restarts_the_file_cleanly(hub, cli, tiny_files):
    weights = tiny_files["model.safetensors"]
    blobs = hub.cache / "models--acme--tiny-chat" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / (sha256(weights) + ".ftdesk-partial")).write_bytes(weights[:200_000])
    hub.server.ignore_range.add(("acme/tiny-chat", "model.safetensors"))

    code, out, _ = cli("models", "download", "acme/tiny-chat", "--json")
    assert code == 0
    [get] = hub.server.file_requests("model.safetensors")
    assert get.headers["range"] == "bytes=200000-"  # asked for the rest, got the whole file
    evs = events(out)
    assert evs[0]["resumable_bytes"] == 200_000 and evs[-1]["bytes_resumed"] == 0
    done = [e["bytes_done"] for e in evs if e["type"] == "download_progress"]
    assert max(done) <= evs[0]["total_bytes"] == done[-1]  # the restart did not count the file twice
    assert (Path(evs[-1]["path"]) / "model.safetensors").read_bytes() == weights
    assert partials(hub, "acme/tiny-chat") == []


def test_damaged_partial_file_is_caught_by_the_checksum_and_removed(hub, cli, tiny_files):
    weights = tiny_files["model.safetensors"]
    blobs = hub.cache / "models--acme--tiny-chat" / "blobs"
    blobs.mkdir(parents=True)
    partial = blobs / (sha256(weights) + ".ftdesk-partial")
    partial.write_bytes(b"\0" * 4096 + weights[4096:200_000])  # e.g. a crash left zeros where data should be

    code, out, err = cli("models", "download", "acme/tiny-chat", "--json")
    assert code == 2
    assert "model.safetensors of acme/tiny-chat does not match the checksum the Hub published" in err
    assert "partial file was deleted" in err and "ft-desk models download acme/tiny-chat" in err
    failed = events(out)[-1]
    assert failed["type"] == "download_failed" and "checksum" in failed["error"]
    assert range_start(hub.server.file_requests("model.safetensors")[0]) == 200_000
    assert not partial.exists() and not (blobs / sha256(weights)).exists()
    with pytest.raises(ModelError):
        resolve_model_dir(ModelConfig(name="acme/tiny-chat"))

    code, out, _ = cli("models", "download", "acme/tiny-chat", "--json")  # the fix the message names
    assert code == 0 and range_start(hub.server.file_requests("model.safetensors")[-1]) is None
    assert (Path(events(out)[-1]["path"]) / "model.safetensors").read_bytes() == weights


def test_cache_is_huggingface_hub_layout_readable_by_hf_and_transformers_offline(hub, cli, tiny_files, go_offline,
                                                                                 block_network):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    template = b"{% for m in messages %}{{ m['content'] }}{% endfor %}"
    hub.server.add(Repo("acme/tiny-nested", {**tiny_files, "additional_chat_templates/plain.jinja": template}))
    code, out, _ = cli("models", "download", "acme/tiny-nested", "--json")
    assert code == 0
    snapshot = Path(events(out)[-1]["path"])
    blobs = hub.cache / "models--acme--tiny-nested" / "blobs"
    links = {str(p.relative_to(snapshot)): os.readlink(p) for p in snapshot.rglob("*") if p.is_symlink()}
    assert {"config.json", "model.safetensors", "additional_chat_templates/plain.jinja"} <= set(links)
    # relative links to blobs named by the Hub's ETag: sha256 for LFS files, the git blob sha1 for small ones
    assert links["model.safetensors"] == "../../blobs/" + sha256(tiny_files["model.safetensors"])
    assert links["config.json"] == "../../blobs/" + git_blob_sha1(tiny_files["config.json"])
    assert links["additional_chat_templates/plain.jinja"] == "../../../blobs/" + git_blob_sha1(template)
    assert sorted(p.name for p in blobs.iterdir()) == sorted(Path(t).name for t in links.values())
    assert (hub.cache / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")

    info = scan_cache_dir(hub.cache)
    assert info.warnings == [] and not info.incomplete_files
    [cached] = [r for r in info.repos if r.repo_id == "acme/tiny-nested"]
    [revision] = cached.revisions
    assert revision.refs == {"main"} and len(revision.files) == len(links)
    assert revision.size_on_disk == sum((snapshot / name).stat().st_size for name in links)
    for name in ("config.json", "additional_chat_templates/plain.jinja"):
        assert try_to_load_from_cache("acme/tiny-nested", name, cache_dir=hub.cache) == str(snapshot / name)

    go_offline()
    attempts = block_network()
    from safetensors.numpy import load
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained("acme/tiny-nested", cache_dir=hub.cache)
    tokenizer = AutoTokenizer.from_pretrained("acme/tiny-nested", cache_dir=hub.cache)
    model = AutoModelForCausalLM.from_pretrained("acme/tiny-nested", cache_dir=hub.cache)
    assert config.hidden_size == 64 and tokenizer("hello world")["input_ids"]
    name, expected = next(iter(load(tiny_files["model.safetensors"]).items()))
    assert (model.state_dict()[name].numpy() == expected).all()
    assert attempts == []


def test_without_symlinks_the_snapshot_holds_the_files_themselves(hub, cli, monkeypatch, tiny_files):
    from huggingface_hub import constants, try_to_load_from_cache

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_SYMLINKS", True)  # what Windows without developer mode gets
    code, out, _ = cli("models", "download", "acme/tiny-coder", "--json")
    assert code == 0
    snapshot = resolve_model_dir(ModelConfig(name="acme/tiny-coder"))
    assert not [p for p in snapshot.rglob("*") if p.is_symlink()]
    assert (snapshot / "model.safetensors").read_bytes() == tiny_files["model.safetensors"]
    assert try_to_load_from_cache("acme/tiny-coder", "model.safetensors", cache_dir=hub.cache) == \
        str(snapshot / "model.safetensors")
    code, out, _ = cli("models", "download", "acme/tiny-coder", "--json")
    assert code == 0 and events(out)[-1]["already_cached"] is True


def test_stale_huggingface_hub_partials_are_removed_and_live_ones_kept(hub, cli):
    from filelock import FileLock

    blobs = hub.cache / "models--acme--tiny-chat" / "blobs"
    blobs.mkdir(parents=True)
    old = time.time() - 2 * hub_download.STALE_INCOMPLETE_S
    stale = blobs / ("a" * 64 + ".1a2b3c4d.incomplete")  # left by a killed huggingface_hub download
    fresh = blobs / ("b" * 64 + ".5e6f7a8b.incomplete")  # being written right now
    locked = blobs / ("c" * 64 + ".9c0d1e2f.incomplete")  # quiet, but its download still holds the lock
    for path, size in ((stale, 3000), (fresh, 2000), (locked, 1000)):
        path.write_bytes(b"x" * size)
    os.utime(stale, (old, old))
    os.utime(locked, (old, old))
    lock_file = hub.cache / ".locks" / "models--acme--tiny-chat" / ("c" * 64 + ".lock")
    lock_file.parent.mkdir(parents=True)

    with FileLock(str(lock_file)):
        code, out, _ = cli("models", "download", "acme/tiny-chat", "--json")
    assert code == 0 and events(out)[-1]["stale_partials_freed_bytes"] == 3000
    assert not stale.exists() and fresh.exists() and locked.exists()
