"""Fixtures for the Hub tests: tiny model repos served by a local Hub-compatible server (fake_hub.py).

`hub` starts a fresh server per test and points huggingface_hub at it - in this process by patching its constants
(it reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE when imported), and for child processes through the
environment - with an empty HF cache and token store in tmp_path. Offline mode is switched off only inside these
tests (monkeypatch), so every other test keeps HF_HUB_OFFLINE=1 from tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_hub import TOKEN_GRANTED, FakeHub, Repo  # noqa: E402


@pytest.fixture(scope="session")
def tiny_repo_dir(tmp_path_factory) -> Path:
    """One tiny Llama (random weights, widths multiple of 32, tokenizer trained locally) served as many repos."""
    from ft_desk.trainer.demo import TinyShape, build_tiny_model

    out = tmp_path_factory.mktemp("hub-tiny")
    shape = TinyShape(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    return build_tiny_model(out, shape)


@pytest.fixture(scope="session")
def tiny_files(tiny_repo_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in tiny_repo_dir.iterdir() if p.is_file()}


def sharded(files: dict[str, bytes]) -> dict[str, bytes]:
    """The same model as two safetensors shards + index, plus a duplicate consolidated file (never downloaded)."""
    from safetensors.numpy import load, save

    tensors = load(files["model.safetensors"])
    names = sorted(tensors)
    half = len(names) // 2
    out = {k: v for k, v in files.items() if k != "model.safetensors"}
    shard_names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for shard, chunk in zip(shard_names, (names[:half], names[half:])):
        out[shard] = save({n: tensors[n] for n in chunk})
        weight_map.update({n: shard for n in chunk})
    total = sum(t.nbytes for t in tensors.values())
    out["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}).encode()
    out["consolidated.safetensors"] = files["model.safetensors"]
    return out


def with_config(files: dict[str, bytes], **changes) -> dict[str, bytes]:
    config = json.loads(files["config.json"])
    config.update(changes)
    return {**files, "config.json": json.dumps(config, indent=2).encode()}


@dataclass
class HubSetup:
    server: FakeHub
    cache: Path
    home: Path

    @property
    def url(self) -> str:
        return self.server.url

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a child `ft-desk` process that talks to this server."""
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("TRANSFORMERS_OFFLINE", None)
        env.update(HF_ENDPOINT=self.server.url, HF_HUB_CACHE=str(self.cache), HF_HOME=str(self.home / "hf-home"),
                   HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1", **extra)
        return env


def standard_repos(tiny_files: dict[str, bytes]) -> list[Repo]:
    base = dict(tiny_files)
    # Files a training run does not need: must never be fetched.
    noise = {"README.md": b"# tiny\n", ".gitattributes": b"*.safetensors filter=lfs\n",
             "pytorch_model.bin": b"PICKLE" * 100, "onnx/model.onnx": b"ONNX" * 100,
             "original/consolidated.pth": b"PTH" * 100}
    code = b"raise SystemExit('ft-desk must never import this')\n"
    return [
        Repo("acme/tiny-chat", {**base, **noise}, downloads=500, likes=5, last_modified="2024-03-01T00:00:00.000Z"),
        Repo("acme/tiny-sharded", sharded(base), downloads=50, likes=40, last_modified="2024-05-01T00:00:00.000Z",
             license="mit"),
        Repo("acme/tiny-coder", base, downloads=200, likes=1, last_modified="2024-09-01T00:00:00.000Z"),
        Repo("acme/tiny-classifier", base, downloads=9999, pipeline_tag="text-classification"),
        Repo("acme/gated-tiny", base, gated="manual", granted_tokens={TOKEN_GRANTED}, license="llama3.2"),
        Repo("acme/pickle-only", {**{k: v for k, v in base.items() if k != "model.safetensors"},
                                  "pytorch_model.bin": _pickled_state(base["model.safetensors"])}),
        Repo("acme/remote-code", {
            **with_config(base, model_type="acme_tiny", architectures=["AcmeForCausalLM"],
                          auto_map={"AutoConfig": "configuration_acme.AcmeConfig",
                                    "AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"}),
            "configuration_acme.py": code, "modeling_acme.py": code}),
        Repo("acme/evil-names", base, extra_tree_paths=["../evil", "sub/../../evil.py"]),
    ]


def _pickled_state(safetensors_bytes: bytes) -> bytes:
    import io

    import torch  # the pickle-only repo holds a real torch.save file
    from safetensors.torch import load

    buffer = io.BytesIO()
    torch.save(load(safetensors_bytes), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def repos_template(tiny_files) -> list[Repo]:
    return standard_repos(tiny_files)


@pytest.fixture
def hub(repos_template, tmp_path, monkeypatch):
    """A running fake Hub with the standard repos; huggingface_hub (here and in children) points at it."""
    import copy

    from huggingface_hub import constants

    server = FakeHub()
    for repo in repos_template:
        server.add(copy.deepcopy(repo))
    server.start()
    cache = tmp_path / "hf-cache"
    home = tmp_path
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf-home" / ".agent_harnesses.json"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    setup = HubSetup(server, cache, home)
    yield setup
    server.stop()


@pytest.fixture
def go_offline(monkeypatch):
    """Switch huggingface_hub (and ft-desk, which asks it) to offline mode for the rest of the test."""
    from huggingface_hub import constants

    def _offline() -> None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    return _offline


@pytest.fixture
def block_network(monkeypatch):
    """Call it to start refusing - and recording - every outgoing connection attempt from this process, to any host."""
    import socket

    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args[1] if len(args) > 1 else args[0])
        raise ConnectionRefusedError("this test forbids network connections")

    def start() -> list[object]:
        monkeypatch.setattr(socket.socket, "connect", refuse)
        monkeypatch.setattr(socket.socket, "connect_ex", refuse)
        monkeypatch.setattr(socket, "create_connection", refuse)
        return attempts

    return start


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run `ft-desk ARGV` in this process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from ft_desk.trainer.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def cli():
    return run_cli
