"""`ft-desk demo` trains a real small instruct model when one is already on this machine, and otherwise the tiny
random model with one line on how to get the real one. Nothing is downloaded either way."""

from __future__ import annotations

import argparse

from ft_desk.trainer.cli import train as train_cli


def demo_args(**extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser, "demo")
    return parser.parse_args([f"--{k}={v}" for k, v in extra.items()])


def test_demo_uses_a_cached_real_instruct_model(monkeypatch, tmp_path):
    cached = {"HuggingFaceTB/SmolLM2-135M-Instruct": tmp_path}
    monkeypatch.setattr(train_cli, "find_snapshot", lambda repo, revision=None: cached.get(repo))
    cfg = train_cli.resolve_config(demo_args())
    assert cfg.model.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg.data.train_file == "demo" and cfg.train.method == "qlora"
    assert cfg.train.micro_batch_size == "auto"  # the real preset sizes itself; the tiny one is hand-set
    assert "lm_head" not in cfg.lora.target_modules


def test_demo_without_a_real_model_trains_the_tiny_one(monkeypatch):
    monkeypatch.setattr(train_cli, "find_snapshot", lambda repo, revision=None: None)
    cfg = train_cli.resolve_config(demo_args())
    assert cfg.model.name == "demo"
    assert "SmolLM2-135M-Instruct" in train_cli.GET_REAL_DEMO and "ft-desk demo" in train_cli.GET_REAL_DEMO


def test_an_explicit_model_or_preset_is_never_replaced(monkeypatch, tmp_path):
    monkeypatch.setattr(train_cli, "find_snapshot", lambda repo, revision=None: tmp_path)
    assert train_cli.resolve_config(demo_args(model="demo")).model.name == "demo"
    assert train_cli.resolve_config(demo_args(preset="demo")).model.name == "demo"


def test_demo_uses_an_imported_gguf_of_the_real_model(monkeypatch, tmp_path):
    import json

    monkeypatch.setattr(train_cli, "find_snapshot", lambda repo, revision=None: None)
    folder = tmp_path / "imported" / "0123abcd"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "provenance.json").write_text(json.dumps({
        "gguf_name": "Smollm2 135M 8k", "source_path": "/models/SmolLM2-135M-Instruct.Q4_1.gguf"}))
    monkeypatch.setattr(train_cli, "imports_dir", lambda: tmp_path / "imported")
    monkeypatch.setattr(train_cli, "read_provenance",
                        lambda f: json.loads((f / "provenance.json").read_text()) if (f / "provenance.json").is_file()
                        else None)
    assert train_cli.resolve_config(demo_args()).model.name == str(folder)
