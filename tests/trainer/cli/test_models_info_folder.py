"""`ft-desk models info FOLDER`: a model folder on disk gets the same facts and fit verdict as a Hub id or a GGUF,
and a folder that is not a model gets one sentence with the fix."""

from __future__ import annotations

import json
import re
import shutil

from ft_desk.trainer.cli.main import main
from ft_desk.trainer.hub.folder_check import safetensors_param_count


def test_a_model_folder_shows_its_parameters_size_template_and_fit(tiny_model_dir, capsys):
    assert main(["models", "info", str(tiny_model_dir), "--json"]) == 0
    details = json.loads(capsys.readouterr().out)
    assert details["kind"] == "folder" and details["architecture"] == "LlamaForCausalLM"
    assert details["params"] == safetensors_param_count(tiny_model_dir / "model.safetensors") > 0
    assert details["size_bytes"] >= (tiny_model_dir / "model.safetensors").stat().st_size
    assert details["fit"]["verdict"] in ("fits", "tight")
    assert main(["models", "info", str(tiny_model_dir)]) == 0
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert fields["architecture"] == "LlamaForCausalLM" and fields["chat template"] == "yes"
    assert fields["fit"].startswith(details["fit"]["verdict"]) and f"ft-desk plan {tiny_model_dir}" in fields["fit"]


def test_a_folder_without_a_chat_template_says_how_conversations_are_rendered(tiny_model_dir, tmp_path, capsys):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "no-template")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    assert main(["models", "info", str(folder), "--no-fit"]) == 0
    out = capsys.readouterr().out
    assert "none: conversations are rendered as plain text" in out and "fit" not in out.split()


def test_a_folder_that_is_not_a_model_is_one_sentence_with_the_fix(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["models", "info", str(tmp_path), "--no-fit"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"ft-desk: {tmp_path} has no config.json, so it is not a Hugging Face model folder"
    assert err[1].strip().startswith("fix: name the folder that holds config.json")


def test_an_incomplete_model_folder_names_the_missing_part(tiny_model_dir, tmp_path, capsys):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "no-weights")
    (folder / "model.safetensors").unlink()
    assert main(["models", "info", str(folder), "--no-fit"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"ft-desk: {folder} has no weights (no *.safetensors or pytorch_model*.bin in {folder})")
