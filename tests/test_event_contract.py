"""The wire contract between the CLI and the TUI, checked against real child processes.

A short real demo, an eval of it and an export of it run as `ft-desk` child processes (offline, one thread);
every event they print must match its declaration in ft_desk.trainer.events, and each command must emit the
same event types, with the same fields, as the TUI's recorded fixtures (tests/tui/fixtures, which the app's
tests and snapshots replay). When this fails after a deliberate change, record the fixtures again with
tests/tui/fixtures/regenerate.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from ft_desk.trainer.events import EVENT_TYPES, EventError, check_event, make_event

FIXTURES = Path(__file__).parent / "tui" / "fixtures"


def ft_desk(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FT_DESK_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "ft_desk.trainer.cli.main", *args], env=env, text=True, check=False,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=1800)


def events_of(stdout: str) -> list[dict]:
    """Every stdout line of a jsonl command must be an event: anything else would corrupt the TUI's stream."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def shape(events: list[dict]) -> dict[str, set[str]]:
    """Event type -> every field seen on it."""
    keys: dict[str, set[str]] = defaultdict(set)
    for event in events:
        keys[event["type"]] |= set(event)
    return dict(keys)


def fixture_events(name: str) -> list[dict]:
    return events_of((FIXTURES / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict[str, list[dict]]:
    """One real demo -> eval -> export, as the TUI runs them."""
    home = tmp_path_factory.mktemp("ft-desk-home")
    demo = ft_desk(home, "demo", "--events", "jsonl", "--set", "train.max_steps=3", "--set", "train.threads=1",
                   "--set", "eval.every_steps=2")
    assert demo.returncode == 0, demo.stderr[-3000:]
    demo_events = events_of(demo.stdout)
    run_dir = demo_events[-1]["run_dir"]
    evaluation = ft_desk(home, "eval", run_dir, "--json", "--limit", "3", "--threads", "1")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    export = ft_desk(home, "export", run_dir, "--format", "adapter", "--json", "--out", str(home / "exported"))
    assert export.returncode == 0, export.stderr[-3000:]
    return {"demo": demo_events, "eval": events_of(evaluation.stdout), "export": events_of(export.stdout),
            "run_dir": run_dir, "home": home}


@pytest.mark.parametrize("command,fixture", [("demo", "demo_run.jsonl"), ("eval", "eval_events.jsonl"),
                                             ("export", "export_events.jsonl")])
def test_real_events_match_their_declarations_and_the_tuis_fixtures(recorded, command, fixture):
    events = recorded[command]
    for event in events:
        check_event(event)
    assert shape(events) == shape(fixture_events(fixture))


def test_the_fixtures_match_the_declarations():
    for name in ("demo_run.jsonl", "eval_events.jsonl", "export_events.jsonl"):
        for event in fixture_events(name):
            check_event(event)


def test_each_stream_ends_with_an_outcome_the_tui_can_read(recorded):
    finals = [recorded["demo"][-1], recorded["eval"][-1], recorded["export"][-1]]
    assert [e["type"] for e in finals] == ["run_finished", "eval_finished", "export_finished"]
    for event in finals:
        assert event["exit_code"] == 0 and event["error"] is None and event["hint"] is None


def test_failures_are_data_on_stdout_and_a_readable_line_on_stderr(recorded, tmp_path):
    home = recorded["home"]
    bad = ft_desk(home, "demo", "--events", "jsonl", "--set", "train.threads=1", "--set", "lora.r=x")
    (event,) = events_of(bad.stdout)
    check_event(event)
    assert bad.returncode == 2 and event["type"] == "command_failed" and event["exit_code"] == 2
    assert "lora.r" in event["error"] and f"ft-desk: {event['error']}" in bad.stderr

    missing = str(tmp_path / "no-such-run")
    for args, final in ((["eval", missing, "--json"], "eval_finished"),
                        (["export", missing, "--format", "adapter", "--json"], "export_finished")):
        proc = ft_desk(home, *args)
        events = events_of(proc.stdout)
        for event in events:
            check_event(event)
        assert proc.returncode == 2 and events[-1]["type"] == final and events[-1]["status"] == "failed"
        assert events[-1]["exit_code"] == 2 and events[-1]["error"] in proc.stderr
        assert [e["type"] for e in events].count(final) == 1 and "command_failed" not in {e["type"] for e in events}

    plan = ft_desk(home, "plan", "demo", "--set", "lora.r=x", "--json")
    answer = json.loads(plan.stdout)
    assert plan.returncode == 2 and answer["ok"] is False and answer["exit_code"] == 2
    assert "lora.r" in answer["error"] and answer["error"] in plan.stderr


def test_an_event_that_breaks_its_declaration_is_refused_by_name():
    with pytest.raises(EventError, match="'no_such_event'"):
        make_event("no_such_event", step=1)
    with pytest.raises(EventError, match=r"checkpoint .*missing field 'is_best'"):
        make_event("checkpoint", step=1, path="/x")
    with pytest.raises(EventError, match=r"checkpoint .*undeclared field 'colour'"):
        make_event("checkpoint", step=1, path="/x", is_best=False, colour="red")
    event = make_event("checkpoint", step=1, path="/x", is_best=False)
    assert set(event) == {"v", "type", "time", "step", "path", "is_best"}


def test_every_declared_final_event_carries_what_the_tui_shows():
    for name in ("run_finished", "eval_finished", "export_finished", "download_failed", "command_failed"):
        required = EVENT_TYPES[name].__required_keys__
        assert {"status", "error", "hint", "exit_code"} <= required, name
