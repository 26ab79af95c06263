"""The wizard's draft turns into exactly the config and command line `ft-desk train` gets; CLI failures turn
into a message and a fix."""

import pytest

from ft_desk.trainer.config import ConfigError
from ft_desk.tui.commands import last_object, parse_failure
from ft_desk.tui.draft import Draft, format_value


def test_draft_builds_the_config_train_would_build():
    draft = Draft(model="demo", train_file="demo", strategy="demo", hardware="cpu")
    draft.set_override("lora.r", "8")
    cfg = draft.config()
    assert cfg.lora.r == 8 and cfg.train.device == "cpu" and cfg.model.name == "demo"
    assert draft.cli_args() == ["--preset", "demo", "--preset", "cpu", "--set", "model.name=demo",
                                "--set", "data.train_file=demo", "--set", "lora.r=8"]
    assert draft.command_line().startswith("ft-desk train --preset demo --preset cpu")


def test_typing_the_preset_value_removes_the_override():
    draft = Draft(model="demo", train_file="demo", strategy="qlora")
    draft.set_override("optim.lr", "3e-4")
    assert draft.overrides == {"optim.lr": "3e-4"}
    draft.set_override("optim.lr", "0.0002")  # what qlora.yaml gives, written another way
    assert draft.overrides == {}
    assert draft.value("optim.lr") == "2e-4"


def test_a_bad_value_is_reported_with_its_key():
    draft = Draft(model="demo", train_file="demo")
    draft.set_override("lora.r", "x")
    assert draft.error().startswith("lora.r must be")
    with pytest.raises(ConfigError):
        draft.config()
    assert draft.ready()["recipe"] is False


def test_format_value_reads_like_the_command_line():
    assert format_value(2e-4) == "2e-4"
    assert format_value(0.05) == "0.05"
    assert format_value(("q_proj", "v_proj")) == "q_proj,v_proj"
    assert format_value(True) == "true"


def test_parse_failure_separates_message_and_fix():
    err = parse_failure("some warning\nft-desk: data.jsonl:3: not valid JSON\n  fix: repair the line\n", 2)
    assert (err.message, err.hint, err.exit_code) == ("data.jsonl:3: not valid JSON", "repair the line", 2)
    crash = parse_failure("Traceback...\n  File x\nRuntimeError: boom\n", 1)
    assert crash.message == "RuntimeError: boom"


def test_last_object_skips_events_before_the_result():
    out = '{"type": "download_progress", "bytes_done": 1}\n{"repo_id": "a/b", "path": "/x"}\n'
    assert last_object(out) == {"repo_id": "a/b", "path": "/x"}


def test_the_live_estimate_is_computed_in_process_once_the_device_is_known(tmp_path):
    import json as _json

    from ft_desk.tui.planning import NeedsChild, Planner

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(_json.dumps({
        "model_type": "llama", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512}), encoding="utf-8")
    calls = []

    def doctor():
        calls.append(1)
        return {"facts": {"type": "cpu", "name": "Test CPU", "total_memory": 8 << 30, "free_memory": 6 << 30,
                          "compute_capability": None, "bf16": False}}

    planner = Planner(doctor)
    draft = Draft(model=str(model), train_file="demo", strategy="qlora", hardware="cpu")
    with pytest.raises(NeedsChild):  # the probe has not answered yet: the caller asks `ft-desk plan`
        planner.plan(draft.config())
    planner._probing.join(5)
    small = planner.plan(draft.config())
    draft.overrides["train.micro_batch_size"] = "16"
    big = planner.plan(draft.config())
    assert calls == [1]  # one probe per session
    assert small["verdict"] == "fits" and small["device_name"] == "Test CPU"
    assert big["total_bytes"] > small["total_bytes"]
    with pytest.raises(NeedsChild):  # not downloaded: only `ft-desk plan` can fetch its config.json
        planner.plan(Draft(model="nobody/not-cached", train_file="demo").config())


def test_q4_k_m_is_offered_only_where_llama_cpp_can_make_it(monkeypatch):
    import importlib.util
    import sys

    from ft_desk.tui.screens import export

    real_find_spec = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, _on=installed: (
            object() if _on else None) if name == "llama_cpp" else real_find_spec(name, *a))
        values = [value for _label, value in export.gguf_type_choices()]
        assert ("q4_k_m" in values) is installed and values[:4] == ["auto", "f16", "bf16", "q8_0"]
    monkeypatch.undo()
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    export.gguf_type_choices()
    assert "llama_cpp" not in sys.modules  # looked up, never imported by the app


def test_the_real_and_the_test_backend_answer_every_call_the_app_makes(tmp_path):
    """The fake implements the Backend Protocol on its own (no subclassing), so a method added to the app's
    backend but missing from the fake fails here instead of falling through to a real child process."""
    import inspect

    from ft_desk.tui.backend import Backend, CliBackend

    from .conftest import FakeBackend

    calls = {name for name, _ in inspect.getmembers(Backend, inspect.isfunction) if not name.startswith("_")}
    assert {"start_training", "check_data", "export", "evaluate", "warm_up"} <= calls
    fake = FakeBackend(tmp_path)
    assert CliBackend not in type(fake).__mro__
    for backend in (CliBackend(), fake):
        assert isinstance(backend, Backend)
        missing = [name for name in calls if name not in type(backend).__dict__]
        assert missing == [], f"{type(backend).__name__} lacks {missing}"
