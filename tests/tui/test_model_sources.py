"""The Model screen with models that are not Hugging Face folders: Ollama's store listed with size, GGUF type and
fit (the answer of `ft-desk models ollama --json`, recorded from a store holding SmolLM2-135M-Instruct Q4_1; the
second row is that answer edited into a larger model), a .gguf path typed into the search box, and the choice going
into the run's model.name."""

from __future__ import annotations

import pytest
from textual.widgets import DataTable, Input, TabbedContent

from .conftest import load_fixture
from .test_app import settle, text_of

pytestmark = pytest.mark.anyio


async def test_ollama_models_are_listed_with_size_quant_type_and_fit_and_can_be_chosen(make_app, backend):
    backend.ollama_answer = load_fixture("models_ollama.json")
    app = make_app(start_mode="model")
    async with app.run_test(size=(110, 32)) as pilot:
        table = app.screen.query_one("#ollama-table", DataTable)
        await settle(pilot, until=lambda: table.row_count == 2)
        app.screen.query_one(TabbedContent).active = "tab-ollama"
        await settle(pilot)
        rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
        assert rows[0][:5] == ["smollm2:135m", "134.5M", "93.8 MB", "Q4_1", "fits"]
        assert rows[1][:5] == ["qwen2.5:0.5b", "494M", "379.4 MB", "Q4_K_M", "tight"] and rows[1][5] == "imported"
        table.focus()
        table.move_cursor(row=0)
        await settle(pilot)
        details = text_of(app, "#details")
        assert "dequantized from the GGUF's Q4_1 to bfloat16" in details
        assert "Q4_1 GGUF in Ollama's store" in details and "imported once on first use" in details
        await pilot.press("enter")
        await settle(pilot)
        assert app.draft.model == "smollm2:135m" and app.draft.strategy == "qlora"
        assert "model.name=smollm2:135m" in app.draft.set_args()
        assert not [c for c in backend.calls if c[0] == "model_info"]  # no Hub lookup for an Ollama name


async def test_an_empty_store_says_where_it_looked(make_app, backend):
    app = make_app(start_mode="model")
    async with app.run_test(size=(110, 32)) as pilot:
        await settle(pilot, until=lambda: ("ollama_models", app.draft.cli_args()) in backend.calls
                     or any(c[0] == "ollama_models" for c in backend.calls))
        app.screen.query_one(TabbedContent).active = "tab-ollama"
        await settle(pilot)
        assert "No Ollama models in /home/user/.ollama/models" in text_of(app, "#details")
        assert "OLLAMA_MODELS" in text_of(app, "#details")


async def test_a_gguf_path_typed_in_the_search_box_is_offered_and_used(make_app, backend, tmp_path):
    gguf = tmp_path / "my-model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    asked = []

    def model_info(model_id, draft):  # what `ft-desk models info FILE.gguf --json` answers (its header's facts)
        asked.append(model_id)
        return {"id": model_id, "kind": "gguf", "size_bytes": 397_807_936, "file_type": "Q4_K_M", "params": 494_032_768,
                "imported": False, "architecture": "qwen2", "fit": {"verdict": "fits"},
                "note": "weights dequantized from the GGUF's Q4_K_M to bfloat16: they keep the Q4_K_M rounding"}

    backend.model_info = model_info
    app = make_app(start_mode="model")
    async with app.run_test(size=(110, 32)) as pilot:
        await settle(pilot)
        box = app.screen.query_one("#model-search", Input)
        box.value = str(gguf)
        await settle(pilot, until=lambda: app.screen.query_one("#find-table", DataTable).row_count == 1)
        table = app.screen.query_one("#find-table", DataTable)
        assert str(table.get_row_at(0)[0]) == str(gguf)
        table.focus()
        table.move_cursor(row=0)
        await settle(pilot)
        await settle(pilot, until=lambda: asked and "Q4_K_M GGUF" in text_of(app, "#details"))
        details = text_of(app, "#details")
        assert asked == [str(gguf)] and "494M parameters" in details and "imported once on first use" in details
        assert "dequantized from the GGUF's Q4_K_M to bfloat16" in details
        # the file is on this machine: no download offered; the row takes the header's facts (it said "tiny" and "?")
        assert "not downloaded" not in details and "ctrl+d" not in details
        assert [str(c) for c in table.get_row_at(0)[1:4]] == ["494M", "379.4 MB", "fits"]
        box.focus()
        await pilot.press("enter")
        await settle(pilot)
        assert app.draft.model == str(gguf)


def test_a_runs_history_keeps_the_import_and_logs_it_plainly():
    from ft_desk.trainer.events import make_event
    from ft_desk.tui.history import RunHistory

    history = RunHistory()
    history.apply(make_event("model_import", phase="convert", source="smollm2:135m", done=40, total=272,
                             message="dequantizing Q4_1 tensors: 40/272"))
    assert history.model_import["phase"] == "convert"
    history.apply(make_event("model_import", phase="done", source="smollm2:135m", done=0, total=0,
                             folder="/data/imported-models/b179c9523d0e6a0f", file_type="Q4_1", dtype="bfloat16",
                             message="imported smollm2:135m in 70s: weights dequantized from the GGUF's Q4_1 to "
                                     "bfloat16: they keep the Q4_1 rounding"))
    assert history.model_import["file_type"] == "Q4_1" and "model_import" not in history.extra
    lines = [text for _, text in history.log]
    assert lines == ["dequantizing Q4_1 tensors: 40/272",
                     "imported smollm2:135m in 70s: weights dequantized from the GGUF's Q4_1 to bfloat16: they keep "
                     "the Q4_1 rounding"]


async def test_a_model_folder_typed_in_the_search_box_shows_its_fit(make_app, backend, tmp_path):
    """`models info` takes Hub ids only, so a local folder showed "?" and no fit, and offered ctrl+d to download
    it; the memory plan gives its parameters and fit."""
    folder = tmp_path / "SmolLM2-135M-Instruct-bf16"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    app = make_app(start_mode="model")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        app.screen.query_one("#model-search", Input).value = str(folder)
        table = app.screen.query_one("#find-table", DataTable)
        await settle(pilot, until=lambda: table.row_count == 1)
        table.focus()
        table.move_cursor(row=0)
        await settle(pilot, until=lambda: any(c[0] == "plan" for c in backend.calls)
                     and "peak" in text_of(app, "#details"))
        details = text_of(app, "#details")
        assert "ctrl+d" not in details and "on this machine" in details
        assert [str(c) for c in table.get_row_at(0)[1:4:2]] == ["4M", "fits"]
        app.screen._fill("find-table", [{"id": str(folder), "cached": True, "license": "local"}])  # a new search
        await settle(pilot)
        assert [str(c) for c in table.get_row_at(0)[1:4:2]] == ["4M", "fits"]  # the refill keeps the plan's facts
        assert not [c for c in backend.calls if c[0] == "model_info"]  # not a Hub id: no Hub lookup
