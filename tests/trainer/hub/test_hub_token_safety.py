"""The Hugging Face token never reaches run folders, configs, events, logs, error messages or exports.

Real child processes: `ft-desk models download` of a gated repo (which only works because the sentinel token is sent),
a denied download, `ft-desk train` on that model, a failing run (bad data file), and an export when the export
command is installed - all with HF_TOKEN set to a sentinel. Then every file written and every byte printed is
searched for it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from fake_hub import Repo

from ft_desk.trainer.hub.credentials import redact

SENTINEL = "hf_SentinelTokenMustNeverLeak0123456789"
SENTINEL_BODY = SENTINEL[3:].encode()  # also catches a token printed without its prefix


def _ft_desk() -> list[str]:
    exe = shutil.which("ft-desk")
    return [exe] if exe else [sys.executable, "-m", "ft_desk.trainer.cli.main"]


def test_redact_removes_the_active_token_and_token_shapes(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "my-org-token-without-prefix")
    text = redact("auth my-org-token-without-prefix and hf_AbCdEfGhIjKlMnOpQrStUv12 in hf_hub_download")
    assert text == "auth hf_*** and hf_*** in hf_hub_download"


@pytest.mark.slow
def test_sentinel_token_is_never_written_or_printed(hub, tmp_path, tiny_files):
    gated = hub.server.repos["acme/gated-tiny"]
    gated.granted_tokens.add(SENTINEL)
    hub.server.add(Repo("acme/gated-denied", dict(tiny_files), gated="manual"))
    ft_home = tmp_path / "ft-home"
    env = hub.env(HF_TOKEN=SENTINEL, FT_DESK_HOME=str(ft_home))
    printed: list[str] = []

    def ft(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(_ft_desk() + list(args), env=env, capture_output=True, text=True, timeout=600,
                              cwd=tmp_path)
        printed.append(proc.stdout + proc.stderr)
        return proc

    proc = ft("models", "download", "acme/gated-tiny", "--json")
    assert proc.returncode == 0, proc.stderr
    assert any(r.headers.get("authorization") == f"Bearer {SENTINEL}" for r in hub.server.requests)

    proc = ft("models", "download", "acme/gated-denied", "--json")
    assert proc.returncode == 2 and "does not have access" in proc.stderr

    train = ["train", "--preset", "demo", "--set", "model.name=acme/gated-tiny", "--set", "train.max_steps=2",
             "--set", "eval.sample_prompts=1", "--set", "eval.max_new_tokens=8", "--set", "data.max_length=128",
             "--set", "train.micro_batch_size=2", "--events", "jsonl"]
    served = hub.server.count()
    proc = ft(*train, "--set", "output.run_name=ok")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert hub.server.count() == served  # training reads the cached snapshot; it never asks the Hub
    run_dir = ft_home / "runs" / "ok"
    assert json.loads((run_dir / "state.json").read_text())["status"] == "completed"

    bad = tmp_path / "bad.jsonl"
    good_row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad.write_text(json.dumps(good_row) + '\n{"messages": [\n', encoding="utf-8")
    proc = ft(*train, "--set", "output.run_name=broken", "--set", f"data.train_file={bad}")
    assert proc.returncode != 0
    assert "bad.jsonl:2" in proc.stdout + proc.stderr

    from ft_desk.trainer.cli.main import COMMANDS

    if "export" in COMMANDS:  # the export command is another part of ft-desk; check it too once it is there
        proc = ft("export", str(run_dir), "--format", "adapter", "--no-verify", "--out", str(tmp_path / "export"))
        assert proc.returncode == 0, proc.stderr[-2000:]

    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len([p for p in written if run_dir in p.parents]) >= 4  # config, state, events, log at least
    leaks = [str(p) for p in written if SENTINEL_BODY in p.read_bytes()]
    assert leaks == []
    assert not [text for text in printed if SENTINEL_BODY.decode() in text]
