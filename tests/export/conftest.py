"""Export fixtures: tiny models and hand-made runs, built once per session (see runs.py)."""

from __future__ import annotations

import pytest

from .runs import build_model, make_run


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def qlora_run(tmp_path_factory, llama_dir):
    return make_run(tmp_path_factory.mktemp("runs"), llama_dir, "qlora")


@pytest.fixture(scope="session")
def tied_model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tied_added_run(tmp_path_factory, tied_model_dir):
    """QLoRA run on a tied-embedding model whose tokenizer gained a special token (vocabulary resized)."""
    return make_run(tmp_path_factory.mktemp("runs-tied"), tied_model_dir, "qlora", added_token="<|tool|>")


@pytest.fixture
def out_dir(tmp_path):
    return tmp_path / "export"
