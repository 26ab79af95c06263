"""The Data step's column-mapping dialog: opened by itself for a file whose columns fit no format, each complete
mapping checked live (result and masked sample inside the dialog), Apply writing data.columns into the draft and
Cancel putting the old mapping back."""

from __future__ import annotations

import json

import pytest
from textual.widgets import Button, Select

from ft_desk.trainer.columns import parse_columns
from ft_desk.tui.widgets.column_map import ColumnMapDialog

from .conftest import FIXTURES
from .test_app import settle, text_of

pytestmark = pytest.mark.anyio

MISMATCH = {
    "ok": False, "format": "unknown", "rows": 0, "usable_rows": 0, "samples": [], "histogram": [],
    "error": "qa.csv:2: the rows' columns ('q', 'a') fill no format's roles (text, prompt+completion, "
             "instruction+output, conversations or messages)",
    "hint": "map them with --columns prompt=q,completion=a", "where": "qa.csv:2",
    "columns": [{"name": "q", "sample": "How do I reset my password?", "kind": "text"},
                {"name": "a", "sample": "Open Settings, then Security.", "kind": "text"}],
    "column_mapping": "", "columns_note": "", "suggested_columns": "prompt=q,completion=a",
}


def fake_check(backend, tmp_path):
    """check_data answering like `ft-desk data check --json`: unusable until a complete mapping is in the draft."""
    good = json.loads((FIXTURES / "data_check_demo.json").read_text())
    seen = []

    def check_data(draft):
        mapping = draft.columns()
        seen.append(dict(mapping))
        if mapping == {"prompt": "q", "completion": "a"}:
            return {**good, "format": "prompt_completion", "path": str(tmp_path / "qa.csv"),
                    "column_mapping": "prompt=q,completion=a", "columns": MISMATCH["columns"]}
        return {**MISMATCH, "path": str(tmp_path / "qa.csv")}

    backend.check_data = check_data
    return seen, good


async def open_file(app, pilot, tmp_path):
    data = tmp_path / "qa.csv"
    data.write_text("q,a\nHow do I reset my password?,\"Open Settings, then Security.\"\n", encoding="utf-8")
    await settle(pilot)
    app.draft.model = "demo"
    app.draft.train_file = str(data)
    app.draft_updated()
    await settle(pilot, until=lambda: isinstance(app.screen, ColumnMapDialog))


async def test_the_dialog_opens_for_unmapped_columns_checks_live_and_apply_writes_the_draft(make_app, backend,
                                                                                            tmp_path):
    seen, good = fake_check(backend, tmp_path)
    app = make_app(start_mode="data")
    async with app.run_test(size=(100, 30)) as pilot:
        await open_file(app, pilot, tmp_path)
        dialog = app.screen
        assert isinstance(dialog, ColumnMapDialog)
        assert "fill no format's roles" in text_of(app, "#map-reason")
        shown = " ".join(str(w.render()) for w in dialog.query(".map-sample"))
        assert "How do I reset my password?" in shown and "Open Settings" in shown
        # The suggestion is filled in and tried at once: the dialog shows what training would get.
        assert dialog.query_one("#role-0", Select).value == "prompt"
        assert dialog.query_one("#role-1", Select).value == "completion"
        await settle(pilot, until=lambda: "usable" in text_of(app, "#map-result"))
        assert "prompt_completion format" in text_of(app, "#map-result")
        trained = [t for t, on in good["samples"][0]["segments"] if on][0].strip()[:10]
        assert trained in text_of(app, "#map-sample")
        assert app.draft.overrides["data.columns"] == "prompt=q,completion=a"

        # A conflict is said in one sentence and cannot be applied.
        dialog.query_one("#role-1", Select).value = "output"
        await settle(pilot)
        assert "mixes the roles of two formats" in text_of(app, "#map-line")
        assert dialog.query_one("#apply", Button).disabled
        dialog.query_one("#role-1", Select).value = "completion"
        await settle(pilot)
        assert "--columns prompt=q,completion=a" in text_of(app, "#map-line")

        await pilot.press("ctrl+s")
        await settle(pilot, until=lambda: not isinstance(app.screen, ColumnMapDialog))
        assert not isinstance(app.screen, ColumnMapDialog)
        assert parse_columns(app.draft.overrides["data.columns"]) == {"prompt": "q", "completion": "a"}
        assert "--set data.columns=prompt=q,completion=a" in " ".join(app.draft.cli_args())
        await settle(pilot, until=lambda: app.draft.data_checked)
        assert "prompt_completion" in text_of(app, "#data-summary")
        assert app.draft.data_checked


async def test_cancel_puts_the_old_mapping_back(make_app, backend, tmp_path):
    seen, _good = fake_check(backend, tmp_path)
    app = make_app(start_mode="data")
    async with app.run_test(size=(100, 30)) as pilot:
        await open_file(app, pilot, tmp_path)
        await settle(pilot, until=lambda: "data.columns" in app.draft.overrides)
        await pilot.press("escape")
        await settle(pilot, until=lambda: not isinstance(app.screen, ColumnMapDialog))
        assert "data.columns" not in app.draft.overrides
        await settle(pilot, until=lambda: seen and seen[-1] == {})
        assert "not usable" in text_of(app, "#findings") and "ctrl+e" in text_of(app, "#findings")
        assert not app.draft.data_checked
        await pilot.press("ctrl+e")  # and it opens again on request
        await settle(pilot, until=lambda: isinstance(app.screen, ColumnMapDialog))
        assert isinstance(app.screen, ColumnMapDialog)
