"""A training run the app starts through tui/launch.py reports a failed start as data: real `ft-desk train`
children with a bad setting, a missing data file and a resume of a run that is still training, each shown with the
trainer's own sentence and fix; stderr is read only when the child printed no event; launch files stay bounded."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from ft_desk.trainer import run_folder
from ft_desk.tui import app as app_module
from ft_desk.tui import launch
from ft_desk.tui.draft import demo_draft

from .conftest import make_run, read_events, spawn_fake_trainer, wait_for
from .test_app import settle

pytestmark = pytest.mark.anyio

WEEK_S = 7 * 24 * 3600


@pytest.fixture
def stderr_parsed(monkeypatch) -> list[str]:
    """The stderr texts the app parsed (it should parse none when the trainer reported its failure as data)."""
    parsed: list[str] = []
    real = app_module.parse_failure

    def recording(stderr: str, exit_code: int):
        parsed.append(stderr)
        return real(stderr, exit_code)

    monkeypatch.setattr(app_module, "parse_failure", recording)
    return parsed


@pytest.fixture
def real_trainer(backend):
    """Makes the app's backend start the real `ft-desk train` through tui/launch.py, with extra arguments."""
    launches: list[launch.Launch] = []

    def use(*extra: str) -> list[launch.Launch]:
        def start(draft):
            started = launch.start_training([*draft.cli_args(), "--set", "train.threads=1", *extra], draft.config())
            launches.append(started)
            return started

        def resume(run_dir: Path):
            started = launch.resume_training(run_dir)
            launches.append(started)
            return started

        backend.start_training = start
        backend.resume_training = resume
        return launches

    yield use
    for started in launches:
        if started.process.poll() is None:
            started.process.kill()
        started.process.wait()


def notices(app, title: str) -> list[str]:
    return [n.message for n in app._notifications if n.title == title]


async def run_until_notice(pilot, app, title: str) -> list[str]:
    try:
        await settle(pilot, until=lambda: bool(notices(app, title)), timeout=30)
    except AssertionError:
        raise AssertionError([(n.title, n.message) for n in app._notifications]) from None
    return notices(app, title)


async def test_a_bad_setting_is_shown_with_the_trainers_own_sentence(make_app, real_trainer, stderr_parsed):
    launches = real_trainer("--set", "lora.r=0")  # a value only the trainer checks, as far as the app knows
    app = make_app(reattach=False)
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        await settle(pilot)
        app.draft = demo_draft()
        app.start_training()
        messages = await run_until_notice(pilot, app, "Training did not start")
        assert messages == ["lora.r must be an int from 1 to 4096, got 0\n"
                            "fix: change lora.r in the preset or with --set lora.r=VALUE (the default is 16)"]
        assert app.session.ended and app.session.status == "crashed"
        assert not app.session.run_dir.exists()  # it failed before its run folder: only stdout said why
    assert stderr_parsed == []
    started = launches[0]
    assert "lora.r must be an int from 1 to 4096" in started.stderr_path.read_text(encoding="utf-8")  # the log keeps it
    assert not (launch.launch_dir() / f"{started.run_dir.name}.stdout.jsonl").exists()  # read, then removed


async def test_a_resume_of_a_run_still_training_says_so_and_the_fix(make_app, real_trainer, runs_dir,
                                                                     stderr_parsed):
    real_trainer()
    run_dir = make_run(runs_dir, "busy-run", events=[], status="running")
    (run_dir / "config.json").write_text(json.dumps(read_events()[0]["config"]), encoding="utf-8")
    # Another trainer is on it, still writing events while our resume is refused.
    other = spawn_fake_trainer(run_dir, delay=0.2)
    try:
        assert wait_for(lambda: run_folder.read_state(run_dir).get("pid") == other.pid and run_folder.is_live(run_dir))
        app = make_app(reattach=False)
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            await settle(pilot)
            app.resume_run(run_dir)
            messages = await run_until_notice(pilot, app, "Training did not start")
            assert len(messages) == 1
            assert f"is still running (pid {other.pid})" in messages[0]
            assert messages[0].endswith("\nfix: attach to it in the app, or stop it first")
            assert not notices(app, "Run interrupted")
            assert other.poll() is None  # the other trainer was left alone
    finally:
        other.kill()
        other.wait()
    assert stderr_parsed == []


async def test_a_missing_data_file_is_shown_with_its_fix(make_app, real_trainer, tmp_path, stderr_parsed):
    missing = tmp_path / "missing.jsonl"
    launches = real_trainer("--set", f"data.train_file={missing}")
    app = make_app(reattach=False)
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        await settle(pilot)
        app.draft = demo_draft()
        app.start_training()
        messages = await run_until_notice(pilot, app, "Training failed")
        await settle(pilot, until=lambda: app.session.ended, timeout=60)
        assert len(messages) == 1
        assert f"{missing}: no such file" in messages[0]
        assert "fix: check the path (data.train_file / data.valid_file)" in messages[0]
        assert not notices(app, "Training did not start") and not notices(app, "Run interrupted")
    assert stderr_parsed == []
    # Its events reached the run folder, so the stdout copy of them is gone.
    started = launches[0]
    assert run_folder.events_path(started.run_dir).is_file()
    assert started.stdout_path is None
    assert not (launch.launch_dir() / f"{started.run_dir.name}.stdout.jsonl").exists()


async def test_stderr_is_the_fallback_when_the_child_printed_no_event(make_app, real_trainer, monkeypatch):
    # A child that dies before main() can report: nothing on stdout, the CLI's two lines on stderr.
    script = ("import sys; sys.stderr.write(\"ft-desk: no preset named 'nope'\\n  fix: pick one of qlora, lora\\n\");"
              " sys.exit(2)")
    monkeypatch.setattr(launch, "cli_argv", lambda *args: [sys.executable, "-c", script])
    launches = real_trainer()
    app = make_app(reattach=False)
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        await settle(pilot)
        app.draft = demo_draft()
        app.start_training()
        messages = await run_until_notice(pilot, app, "Training did not start")
        assert messages == ["no preset named 'nope'\nfix: pick one of qlora, lora"]
    assert launches[0].stdout_path is None  # the empty copy was looked at and removed


def test_old_and_redundant_launch_files_are_pruned_when_a_run_starts(runs_dir):
    folder = launch.launch_dir()
    old = time.time() - WEEK_S - 3600

    def launch_file(name: str, text: str = "", age: float | None = None) -> Path:
        path = folder / name
        path.write_text(text, encoding="utf-8")
        if age is not None:
            os.utime(path, (age, age))
        return path

    failed_start = json.dumps({"v": 1, "type": "command_failed", "time": 1.0, "command": "train",
                               "status": "failed", "error": "lora.r must be a positive int", "hint": None,
                               "exit_code": 2})
    finished = make_run(runs_dir, "prune-finished")
    copy_of_run = json.dumps({**read_events()[0], "run_dir": str(finished)})
    gone = [
        launch_file("prune-old.stderr.log", "ft-desk: something\n", age=old),
        launch_file("prune-old.stdout.jsonl", failed_start + "\n", age=old),
        launch_file("prune-finished.stdout.jsonl", copy_of_run + "\n"),  # events.jsonl has all of it
    ]
    kept = [
        launch_file("prune-recent.stderr.log", "ft-desk: something\n"),
        launch_file("prune-recent.stdout.jsonl", failed_start + "\n"),  # the only record of why it did not start
        launch_file("prune-not-ours.txt", "keep me", age=old),
    ]

    started = launch.start_training(["--preset", "demo", "--set", "lora.r=0"], demo_draft().config())
    try:
        assert started.process.wait(timeout=120) == 2
    finally:
        if started.process.poll() is None:
            started.process.kill()
    assert [p.name for p in gone if p.exists()] == []
    assert [p.name for p in kept if not p.exists()] == []
    # The new launch's own copy holds its final event, as the app reads it.
    final = started.final_event()
    assert final is not None and final["type"] == "command_failed" and final["exit_code"] == 2
    assert final["error"] == "lora.r must be an int from 1 to 4096, got 0"
