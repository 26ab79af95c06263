"""Export fixtures: tiny models and hand-made runs, built once per session (see runs.py)."""

from __future__ import annotations

import os

import pytest

from .runs import build_model, make_run


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """Export tests run torch and llama.cpp with one thread, here and in the child processes they start (reloads,
    llama.cpp, training). The test models are too small to gain from a second thread, and on a shared 2-core machine
    its spin-waits cost CPU: measured 15% of the CPU time at the same wall time, and far more when the other core is
    busy. Restored after the export tests."""
    import torch

    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


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
