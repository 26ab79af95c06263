"""A failed CLI command reaches the app as data (error + fix), read from stdout, not parsed back from stderr."""

from __future__ import annotations

import pytest

from ft_desk.tui import commands
from ft_desk.tui.commands import CommandFailed


@pytest.fixture
def no_stderr_parsing(monkeypatch):
    def refuse(stderr: str, exit_code: int) -> CommandFailed:
        raise AssertionError(f"the failure was parsed from stderr: {stderr!r}")

    monkeypatch.setattr(commands, "parse_failure", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_one_object_command_that_fails_gives_its_error_and_fix(no_stderr_parsing):
    with pytest.raises(CommandFailed) as caught:
        commands.run_json(["plan", "demo", "--set", "lora.r=x", "--json"], timeout=300)
    assert "lora.r" in caught.value.message and caught.value.exit_code == 2


def test_an_event_stream_that_fails_before_its_own_events_ends_with_the_failure(no_stderr_parsing):
    seen: list[dict] = []
    with pytest.raises(CommandFailed) as caught:
        commands.stream(["demo", "--events", "jsonl", "--set", "lora.r=x"], seen.append)
    assert [e["type"] for e in seen] == ["command_failed"]
    assert "lora.r" in caught.value.message and caught.value.exit_code == 2


def test_a_failed_download_is_reported_with_its_fix(no_stderr_parsing):
    seen: list[dict] = []
    with pytest.raises(CommandFailed) as caught:
        commands.stream(["models", "download", "not a repo id!", "--json"], seen.append)
    assert seen[-1]["type"] == "download_failed" and caught.value.message == seen[-1]["error"]
    assert caught.value.hint == (seen[-1]["hint"] or "")


def test_a_data_check_that_cannot_read_the_file_says_where(no_stderr_parsing, tmp_path):
    with pytest.raises(CommandFailed) as caught:
        commands.run_json(["data", "check", str(tmp_path / "missing.jsonl"), "--json"], timeout=300)
    assert "missing.jsonl" in caught.value.message and caught.value.hint


def test_an_answer_with_a_problem_in_it_is_still_the_answer():
    report = {"ok": False, "path": "x.jsonl", "broken_count": 2, "error": None}
    assert commands.failure_of(report, 2) is None
    assert commands.failure_of({"type": "eval_finished", "status": "completed", "error": None}, 0) is None
    failed = commands.failure_of({"ok": False, "error": "no such file", "hint": "check the path", "exit_code": 2}, 2)
    assert (failed.message, failed.hint, failed.exit_code) == ("no such file", "check the path", 2)


def test_a_cancel_ends_a_child_that_prints_nothing(monkeypatch):
    """A model load prints nothing for minutes: cancelling must not wait for the child's next line. The child
    here never prints and never ends by itself, so only the stream's watcher can end it (SIGTERM: -15)."""
    import sys

    monkeypatch.setattr(commands, "cli_argv", lambda *args: [sys.executable, "-c", "import time; time.sleep(3600)"])
    asked = []

    def should_stop() -> bool:
        asked.append(True)
        return len(asked) > 2  # a few polls in: the user pressed cancel, or the app is closing

    with pytest.raises(CommandFailed) as err:
        commands.stream(["eval", "RUN", "--json"], lambda event: None, should_stop)
    assert err.value.exit_code == -15
