"""The app driven with Pilot: navigation, the first-launch demo key, runs replayed from a recorded events.jsonl,
a live (fake) trainer child followed, stopped and re-attached, errors from the child shown with their fix, the
recipe form's inline validation, "Save as preset", the command palette and the theme."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, RichLog, Static, TabbedContent

from ft_desk.trainer.presets import load_config
from ft_desk.tui.app import LIGHT
from ft_desk.tui.draft import demo_draft
from ft_desk.tui.screens.recipe import _field_id
from ft_desk.tui.widgets.help import SCREEN_COMMANDS, HelpScreen
from ft_desk.tui.widgets.sidebar import STEPS

from .conftest import FIXTURES, make_run, read_events, wait_for

pytestmark = pytest.mark.anyio


async def settle(pilot, until=None, timeout: float = 20.0) -> None:
    """Let workers and watcher threads deliver; with `until`, wait for that condition."""
    import asyncio
    import time

    end = time.monotonic() + timeout
    while True:
        await pilot.pause(0.05)
        await pilot.app.workers.wait_for_complete()
        await pilot.pause(0.05)
        if until is None or until() or time.monotonic() > end:
            break
        await asyncio.sleep(0.1)
    if until is not None and not until():
        workers = [f"{w.name}:{w.state.name}" for w in pilot.app.workers]
        raise AssertionError(f"condition not reached in {timeout} s; workers {workers}; screen {pilot.app.screen}")


async def start_demo_and_wait_for_notice(pilot, app, text: str) -> list[str]:
    """Start a run with the demo draft and wait for a notification containing `text`; all messages."""
    await settle(pilot)
    app.draft = demo_draft()
    app.start_training()
    await settle(pilot, until=lambda: any(text in n.message for n in app._notifications))
    return [n.message for n in app._notifications]


def text_of(app, selector: str) -> str:
    widget = app.screen.query_one(selector, Static)
    return str(widget.render())


async def test_first_launch_offers_the_demo_on_one_key(make_app, backend, runs_dir):
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        assert app.screen.query_one("#welcome").display
        assert "demo" in text_of(app, "#welcome")
        await pilot.press("d")
        await settle(pilot, until=lambda: app.session is not None and app.session.history.finished is not None)
        assert backend.calls[0][0] == "start_training"
        assert "--preset" in backend.calls[0][1] and "demo" in backend.calls[0][1]
        assert app.current_mode == "train"
        history = app.session.history
        assert history.steps and history.evals
        assert "step" in text_of(app, "#progress-text")
        log = app.screen.query_one("#run-log", RichLog)
        assert len(log.lines) > 3


async def test_a_finished_run_is_replayed_on_every_screen(make_app, runs_dir):
    run_dir = make_run(runs_dir, "demo-run")
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        table = app.screen.query_one("#runs", DataTable)
        assert table.row_count == 1
        await pilot.press("enter")
        await settle(pilot, until=lambda: app.session is not None and app.session.history.finished is not None)
        assert app.current_mode == "train" and app.session.run_dir == run_dir
        events = read_events()
        last_step = [e for e in events if e["type"] == "step"][-1]
        assert f"step {last_step['step']}/{last_step['total_steps']}" in text_of(app, "#progress-text")
        await pilot.press("5")
        await settle(pilot)
        samples = [e for e in events if e["type"] == "sample"]
        shown = " ".join(str(w.render()) for w in app.screen.query(".sample-out"))
        assert samples[0]["output"].split()[0][:10] in shown
        assert "val loss" in text_of(app, "#metrics")
        assert text_of(app, "#doctor").strip()


async def test_the_run_last_opened_is_open_again_after_a_restart(make_app, runs_dir):
    older = make_run(runs_dir, "older-run")
    make_run(runs_dir, "newer-run", created="2026-01-01T22:00:00+00:00")  # newest, but not the one opened
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        assert app.session is None  # nothing training and nothing opened yet: Home waits for a choice
        app.follow(older)
        await settle(pilot)
    again = make_app()
    async with again.run_test(size=(100, 30)) as pilot:
        await settle(pilot, until=lambda: again.session is not None and again.session.history.finished is not None)
        assert again.session.run_dir == older and again.current_mode == "home"
        await pilot.press("5")
        await settle(pilot)
        assert "val loss" in text_of(again, "#metrics")


async def test_full_evaluation_shows_base_against_tuned(make_app, runs_dir):
    run_dir = make_run(runs_dir, "demo-run")
    app = make_app(start_mode="evaluate")
    async with app.run_test(size=(100, 30)) as pilot:
        app.follow(run_dir)
        await settle(pilot, until=lambda: app.session.ended)
        await pilot.press("ctrl+r")
        await settle(pilot, until=lambda: not app.screen.evaluating)
        report = text_of(app, "#eval-report")
        assert "base vs tuned on 35 held-out examples" in report
        assert "ROUGE-L" in report and "better" in report
        # the recorded demo's retention probe flags forgetting (general-English perplexity +54.9%)
        assert "forgetting: general-English perplexity rose 2,168 -> 3,358" in report
        assert app.screen.query_one(TabbedContent).active == "tab-metrics"


async def test_a_live_run_is_followed_stopped_and_reported(make_app, backend):
    backend.hold_after = 2  # the fake trainer waits after a few steps, like a long run
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        app.draft = demo_draft()
        await pilot.press("4")
        await pilot.press("t")
        await settle(pilot, until=lambda: app.session is not None and app.session.history.steps)
        session = app.session
        assert session.live and "running" in str(app.screen.query_one("#topbar-run").render())
        await pilot.press("s")
        await settle(pilot)
        await pilot.press("y")  # confirm
        await settle(pilot, until=lambda: session.history.finished is not None and session.ended)
        assert session.history.finished["status"] == "stopped"
        assert session.exit_code == 3
        assert "resumes" in text_of(app, "#run-stats")


async def test_a_failed_run_says_what_happened_and_the_fix(make_app, backend, tmp_path):
    events = [e for e in read_events() if e["type"] in ("run_started", "data_ready")]
    events.append({"v": 1, "type": "run_finished", "status": "failed", "exit_code": 2,
                   "error": "my.jsonl:7: row is not valid JSON", "hint": "repair line 7 or set data.skip_bad_rows=true",
                   "final_step": 0, "elapsed_s": 1.0})
    failing = tmp_path / "failing.jsonl"
    failing.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    backend.events = failing
    app = make_app()
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        messages = await start_demo_and_wait_for_notice(pilot, app, "my.jsonl:7")
        assert any("my.jsonl:7" in m and "fix: repair line 7" in m for m in messages)
        assert "repair line 7" in text_of(app, "#run-stats")


async def test_a_child_that_dies_before_its_run_folder_exists_is_explained(make_app, backend, tmp_path):
    import subprocess
    import sys

    from ft_desk.tui.launch import Launch

    stderr = tmp_path / "err.log"

    def broken_start(draft):
        with open(stderr, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stderr.write("
                                     "'ft-desk: no preset named \\'nope\\'\\n  fix: pick one of qlora, lora\\n');"
                                     " sys.exit(2)"], stderr=err)
        return Launch(proc, tmp_path / "never-created", stderr)

    backend.start_training = broken_start
    app = make_app()
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        messages = await start_demo_and_wait_for_notice(pilot, app, "no preset")
        assert any("no preset named 'nope'" in m and "fix: pick one of qlora, lora" in m for m in messages), messages
        assert app.session.ended and app.session.status == "crashed"


async def test_recipe_field_errors_show_inline_and_block_training(make_app, backend):
    app = make_app(start_mode="recipe")
    async with app.run_test(size=(100, 30)) as pilot:
        app.draft = demo_draft()
        app.draft_updated()
        await settle(pilot)
        field = app.screen.query_one("#" + _field_id("lora.r"), Input)
        field.value = "x"
        await settle(pilot)
        assert "lora.r must be an int" in text_of(app, "#" + _field_id("lora.r") + "-help")
        assert app.draft.overrides["lora.r"] == "x"
        app.start_training()
        await settle(pilot)
        assert not [c for c in backend.calls if c[0] == "start_training"]
        field.value = "8"
        await settle(pilot, until=lambda: ("plan", app.draft.cli_args()) in backend.calls)
        assert "peak" in str(app.screen.query_one("#memory").render())
        assert app.draft.config().lora.r == 8



def checked_report(data, rows: int) -> dict:
    """What the Data screen keeps after checking `data`: `rows` WikiSQL-like examples of 88-173 tokens."""
    from ft_desk.trainer.recipe_sizing import length_counts

    return {"path": str(data), "checked_file": str(data), "recipe": {
        "length_counts": length_counts([88 + (i * 37) % 86 for i in range(rows)]), "device": "cpu", "context": 8192}}


async def test_recipe_shows_the_steps_the_checked_data_gives_and_resizes_on_edits(make_app, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n")
    app = make_app(start_mode="recipe")
    async with app.run_test(size=(100, 30)) as pilot:
        app.draft = demo_draft()
        app.draft.strategy, app.draft.train_file = "qlora", str(data)
        app.data_report = checked_report(data, rows=270)
        app.draft_updated()
        await settle(pilot)
        shown = text_of(app, "#recipe-sizing")
        assert "optimizer steps" in shown and "micro-batch" in shown and "x 192 tokens" in shown
        steps = int(shown.split("optimizer steps")[0].split()[-1])
        app.screen.query_one("#" + _field_id("train.epochs"), Input).value = "10"
        await settle(pilot)
        resized = text_of(app, "#recipe-sizing")
        assert int(resized.split("optimizer steps")[0].split()[-1]) > steps
        app.screen.query_one("#" + _field_id("train.grad_accum"), Input).value = "64"
        await settle(pilot)
        assert "too few to learn much" in text_of(app, "#recipe-sizing")


async def test_memory_estimate_plans_the_batch_the_checked_data_gives_not_the_auto_bound(make_app, backend, tmp_path):
    """Walking the wizard: the sizing line said 2 x 192 tokens while the estimate planned `auto` as 1 x 2048
    tokens (10.5 GB for a 135M model that trained in 1.9 GB); once the data is checked the plan gets the sizes."""
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n")
    app = make_app(start_mode="recipe")
    async with app.run_test(size=(100, 30)) as pilot:
        app.draft = demo_draft()
        app.draft.strategy, app.draft.train_file = "qlora", str(data)
        app.draft_updated()
        await settle(pilot, until=lambda: any(c[0] == "plan" for c in backend.calls))
        before = [c[1] for c in backend.calls if c[0] == "plan"][-1]
        assert not any(a.startswith("train.micro_batch_size=") for a in before)  # nothing checked: auto
        app.data_report = checked_report(data, rows=80)
        app.draft_updated()
        await settle(pilot, until=lambda: "train.row_length=192" in [c[1] for c in backend.calls if c[0] == "plan"][-1])
        sized = [c[1] for c in backend.calls if c[0] == "plan"][-1]
        assert "train.row_length=192" in sized and any(a.startswith("train.micro_batch_size=") for a in sized)
        assert "x 192 tokens" in text_of(app, "#recipe-sizing")
        assert "train.row_length" not in app.draft.overrides  # the user's draft keeps `auto`


async def test_ready_to_train_names_the_validation_file_and_the_sized_batch_not_auto(make_app, tmp_path):
    """With the qlora defaults the Ready screen said "batch autoxauto, max length auto" and left out the validation
    file; it now names the file and repeats the sizing line the checked data gives."""
    data, valid = tmp_path / "rows.jsonl", tmp_path / "valid.jsonl"
    data.write_text("{}\n")
    valid.write_text("{}\n")
    app = make_app(start_mode="train")
    async with app.run_test(size=(100, 30)) as pilot:
        app.draft = demo_draft()
        app.draft.strategy, app.draft.train_file = "qlora", str(data)
        app.draft.set_override("data.valid_file", str(valid))
        app.data_report = checked_report(data, rows=80)
        app.draft_updated()
        await settle(pilot)
        shown = " ".join(text_of(app, "#ready-text").split())
        assert "autoxauto" not in shown and "max length auto" not in shown
        assert f"valid {valid}" in shown
        assert "batch sized from the data, rows sized from the data, max length: the model's context" in shown
        assert "optimizer steps" in shown and "x 192 tokens" in shown


async def test_save_as_preset_writes_yaml_the_cli_reads(make_app):
    app = make_app(start_mode="recipe")
    async with app.run_test(size=(100, 30)) as pilot:
        app.draft = demo_draft()
        app.draft.overrides["lora.r"] = "8"
        app.draft_updated()
        await settle(pilot)
        await pilot.press("ctrl+s")
        await settle(pilot)
        await pilot.press(*"my-recipe")
        await pilot.press("enter")
        await settle(pilot)
    assert (Path(os.environ["FT_DESK_HOME"]) / "config" / "presets" / "my-recipe.yaml").is_file()
    cfg = load_config(["my-recipe"])
    assert cfg.lora.r == 8 and cfg.model.name == "demo"


async def test_data_screen_shows_the_lint_report(make_app, backend):
    report = json.loads((FIXTURES / "data_check_demo.json").read_text())
    app = make_app(start_mode="data")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        app.draft.model = "demo"
        await pilot.click("#data-path")
        await pilot.press(*"demo", "enter")
        await settle(pilot, until=lambda: app.draft.data_checked)
        summary = text_of(app, "#data-summary")
        assert f"{report['rows']} rows" in summary and report["format"] in summary
        assert "no problems found" in text_of(app, "#findings")
        first, longest = report["samples"][0], report["samples"][1]
        trained = [t for t, on in first["segments"] if on]
        assert trained[0].strip()[:10] in text_of(app, "#sample")
        assert "sample 1/3 first row support_desk.jsonl:1" in text_of(app, "#sample-title")
        await pilot.press("escape", "right_square_bracket")  # leave the path field, then browse the samples
        await settle(pilot)
        name = Path(longest["where"]).name
        assert f"sample 2/3 longest {name}: {longest['tokens']} tokens" in text_of(app, "#sample-title")
        assert [t for t, on in longest["segments"] if on][0].strip()[:10] in text_of(app, "#sample")
        await pilot.press("left_square_bracket", "left_square_bracket")
        await settle(pilot)
        assert "sample 3/3 shortest" in text_of(app, "#sample-title")


async def test_model_screen_lists_and_picks_a_model(make_app, backend):
    app = make_app(start_mode="model")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, until=lambda: app.screen.query_one("#find-table", DataTable).row_count > 1)
        table = app.screen.query_one("#find-table", DataTable)
        table.focus()
        table.move_cursor(row=1)  # the first curated model (row 0 is the demo)
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)
        assert app.draft.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert "SmolLM2-135M" in text_of(app, "#details")


async def test_download_progress_shows_bytes_resumed_from_an_earlier_try(make_app):
    app = make_app(start_mode="model")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        app.screen._download_event({"type": "download_progress", "bytes_done": 3 * 2**20, "bytes_total": 8 * 2**20,
                                    "bytes_resumed": 2 * 2**20, "rate_bytes_per_s": 2**20, "eta_s": 5})
        await settle(pilot)
        text = text_of(app, "#download-text")
        assert "3.0 MB / 8.0 MB (2.0 MB resumed)" in text and "ETA" in text


async def test_every_step_is_one_key_away_and_every_action_is_in_the_palette(make_app):
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        for key, mode in (("1", "model"), ("2", "data"), ("3", "recipe"), ("4", "train"), ("5", "evaluate"),
                          ("6", "export"), ("h", "home")):
            await pilot.press(key)
            await settle(pilot)
            assert app.current_mode == mode
            screen = app.screen
            commands = {c.title: c.help for c in app.get_system_commands(screen)}
            label = dict((m, lab) for m, lab, _k in STEPS)[mode]
            for binding in screen.BINDINGS:
                if binding.show and binding.description:
                    title = f"{label}: {binding.description}"
                    assert title in commands, (screen.MODE, binding.description)
                    assert commands[title].endswith("on this screen"), commands[title]
            assert {"Go to Model", "Light / dark theme", "Start the demo run", "Help: keys and commands",
                    "Show the command"} <= set(commands)
            # Other screens' actions are found too, and say where they live.
            assert "Evaluate: Full evaluation" in commands and "Export: Export" in commands
            if mode != "evaluate":
                assert commands["Evaluate: Full evaluation"] == "Key ctrl+r on the Evaluate screen, key 5"
            assert not any(" action (key " in help for help in commands.values())


async def test_a_palette_action_of_another_screen_switches_to_it_and_runs(make_app):
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        assert app.current_mode == "home"
        command = next(c for c in app.get_system_commands(app.screen) if c.title == "Evaluate: Clear chat")
        command.callback()
        await settle(pilot)
        assert app.current_mode == "evaluate"
        command = next(c for c in app.get_system_commands(app.screen) if c.title == "Evaluate: Compare base and tuned")
        command.callback()
        await settle(pilot)
        assert app.screen.query_one("#compare-switch").value is True


async def test_help_screen_lists_every_screens_keys_and_commands(make_app):
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("2")
        await settle(pilot)
        app.screen.query_one("#steps").focus()
        await pilot.press("question_mark")
        await settle(pilot)
        assert isinstance(app.screen, HelpScreen)
        text = text_of(app, "#help-text")
        # The screen the user is on comes first, marked as such.
        assert text.index("Data key 2  (this screen)") < text.index("Home key h") < text.index("Export key 6")
        for needle in ("Check file", "ctrl+k", "Full evaluation", "ctrl+r", "ft-desk eval RUN",
                       "ft-desk data check FILE", "command palette", "Start training"):
            assert needle in text, needle
        await pilot.press("escape")
        await settle(pilot)
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("f1")
        await settle(pilot)
        assert isinstance(app.screen, HelpScreen)


def test_the_help_names_only_commands_the_cli_has():
    from ft_desk.trainer.cli.main import COMMANDS

    for commands in SCREEN_COMMANDS.values():
        for line in commands:
            assert line.split()[1] in COMMANDS, line


async def test_theme_toggle_is_remembered(make_app, tmp_path):
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+t")
        await settle(pilot)
        assert app.theme == LIGHT
    again = make_app()
    async with again.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        assert again.theme == LIGHT


async def test_wizard_choices_survive_a_restart_and_a_changed_file_is_checked_again(make_app, backend, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"text": "hello"}\n', encoding="utf-8")
    app = make_app(start_mode="recipe")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        app.draft.model, app.draft.train_file, app.draft.hardware = "demo", str(data), "cpu"
        app.draft.set_override("lora.r", "8")
        app.draft_updated()
        app.draft.data_checked = True  # as the Data screen records a clean check
        app.save_draft()
        await settle(pilot)
    again = make_app(start_mode="recipe")
    async with again.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        assert again.draft.cli_args() == app.draft.cli_args() and again.draft.data_checked
        assert "lora.r=8" in again.draft.command_line()
    data.write_text('{"text": "hello"}\n{"text": "a new row"}\n', encoding="utf-8")
    third = make_app(start_mode="home")
    async with third.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        assert third.draft.train_file == str(data) and not third.draft.data_checked  # to be checked again


async def test_closing_the_app_leaves_the_run_training_and_reopening_reattaches(make_app, backend, runs_dir):
    backend.hold_after = 2
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        app.draft = demo_draft()
        app.start_training()
        await settle(pilot, until=lambda: app.session is not None and len(app.session.history.steps) >= 1)
        run_dir = app.session.run_dir
        process = backend.processes[-1]
    assert process.poll() is None  # still training without the app
    again = make_app()
    async with again.run_test(size=(100, 30)) as pilot:
        await settle(pilot, until=lambda: again.session is not None and again.session.history.steps)
        assert again.current_mode == "train" and again.session.run_dir == run_dir
        assert again.session.launch is None  # followed through the run folder, not as our child
        again.action_stop_run()
        await settle(pilot)
        await pilot.press("y")
        await settle(pilot, until=lambda: again.session.history.finished is not None)
        assert again.session.history.finished["status"] == "stopped"
    assert wait_for(lambda: process.poll() is not None)


def test_reattach_after_the_app_process_is_killed(backend, runs_dir, tmp_path):
    """The app itself is SIGKILLed mid-run (what a dropped SSH session can do); the run goes on, and a new app
    picks it up from the run folder."""
    import asyncio
    import os
    import signal
    import subprocess
    import sys

    script = Path(__file__).parent / "run_app_headless.py"
    app_proc = subprocess.Popen([sys.executable, str(script), str(runs_dir)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "app.err", "wb"),
                                start_new_session=True)
    events = runs_dir / "run-1" / "events.jsonl"
    try:
        assert wait_for(lambda: events.is_file() and events.read_text().count('"type": "step"') >= 2, timeout=60), \
            (tmp_path / "app.err").read_text()
    finally:
        app_proc.kill()  # SIGKILL: no clean-up code of the app runs
        app_proc.wait()
    state = json.loads((runs_dir / "run-1" / "state.json").read_text())
    assert state["status"] == "running"
    pid = state["pid"]
    assert wait_for(lambda: Path(f"/proc/{pid}").exists())

    from ft_desk.tui.app import FtDeskApp

    from .conftest import FIXED_NOW

    async def reopen():
        app = FtDeskApp(backend=backend, clock=lambda: FIXED_NOW, settings=tmp_path / "s.json")
        async with app.run_test(size=(100, 30)) as pilot:
            await settle(pilot, until=lambda: app.session is not None and app.session.history.steps)
            assert app.current_mode == "train" and app.session.name == "run-1"
            os.kill(pid, signal.SIGINT)
            await settle(pilot, until=lambda: app.session.history.finished is not None)
            assert app.session.history.finished["status"] == "stopped"

    asyncio.run(reopen())
