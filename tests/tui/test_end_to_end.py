"""The whole wizard on the demo preset with real child processes, as a user walks it: pick the model, load the
data (real `ft-desk data check`), choose the recipe (a few steps so it stays short), train (a real detached
`ft-desk train`) and watch the chart fill in, evaluate (before/after samples, the chat playground answering through
a real `ft-desk chat`), export (a real `ft-desk export --format adapter`, verified)."""

from __future__ import annotations

import pytest
from textual.widgets import DataTable, Input, TabbedContent

from ft_desk.tui.app import FtDeskApp
from ft_desk.tui.backend import CliBackend
from ft_desk.tui.screens.recipe import _field_id

from .conftest import FIXED_NOW
from .test_app import settle, text_of

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_the_wizard_trains_evaluates_and_exports_the_demo(demo_model_dir, tmp_path):
    app = FtDeskApp(backend=CliBackend(), clock=lambda: FIXED_NOW, settings=tmp_path / "settings.json")
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        await settle(pilot)
        # Model: the curated list comes from `ft-desk models search` (offline here); the demo is the first row.
        await pilot.press("1")
        await settle(pilot, until=lambda: app.screen.query_one("#find-table", DataTable).row_count > 1, timeout=90)
        table = app.screen.query_one("#find-table", DataTable)
        table.focus()
        table.move_cursor(row=0)
        await pilot.press("enter")
        await settle(pilot)
        assert app.draft.model == "demo" and app.draft.strategy == "demo"

        # Data: type the file, the lint report arrives from `ft-desk data check`.
        await pilot.press("2")
        await settle(pilot)
        await pilot.click("#data-path")
        await pilot.press(*"demo", "enter")
        await settle(pilot, until=lambda: app.draft.data_checked, timeout=120)
        assert "messages" in text_of(app, "#data-summary")
        await pilot.press("escape")  # out of the text field, so the step keys work

        # Recipe: the demo recipe, shortened to 4 steps; the estimate comes from the planner.
        await pilot.press("3")
        await settle(pilot)
        steps = app.screen.query_one("#" + _field_id("train.max_steps"), Input)
        steps.value = "4"
        await settle(pilot)
        app.draft.overrides.update({"eval.every_steps": "2", "eval.sample_prompts": "1",
                                    "eval.max_new_tokens": "8", "output.save_every": "2"})
        app.draft_updated()
        memory = app.screen.query_one("#memory")
        await settle(pilot, until=lambda: "peak" in str(memory.render()) or "No estimate" in str(memory.render()),
                     timeout=120)
        assert "peak" in str(memory.render()), (str(memory.render()), app.draft.error(),
                                                [f"{w.name}:{w.state}" for w in app.workers])
        assert app.draft.config().train.max_steps == 4

        # Train: a real detached child; the chart fills in from RUN_DIR/events.jsonl.
        await pilot.press("escape")
        await pilot.press("4")
        await pilot.press("t")
        await settle(pilot, until=lambda: app.session is not None and len(app.session.history.steps) >= 1,
                     timeout=300)
        assert app.screen.query_one("#loss-chart").history.steps
        await settle(pilot, until=lambda: app.session.history.finished is not None, timeout=300)
        assert app.session.history.finished["status"] == "completed", app.session.history.finished
        assert len(app.session.history.steps) == 4 and app.session.history.evals

        # Evaluate: before/after answers, then the chat playground through `ft-desk chat`.
        await pilot.press("5")
        await settle(pilot)
        assert len(app.screen.query(".sample-out")) == 2
        app.screen.query_one("#eval-tabs", TabbedContent).active = "tab-chat"
        chat = app.screen.query_one("#chat-input", Input)
        chat.focus()
        await pilot.press(*"Where is my order?", "enter")  # asked while the model still loads: sent once ready
        notes = " ".join(str(w.render()) for w in app.screen.query(".chat-note"))
        assert not app.screen.chat_ready and "sent once the model has loaded" in notes
        await settle(pilot, until=lambda: app.screen.messages and app.screen.messages[-1]["role"] == "assistant",
                     timeout=180)
        assert [m["role"] for m in app.screen.messages] == ["user", "assistant"]

        # Export: the adapter, verified against the trained model by `ft-desk export`.
        await pilot.press("escape")
        await pilot.press("6")
        await settle(pilot)
        await pilot.press("ctrl+e")
        await settle(pilot, until=lambda: not app.screen.running, timeout=300)
        report = text_of(app, "#export-report")
        assert "ok" in report or "unverified" in report, report
        exports = list((app.session.run_dir / "exports").glob("adapter-*"))
        assert exports and (exports[0] / "adapter_config.json").is_file()
