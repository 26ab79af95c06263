"""Export names and concurrency (issue 15): --name can never put a file outside --out or over a user's file, two
exports into one folder do not collide, and a killed run exports like any stopped one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from ft_desk.trainer import run_folder
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.events import ListSink
from ft_desk.trainer.export.pipeline import ExportRequest, export_run
from ft_desk.trainer.export.safety import export_lock
from ft_desk.trainer.limits import check_ollama_name


def _export(run_dir, out, **kw):
    return export_run(ExportRequest(run_dir=run_dir, format=kw.pop("format", "adapter"), out=out, verify=False,
                                    **kw), ListSink())


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a/b/victim", "bad\nname", "a\\b", "x:y:z", "./.",
                                  "", "a" * 101, "me/..", "hf_" + "Q1w" * 12, "ok/", "name:"])
def test_a_name_that_is_not_an_ollama_name_is_refused_before_anything_is_written(qlora_run, tmp_path, name):
    (tmp_path / "victim-f16.gguf").write_bytes(b"the user's own file")
    before = _tree(tmp_path)
    with pytest.raises(UserError, match="is not a usable model name"):
        _export(qlora_run.run_dir, tmp_path / "out", format="gguf", name=name)
    assert _tree(tmp_path) == before
    assert (tmp_path / "victim-f16.gguf").read_bytes() == b"the user's own file"


@pytest.mark.parametrize("name, model", [("support-desk", "support-desk"), ("me/support-desk:v2", "me/support-desk:v2"),
                                         ("Support Desk", "support-desk"), ("Qwen2.5 tuned!", "qwen2.5-tuned"),
                                         (".hidden", "hidden"), ("Team A/Bot:Best Yet", "team-a/bot:best-yet")])
def test_ollama_style_names_are_accepted_and_folded_the_friendly_way(name, model):
    assert check_ollama_name(name) == model


def test_a_namespaced_name_becomes_one_file_inside_out_and_the_modelfile_names_it(qlora_run, tmp_path):
    out = tmp_path / "out"
    victim = tmp_path / "me" / "victim-q8_0.gguf"
    victim.parent.mkdir()
    victim.write_bytes(b"keep me")
    event = _export(qlora_run.run_dir, out, format="ollama", name="me/victim:v1")
    assert victim.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me", "out"]  # no lock, staging or work file left over
    assert "me-victim-v1-q8_0.gguf" in event["files"] and "Modelfile" in event["files"]
    assert all((out / f).resolve().is_relative_to(out.resolve()) for f in event["files"])
    assert "FROM ./me-victim-v1-q8_0.gguf" in (out / "Modelfile").read_text(encoding="utf-8")
    assert event["command"].startswith("ollama create me/victim:v1 -f ")


def test_a_second_export_into_the_same_folder_is_refused_while_the_first_runs(qlora_run, tmp_path):
    out = tmp_path / "out"
    with export_lock(out):  # the first export, mid-way
        with pytest.raises(UserError, match="another export is writing into") as info:
            _export(qlora_run.run_dir, out)
        assert "choose another --out" in info.value.hint
    assert not out.exists()
    _export(qlora_run.run_dir, out)  # once it is done the folder is free
    assert (out / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob(".*lock"))


def test_a_sigkilled_run_exports_even_when_its_pid_now_belongs_to_another_process(qlora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(qlora_run.run_dir, run)
    (run / run_folder.LOCK).touch()  # the trainer held it; the kernel dropped it when the trainer was killed
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "ft_desk"])
    try:
        state = json.loads((run / "state.json").read_text())
        run_folder.write_state(run, {**state, "status": "running", "pid": other.pid})
        assert run_folder.pid_alive(other.pid)
        event = _export(run, tmp_path / "out")  # the hand-made run has final weights only, no checkpoints/
        assert event["status"] == "unverified"
        held = run_folder.lock_run(run)  # now a trainer really is writing it
        try:
            with pytest.raises(UserError, match="is still training"):
                _export(run, tmp_path / "out-live")
        finally:
            held.release()
    finally:
        other.kill()
        other.wait()


EVIL_TEMPLATE = "{% for m in messages %}{{ m['content'].__class__.__base__.__subclasses__() }}{% endfor %}"


@pytest.mark.parametrize("fmt, verify", [("ollama", False), ("adapter", True)])
def test_a_chat_template_that_reaches_for_python_internals_is_one_sentence(qlora_run, tmp_path, fmt, verify):
    run = tmp_path / "run"
    shutil.copytree(qlora_run.run_dir, run)
    tokenizer_dirs = [d for d in (run / "adapter", qlora_run.model_dir) if (d / "tokenizer.json").is_file()]
    (run / "adapter" / "chat_template.jinja").write_text(EVIL_TEMPLATE, encoding="utf-8")
    if tokenizer_dirs[0] != run / "adapter":  # the run reads the base model's tokenizer: give it a copy
        for f in tokenizer_dirs[0].glob("tokenizer*"):
            shutil.copy(f, run / "adapter" / f.name)
    with pytest.raises(UserError, match="tries to reach Python internals") as info:
        export_run(ExportRequest(run_dir=run, format=fmt, out=tmp_path / "out", verify=verify), ListSink())
    assert "data.chat_template=none" in info.value.hint
    assert not (tmp_path / "out").exists()
