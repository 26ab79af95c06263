"""Snapshots of every screen at 100x30 and 80x24, from recorded data only (fixed clock, fixed paths, a finished
run replayed from tests/tui/fixtures/demo_run.jsonl), so they change only when the screens do.

Update after an intended change with: pytest tests/tui/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

import fcntl

import pytest
from textual.widgets import DataTable, Input, TabbedContent

from ft_desk.tui.app import FtDeskApp
from ft_desk.tui.draft import demo_draft

from .conftest import FIXED_NOW, FakeBackend, make_run, read_events
from .test_app import settle

SIZES = [pytest.param((100, 30), id="100x30"), pytest.param((80, 24), id="80x24")]


@pytest.fixture(autouse=True)
def one_snapshot_home_user():
    """snapshot_home is one fixed folder (its path is on screen), so two checkouts' test runs on one machine would
    wipe each other's runs and settings mid-test; an exclusive lock, taken before snapshot_home (autouse fixtures
    come first), makes them take turns."""
    with open("/tmp/ft-desk-tui-snapshots.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture
def desk(snapshot_home):
    backend = FakeBackend(snapshot_home / "runs")

    def build(start_mode: str | None = None, runs: bool = True) -> FtDeskApp:
        if runs:
            runs_dir = snapshot_home / "runs"
            make_run(runs_dir, "demo-run")
            failed = [e for e in read_events() if e["type"] in ("run_started", "data_ready")]
            failed.append({"type": "run_finished", "status": "failed", "error": "out.jsonl:7: not valid JSON",
                           "hint": "repair the line", "exit_code": 2})
            make_run(runs_dir, "my-data-run", failed, created="2025-12-30T10:00:00+00:00", adapter=False)
        return FtDeskApp(backend=backend, clock=lambda: FIXED_NOW, settings=snapshot_home / "settings.json",
                         start_mode=start_mode, reattach=False)

    yield build
    backend.close()


def with_demo_draft(app: FtDeskApp, until=None):
    """run_before: the demo draft chosen, then wait until the screen shows what the snapshot is about."""

    async def run_before(pilot) -> None:
        app.draft = demo_draft()
        app.draft_updated()
        await settle(pilot, until=until)

    return run_before


def follow_demo_run(app: FtDeskApp, snapshot_home, mode: str):
    async def run_before(pilot) -> None:
        app.draft = demo_draft()
        app.follow(snapshot_home / "runs" / "demo-run")
        app.switch_mode(mode)
        await settle(pilot, until=lambda: app.session.history.finished is not None and app.session.ended)

    return run_before


@pytest.mark.parametrize("size", SIZES)
def test_home_first_launch(snap_compare, desk, size):
    app = desk(runs=False)
    assert snap_compare(app, terminal_size=size, run_before=lambda pilot: settle(pilot))


@pytest.mark.parametrize("size", SIZES)
def test_home_with_runs(snap_compare, desk, size):
    app = desk()

    async def run_before(pilot):
        await settle(pilot, until=lambda: app.screen.query_one("#runs", DataTable).row_count == 2)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_model(snap_compare, desk, size):
    app = desk("model", runs=False)

    async def run_before(pilot):
        await settle(pilot, until=lambda: app.screen.query_one("#find-table", DataTable).row_count > 3)
        app.screen.query_one("#find-table", DataTable).focus()
        await settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_data(snap_compare, desk, size):
    app = desk("data", runs=False)
    run_before = with_demo_draft(app, until=lambda: app.screen.report is not None)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_data_column_map(snap_compare, desk, snapshot_home, size):
    """The mapping dialog over a question/answer file, its suggestion tried (the masked sample inside it)."""
    from ft_desk.tui.widgets.column_map import ColumnMapDialog

    from .test_column_map import fake_check  # the check_data answers of the dialog's Pilot tests

    app = desk("data", runs=False)
    fake_check(app.backend, snapshot_home)
    data = snapshot_home / "qa.csv"
    data.write_text("q,a\nHow do I reset my password?,\"Open Settings, then Security.\"\n", encoding="utf-8")

    async def run_before(pilot) -> None:
        app.draft = demo_draft()
        app.draft.train_file = str(data)
        app.draft_updated()
        await settle(pilot, until=lambda: isinstance(app.screen, ColumnMapDialog)
                     and "usable" in str(app.screen.query_one("#map-result").render()))

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_recipe(snap_compare, desk, size):
    app = desk("recipe", runs=False)
    run_before = with_demo_draft(app, until=lambda: "peak" in str(app.screen.query_one("#memory").render()))
    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_train_ready(snap_compare, desk, size):
    app = desk("train", runs=False)
    assert snap_compare(app, terminal_size=size, run_before=with_demo_draft(app))


@pytest.mark.parametrize("size", SIZES)
def test_train_replayed_run(snap_compare, desk, snapshot_home, size):
    app = desk("home")
    assert snap_compare(app, terminal_size=size, run_before=follow_demo_run(app, snapshot_home, "train"))


@pytest.mark.parametrize("size", SIZES)
def test_evaluate_before_after(snap_compare, desk, snapshot_home, size):
    app = desk("home")
    assert snap_compare(app, terminal_size=size, run_before=follow_demo_run(app, snapshot_home, "evaluate"))


@pytest.mark.parametrize("size", SIZES)
def test_evaluate_doctor(snap_compare, desk, snapshot_home, size):
    app = desk("home")
    follow = follow_demo_run(app, snapshot_home, "evaluate")

    async def run_before(pilot):
        await follow(pilot)
        app.screen.query_one("#eval-tabs", TabbedContent).active = "tab-doctor"
        await settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_export_report(snap_compare, desk, snapshot_home, size):
    app = desk("home")
    follow = follow_demo_run(app, snapshot_home, "export")

    async def run_before(pilot):
        await follow(pilot)
        await pilot.press("ctrl+e")
        await settle(pilot, until=lambda: not app.screen.running)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_evaluate_chat_compare(snap_compare, desk, snapshot_home, size):
    """The chat playground with its settings row and one question answered by the tuned, then the base model."""
    app = desk("home")
    follow = follow_demo_run(app, snapshot_home, "evaluate")

    async def run_before(pilot):
        await follow(pilot)
        screen = app.screen
        screen.query_one("#eval-tabs", TabbedContent).active = "tab-chat"
        await settle(pilot, until=lambda: screen.chat_ready)
        await pilot.press("ctrl+o")
        screen.query_one("#chat-system", Input).value = "Sign off as Mo."
        field = screen.query_one("#chat-input", Input)
        field.value = "Where is order CC-1?"
        field.focus()
        await pilot.press("enter")
        await settle(pilot, until=lambda: not screen._busy and len(app.backend.chat.requests) == 2)
        field.cursor_blink = False  # the focused field's cursor: shown, whatever the blink timer's phase
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_help(snap_compare, desk, size):
    app = desk("train", runs=False)

    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("question_mark")
        await settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_train_light_theme(snap_compare, desk, snapshot_home):
    app = desk("home")
    follow = follow_demo_run(app, snapshot_home, "train")

    async def run_before(pilot):
        await follow(pilot)
        await pilot.press("ctrl+t")
        await settle(pilot)

    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)
