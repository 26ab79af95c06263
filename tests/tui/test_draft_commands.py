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
