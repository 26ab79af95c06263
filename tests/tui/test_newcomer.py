"""What a newcomer trips over on a first run (issue 16), checked the way they meet it: the evaluation's limit,
ETA and cancel, the chat playground's compare and sampling controls, the data summary of raw text, the ticks in
the step list that must not lie, `t` on data the check refused, a mistyped model folder, the shell command."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from textual.widgets import Checkbox, DataTable, Input, Static

from ft_desk.tui.draft import Draft, demo_draft
from ft_desk.tui.eval_eta import EvalEta, phases_of
from ft_desk.tui.widgets.dialogs import CommandDialog

from .conftest import load_fixture, make_run
from .test_app import settle, text_of

pytestmark = pytest.mark.anyio


async def wait_until(pilot, condition, timeout: float = 20.0) -> None:
    """Like settle(until=...), without waiting for every worker (an evaluation on hold never completes)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"condition not reached in {timeout} s")
        await pilot.pause(0.05)
        await asyncio.sleep(0.02)


# The evaluation: limit, ETA, cancel.
async def test_the_example_limit_goes_to_ft_desk_eval(make_app, runs_dir, backend):
    run_dir = make_run(runs_dir, "demo-run")
    app = make_app(start_mode="evaluate")
    async with app.run_test(size=(100, 30)) as pilot:
        app.follow(run_dir)
        await settle(pilot, until=lambda: app.session.ended)
        app.screen.query_one("#eval-limit", Input).value = "12"
        await pilot.press("ctrl+r")
        await settle(pilot, until=lambda: not app.screen.evaluating)
        assert ("evaluate_options", ["--limit", "12"]) in backend.calls
        app.screen.query_one("#eval-limit", Input).value = ""
        await pilot.press("ctrl+r")
        await settle(pilot, until=lambda: not app.screen.evaluating)
        assert backend.calls[-1] == ("evaluate_options", [])


async def test_a_long_evaluation_is_cancelled_at_once_and_says_so(make_app, runs_dir, backend):
    backend.eval_hold = threading.Event()  # "loading the model" until cancelled
    run_dir = make_run(runs_dir, "demo-run")
    app = make_app(start_mode="evaluate")
    async with app.run_test(size=(100, 30)) as pilot:
        app.follow(run_dir)
        await settle(pilot, until=lambda: app.session.ended)
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: "ctrl+x cancels" in text_of(app, "#eval-phase"))
        assert app.screen.evaluating
        await pilot.press("ctrl+x")
        await wait_until(pilot, lambda: not app.screen.evaluating)
        assert "evaluation cancelled" in text_of(app, "#eval-report")
        assert "failed" not in text_of(app, "#eval-report")


async def test_quitting_during_an_evaluation_ends_it(make_app, runs_dir, backend):
    backend.eval_hold = threading.Event()
    run_dir = make_run(runs_dir, "demo-run")
    app = make_app(start_mode="evaluate")
    async with app.run_test(size=(100, 30)) as pilot:
        app.follow(run_dir)
        await settle(pilot, until=lambda: app.session.ended)
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: app.screen.evaluating)
        screen = app.screen
    assert screen._eval_cancel.is_set()  # the stream's watcher ends the child on this (tests/tui/test_commands)


async def test_the_phase_line_shows_the_time_left_for_the_whole_evaluation(make_app, runs_dir):
    run_dir = make_run(runs_dir, "demo-run")
    app = make_app(start_mode="evaluate")
    async with app.run_test(size=(100, 30)) as pilot:
        app.follow(run_dir)
        await settle(pilot, until=lambda: app.session.ended)
        screen = app.screen
        screen.evaluating = True
        screen._eval_event({"type": "eval_started", "metrics": ["loss", "rouge", "retention"]})
        screen._eval_event({"type": "eval_progress", "phase": "load", "model": "both", "done": 0, "total": 1,
                            "elapsed_s": 0.0})
        screen._eval_event({"type": "eval_progress", "phase": "loss", "model": "base", "done": 5, "total": 10,
                            "elapsed_s": 20.0})
        await pilot.pause()
        # loss (base) started at 0 s and is half done in 20 s: 20 s left of it, and five more phases of 40 s.
        assert "about 03:40 left in all" in text_of(app, "#eval-phase")


def test_the_eta_learns_each_phase_from_the_base_model():
    eta = EvalEta()
    eta.started({"metrics": ["loss", "exact", "retention"]})
    assert eta.phases == ["loss", "generate", "retention"] == phases_of(["retention", "exact", "loss"])
    events = [("load", "both", 0, 1, 0.0), ("loss", "base", 10, 10, 10.0), ("generate", "base", 10, 10, 110.0),
              ("retention", "base", 4, 4, 120.0), ("loss", "tuned", 5, 10, 125.0)]
    for phase, side, done, total, elapsed in events:
        eta.progress({"phase": phase, "model": side, "done": done, "total": total, "elapsed_s": elapsed})
    # tuned loss: 5 s left; then generate and retention as the base model took them (100 s, 10 s).
    assert eta.remaining_s() == pytest.approx(115.0)
    assert EvalEta().remaining_s() is None  # nothing measured yet: no guess


# The chat playground.
async def open_chat(pilot, app, runs_dir):
    run_dir = make_run(runs_dir, "demo-run")
    app.follow(run_dir)
    await settle(pilot, until=lambda: app.session.ended)
    await pilot.press("5")
    await settle(pilot)
    app.screen.query_one("#eval-tabs").active = "tab-chat"
    await wait_until(pilot, lambda: app.screen.chat_ready)


async def test_compare_asks_tuned_then_base_and_keeps_the_tuned_answer(make_app, runs_dir, backend):
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await open_chat(pilot, app, runs_dir)
        screen = app.screen
        await pilot.press("ctrl+o")
        assert screen.query_one("#compare-switch", Checkbox).value
        screen.query_one("#chat-system", Input).value = "Answer as Mo."
        screen.query_one("#chat-temperature", Input).value = "0.7"
        screen.query_one("#chat-top-p", Input).value = "0.9"
        screen.query_one("#chat-max-tokens", Input).value = "24"
        chat_input = screen.query_one("#chat-input", Input)
        chat_input.value = "Where is my order?"
        chat_input.focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(backend.chat.requests) == 2 and not screen._busy)
        first, second = backend.chat.requests
        assert (first["base"], second["base"]) == (False, True)
        assert first["messages"] == second["messages"] == [{"role": "user", "content": "Where is my order?"}]
        assert first["system"] == "Answer as Mo." and first["temperature"] == 0.7 and first["top_p"] == 0.9
        assert first["max_new_tokens"] == 24
        log = " ".join(str(w.render()) for w in screen.query("#chat-log Static"))
        assert log.index("tuned:") < log.index("tuned answer 1") < log.index("base:") < log.index("base answer 2")
        # The conversation continues from the tuned answer.
        assert screen.messages[-1] == {"role": "assistant", "content": "tuned answer 1"}
        # ... and the base model continues from its own: walking the wizard, the base model heard the tuned
        # model's SQL as its own earlier reply and copied it, which made the comparison say nothing.
        chat_input.value = "And my refund?"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(backend.chat.requests) == 4 and not screen._busy)
        third, fourth = backend.chat.requests[2:]
        assert [m["content"] for m in third["messages"]] == ["Where is my order?", "tuned answer 1", "And my refund?"]
        assert [m["content"] for m in fourth["messages"]] == ["Where is my order?", "base answer 2", "And my refund?"]


async def test_bad_sampling_values_are_one_sentence_and_nothing_is_sent(make_app, runs_dir, backend):
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await open_chat(pilot, app, runs_dir)
        screen = app.screen
        screen.query_one("#chat-top-p", Input).value = "1.5"
        chat_input = screen.query_one("#chat-input", Input)
        chat_input.value = "hello"
        chat_input.focus()
        await pilot.press("enter")
        await pilot.pause()
        assert backend.chat.requests == []
        assert any("top-p must be a number above 0 and at most 1" in n.message for n in app._notifications)
        assert chat_input.value == "hello"  # what the user typed is kept


async def test_a_raw_text_run_says_its_chat_has_no_template(make_app, runs_dir, backend):
    backend.chat_format = "text"
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await open_chat(pilot, app, runs_dir)
        await pilot.pause(0.2)
        log = " ".join(str(w.render()) for w in app.screen.query("#chat-log Static"))
        assert "trained on raw text rows" in log and "without a chat template" in log


# Data, Recipe, Train: the step list tells the truth.
def text_report() -> dict:
    report = load_fixture("data_check_demo.json")
    return {**report, "format": "text", "rendering": "chat_template", "train_on": "assistant",
            "path": "/data/wikisql/train.jsonl"}


async def test_the_data_summary_of_text_rows_says_raw_text(make_app):
    app = make_app(start_mode="data")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        app.draft = Draft(model="demo", train_file="demo")
        app.screen.show_report(text_report())
        await pilot.pause()
        summary = text_of(app, "#data-summary")
        assert "raw text + EOS" in summary and "loss on every token" in summary
        assert "chat template" not in summary and "assistant replies" not in summary


async def test_a_missing_validation_file_takes_the_data_tick_away(make_app, tmp_path):
    app = make_app(start_mode="data")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        app.draft = demo_draft()
        app.draft_updated()
        await settle(pilot)
        assert app.draft.ready()["data"]
        field = app.screen.query_one("#valid-file", Input)
        field.value = str(tmp_path / "nope.jsonl")
        field.focus()
        await pilot.press("enter")
        await settle(pilot)
        assert any("nope.jsonl: no such file" in n.message for n in app._notifications)
        assert "data.valid_file" not in app.draft.overrides
        # A draft saved with a path that has gone since: no tick, and `t` says why instead of starting.
        app.draft.overrides["data.valid_file"] = str(tmp_path / "gone.jsonl")
        assert not app.draft.ready()["data"]
        assert "The validation file" in (app.start_problem() or "") and "Data step (2)" in app.start_problem()


async def test_t_does_not_start_a_run_on_data_the_check_found_unusable(make_app, backend, tmp_path):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"nothing": 1}\n', encoding="utf-8")
    app = make_app(start_mode="data")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        app.draft = Draft(model="demo", train_file=str(data))
        app.screen.show_report({"ok": False, "error": f"{data}:1: no field the formats know", "hint": "add text"})
        await pilot.press("4")
        await settle(pilot)
        app.screen.query_one("#steps").focus()
        await pilot.press("t")
        await settle(pilot)
        assert not [c for c in backend.calls if c[0] == "start_training"]
        message = next(n.message for n in app._notifications if "not usable" in n.message)
        assert "broken.jsonl:1" in message and "Data step (2)" in message


async def test_no_recipe_tick_next_to_does_not_fit(make_app, backend, monkeypatch):
    plan = {**load_fixture("plan_demo.json"), "verdict": "does not fit"}
    monkeypatch.setattr(backend, "plan", lambda draft, model=None: plan)
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        app.draft = demo_draft()
        assert app.draft.ready()["recipe"]
        await pilot.press("3")
        await settle(pilot, until=lambda: app.plan_verdict is not None)
        await settle(pilot)
        steps = str(app.screen.query_one("#steps").get_option_at_index(3).prompt)
        assert "Recipe" in steps and "✓" not in steps
        plan["verdict"] = "fits"
        app.screen.action_estimate()
        await settle(pilot, until=lambda: app.plan_verdict[1] == "fits")
        await settle(pilot)
        assert "✓" in str(app.screen.query_one("#steps").get_option_at_index(3).prompt)


async def test_a_mistyped_model_folder_is_not_searched_on_the_hub(make_app, backend):
    app = make_app(start_mode="model")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        search = app.screen.query_one("#model-search", Input)
        search.value = "/no/such/model-folder"
        app.screen.run_search()
        await settle(pilot)
        assert ("search_models", "/no/such/model-folder") not in backend.calls
        assert "no folder /no/such/model-folder: check the path" in text_of(app, "#search-note")
        assert app.screen.query_one("#find-table", DataTable).row_count == 0


async def test_show_the_command_is_the_line_the_wizard_runs(make_app):
    app = make_app(start_mode="train")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        app.draft = demo_draft()
        app.screen.query_one("#steps").focus()
        await pilot.press("c")
        await settle(pilot)
        assert isinstance(app.screen, CommandDialog)
        shown = str(app.screen.query_one("#command-line", Static).render())
        assert shown == app.draft.command_line() and shown.startswith("ft-desk train --preset demo")


def test_the_fake_backend_answers_every_backend_method():
    from ft_desk.tui.backend import Backend

    from .conftest import FakeBackend

    names = [n for n in dir(Backend) if not n.startswith("_")]
    assert set(names) <= set(dir(FakeBackend)), set(names) - set(dir(FakeBackend))
    assert "open_chat" in names  # the chat playground reaches its child through the backend, faked in tests


def test_a_sample_prompt_shows_its_end_where_the_question_is():
    """A WikiSQL prompt is the table, its columns, then the question; the Before / after tab showed the first
    three lines (the columns wrap), so the question was never on screen."""
    from ft_desk.tui.screens.evaluate import prompt_tail, readable_prompt

    rendered = ("<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n<|im_start|>user\n"
                "table: 1-10015132-11\n"
                "columns: Player, No., Nationality, Position, Years in Toronto, School/Club Team\n"
                "context: the 2004 season\nQ: What position does the player who played for butler cc (ks) play?"
                "<|im_end|>\n<|im_start|>assistant\n")
    shown = prompt_tail(readable_prompt(rendered))
    assert shown.endswith("Q: What position does the player who played for butler cc (ks) play?")
    assert shown.startswith("… columns:") and "table:" not in shown
    assert prompt_tail("Say hi.") == "Say hi."
    assert prompt_tail("x" * 900).startswith("… ") and len(prompt_tail("x" * 900)) == 402


async def test_the_sidebar_names_a_gguf_by_its_file_name_in_two_lines_at_most(make_app):
    """The whole path of /root/.cache/.../SmolLM2-135M-Instruct.Q4_1.gguf took five lines of the sidebar."""
    from ft_desk.tui.screens.base import model_label

    app = make_app(start_mode="recipe")
    async with app.run_test(size=(80, 24)) as pilot:
        app.draft = demo_draft()
        app.draft.model = "/root/.cache/ft-desk-real/SmolLM2-135M-Instruct.Q4_1.gguf"
        app.draft.train_file = "/tmp/walk/train.jsonl"
        app.draft_updated()
        await settle(pilot)
        shown = str(app.screen.query_one("#draft-summary", Static).render())
        assert "/root" not in shown and "Instruct.Q4_1.gguf" in shown
        model_lines = shown.split("data")[0].splitlines()
        assert len(model_lines) <= 3  # "model" and the name, wrapped into the sidebar's width
        assert "data  train.jsonl" in shown  # it was "…k/train.jsonl"
    assert model_label("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert model_label("demo") == "demo" and model_label(None) == ""


def test_a_few_example_metric_shows_its_interval_the_notes_speak_of():
    """On 20 held-out rows every metric said "(few examples)" while the note under the table said the intervals
    are "shown as +/-"; the row now carries the +/- of report.json's note."""
    from ft_desk.tui.screens.evaluate import eval_lines

    report = {"examples": 20, "metrics": [
        {"name": "exact_match", "label": "exact match", "scale": "rate", "base": 0.0, "tuned": 0.1, "delta": 0.1,
         "verdict": "unclear", "few": True, "note": "only 20 examples: +/-14 points"},
        {"name": "loss", "label": "loss (per token)", "scale": "loss", "base": 1.92, "tuned": 0.3, "delta": -1.62,
         "verdict": "better", "few": True},
        {"name": "rouge_l", "label": "ROUGE-L F1", "scale": "score", "base": 0.2, "tuned": 0.8, "delta": 0.6,
         "verdict": "better", "few": False, "note": ""}],
        "notes": ["only 20 held-out examples: numbers carry wide 95% intervals (shown as +/-)"]}
    lines = eval_lines(report)
    assert "unclear[/] [dim](+/-14 points)[/]" in lines[1]
    assert "(few examples)" in lines[2]  # no note: still says why the verdict is careful
    assert "(" not in lines[3].split("better")[1]


async def test_a_validation_file_is_checked_and_its_rows_are_shown(make_app, backend, tmp_path):
    """Setting the validation file said nothing at all; it now gets `ft-desk data check` like the training file
    and the findings name its rows, or why it cannot be used."""
    valid = tmp_path / "valid.jsonl"
    valid.write_text("{}\n")
    app = make_app(start_mode="data")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        app.draft = demo_draft()
        app.draft_updated()
        await settle(pilot)
        field = app.screen.query_one("#valid-file", Input)
        await pilot.press("ctrl+l")  # one key instead of eight tabs
        assert field.has_focus
        field.value = str(valid)
        await pilot.press("enter")
        await settle(pilot, until=lambda: "validation file" in text_of(app, "#findings"))
        assert ("check_data", str(valid)) in backend.calls
        assert "validation file valid.jsonl: 350 rows, 350 usable · no problems found" in text_of(app, "#findings")
        # The share of the training file is not used any more: greyed out, not left to look like a setting in force.
        assert app.screen.query_one("#val-fraction", Input).disabled
    from ft_desk.tui.screens.data import valid_findings

    lines = valid_findings("/x/valid.jsonl", {"ok": False, "error": "line 3: not JSON", "hint": "fix line 3"})
    assert lines == ["[b red]validation file valid.jsonl not usable:[/] line 3: not JSON", "[b]fix:[/] fix line 3"]


async def test_the_ready_screen_scrolls_when_the_command_runs_past_an_80x24_screen(make_app, tmp_path):
    """With a model folder's path, the validation file and the sizing line the shell command went below the
    screen's bottom edge at 80x24, with its last --set cut off and no way to reach it."""
    data, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    data.write_text("{}\n")
    valid.write_text("{}\n")
    app = make_app(start_mode="train")
    async with app.run_test(size=(80, 24)) as pilot:
        app.draft = demo_draft()
        app.draft.strategy, app.draft.train_file = "qlora", str(data)
        app.draft.model = str(tmp_path / "models" / "SmolLM2-135M-Instruct-bf16")  # a long folder path
        app.draft.set_override("data.valid_file", str(valid))
        app.draft_updated()
        await settle(pilot)
        ready = app.screen.query_one("#train-ready")
        assert ready.max_scroll_y > 0
        ready.scroll_end(animate=False)
        await settle(pilot)
        assert ready.scroll_y == ready.max_scroll_y  # the end of the command can be scrolled into view


async def test_the_phase_line_wraps_at_80x24_so_ctrl_x_stays_readable(make_app, runs_dir, backend):
    """At 80x24 the export's phase line ran off the right edge ("...(reference)  ctrl+x c"); the evaluation's
    the same. Both now wrap inside the screen."""
    backend.eval_hold = threading.Event()
    run_dir = make_run(runs_dir, "demo-run")
    app = make_app(start_mode="evaluate")
    async with app.run_test(size=(80, 24)) as pilot:
        app.follow(run_dir)
        await settle(pilot, until=lambda: app.session.ended)
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: "ctrl+x cancels" in text_of(app, "#eval-phase"))
        phase = app.screen.query_one("#eval-phase")
        assert phase.region.right <= 80
        await pilot.press("ctrl+x")
        await wait_until(pilot, lambda: not app.screen.evaluating)
    backend.eval_hold = None
    app = make_app(start_mode="export")
    async with app.run_test(size=(80, 24)) as pilot:
        app.follow(run_dir)
        await settle(pilot, until=lambda: app.session.ended)
        phase = app.screen.query_one("#export-phase", Static)
        app.screen.query_one("#export-progress-row").display = True
        phase.update("verifying: loading the trained model (reference)  [dim]ctrl+x cancels[/]")
        await settle(pilot)
        assert phase.region.right <= 80 and phase.region.height >= 2  # wrapped, none of it past the edge
        assert "verify against the trained model" in str(app.screen.query_one("#verify").label)
