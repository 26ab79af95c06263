"""Model: the curated list, Hub search, the models already on this machine and those in Ollama's store, each with
parameters, size, license (or GGUF type), gated flag and whether it fits this device with the chosen recipe; a
details pane with the memory breakdown; download with a progress bar. The search box also takes a model folder or
a .gguf file. Works offline from the local cache (the top bar says so)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.coordinate import Coordinate
from textual.timer import Timer
from textual.widgets import DataTable, Input, ProgressBar, Static, TabbedContent, TabPane

from ft_desk.trainer.demo import DEMO_MODEL_NAME, DEMO_PRESET, is_demo_model
from ft_desk.trainer.events import format_bytes, format_duration
from ft_desk.trainer.model_sources import is_gguf_path, looks_like_ollama
from ft_desk.tui.commands import CommandFailed
from ft_desk.tui.screens.base import DeskScreen
from ft_desk.tui.widgets.dialogs import Confirm
from ft_desk.tui.widgets.memory import components, verdict_line

SEARCH_DELAY_S = 0.5
"""Note: each search is a Hub request from a child process; wait for a pause in typing."""
INFO_DELAY_S = 0.4
FIT_STYLE = {"fits": "green", "tight": "yellow", "does not fit": "red", "does_not_fit": "red", "no_fit": "red"}

DEMO_ROW = {
    "id": DEMO_MODEL_NAME, "params": None, "size_bytes": None, "license": "-", "gated": False, "cached": True,
    "curated": True, "fit": {"verdict": "fits"},
    "note": "A tiny Llama-architecture model with random weights, built on this machine in seconds. It runs the "
            "whole pipeline offline; what it writes is not useful.",
}


def params_text(n: Any) -> str:
    if not isinstance(n, (int, float)) or not n:
        return "?"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}".replace(".0", "")
    return str(int(n))


def fit_text(fit: Any) -> Text:
    verdict = str((fit or {}).get("verdict") or "?").replace("_", " ") if isinstance(fit, dict) else "?"
    return Text(verdict, style=FIT_STYLE.get(verdict, "dim"))


def is_local_folder(text: str) -> bool:
    """A model folder or a .gguf file typed into the search box."""
    path = Path(text).expanduser()
    return text.startswith(("/", "~", ".")) and ((path / "config.json").is_file() or is_gguf_path(text))


GGUF_NOTE = ("a GGUF file (llama.cpp, LM Studio): imported once into a model folder on first use; its weights are "
             "dequantized from the file's type")


def folder_problem(text: str) -> str | None:
    """Why a typed path is not a model folder (a Hub id never starts with / ~ or .), else None."""
    if not text.startswith(("/", "~", ".")) or is_local_folder(text):
        return None
    path = Path(text).expanduser()
    if not path.exists():
        return f"no folder {text}: check the path (a Hub id looks like org/name)"
    if not path.is_dir():
        return f"{text} is a file; a model is a folder with config.json and the weights"
    return f"{text} has no config.json, so it is not a transformers model folder"


class ModelScreen(DeskScreen):
    MODE = "model"
    TITLE = "Model"
    MAIN = "#find-table"
    BINDINGS = [
        Binding("enter", "use", "Use model", show=True),
        Binding("ctrl+d", "download", "Download"),
        Binding("ctrl+x", "cancel_download", "Cancel download", show=False),
        Binding("slash", "focus_search", "Search"),
        Binding("ctrl+n", "next", "Next: Data"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, Any]] = {}
        self._lists: dict[str, list[dict[str, Any]]] = {}
        self._search_timer: Timer | None = None
        self._info_timer: Timer | None = None
        self._searched_for: tuple | None = None
        self._cancel = threading.Event()
        self.downloading: str | None = None
        self._ollama_result: dict[str, Any] = {}
        self._ollama_empty = ""

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="search-row"):
            yield Input(placeholder="search the Hub, or a local model folder (empty: curated list)",
                        id="model-search", compact=True)
            yield Static("", id="search-note")
        with TabbedContent(id="model-tabs"):
            with TabPane("Curated & Hub", id="tab-find"):
                yield self._table("find-table")
            with TabPane("On this machine", id="tab-local"):
                yield self._table("local-table")
            with TabPane("Ollama", id="tab-ollama"):
                table = DataTable(id="ollama-table", cursor_type="row", zebra_stripes=True)
                table.add_columns("model", "params", "size", "quant", "fit", "")
                yield table
        with VerticalScroll(id="model-details"):
            yield Static("", id="details")
        with Horizontal(id="download-row"):
            yield ProgressBar(total=100, show_eta=False, id="download-bar")
            yield Static("", id="download-text")

    def _table(self, table_id: str) -> DataTable:
        table = DataTable(id=table_id, cursor_type="row", zebra_stripes=True)
        table.add_columns("model", "params", "size", "fit", "license", "gated", "")
        return table

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#download-row").display = False

    def refresh_view(self) -> None:
        key = self._search_key()
        if key != self._searched_for:
            self._searched_for = key
            self.run_search()
            self.load_local()
            self.load_ollama()

    def _search_key(self) -> tuple:
        d = self.desk.draft
        return (self.query_one("#model-search", Input).value.strip(), tuple(d.presets()),
                tuple(sorted(d.overrides.items())))

    # Searching.
    @on(Input.Changed, "#model-search")
    def _typed(self, _event: Input.Changed) -> None:
        if self._search_timer is not None:
            self._search_timer.stop()
        self._search_timer = self.set_timer(SEARCH_DELAY_S, self.refresh_view)

    @on(Input.Submitted, "#model-search")
    def _submitted(self, event: Input.Submitted) -> None:
        if is_local_folder(event.value.strip()):
            self._use(str(Path(event.value.strip()).expanduser().resolve()))
            return
        if looks_like_ollama(event.value.strip()):  # `smollm2:135m`: Ollama's name, not a Hub search
            self._use(event.value.strip())
            return
        problem = folder_problem(event.value.strip())
        if problem is not None:
            self.notify(problem, title="Not a model folder", severity="error")
            return
        self.query_one("#find-table", DataTable).focus()

    def action_focus_search(self) -> None:
        self.query_one("#model-search", Input).focus()

    def run_search(self) -> None:
        query = self.query_one("#model-search", Input).value.strip()
        self.query_one("#search-note", Static).update("[dim]searching…[/]")
        problem = folder_problem(query)
        if problem is not None:  # a mistyped path is not a Hub query
            self._fill("find-table", [])
            self.query_one("#search-note", Static).update(f"[red]{escape(problem)}[/]")
            return
        if is_local_folder(query):
            folder = str(Path(query).expanduser().resolve())
            gguf = is_gguf_path(query)
            self._show_find({"models": [{"id": folder, "cached": True, "license": "local", "source": "gguf" if gguf
                                         else None, "note": GGUF_NOTE if gguf else "a model folder on this machine"}],
                             "note": "GGUF file" if gguf else "local folder"}, query)
            return
        self._search(query)

    @work(thread=True, exclusive=True, group="model-search", exit_on_error=False)
    def _search(self, query: str) -> None:
        try:
            result = self.desk.backend.search_models(query, self.desk.draft)
        except CommandFailed as err:
            result = {"models": [], "note": err.message + (f" (fix: {err.hint})" if err.hint else ""),
                      "failed": True}
        self.app.call_from_thread(self._show_find, result, query)

    def _show_find(self, result: dict[str, Any], query: str = "") -> None:
        models = list(result.get("models") or [])
        if not query:
            models.insert(0, DEMO_ROW)
        self._fill("find-table", models)
        note = result.get("note") or ""
        if result.get("offline") and not self.desk.offline:
            self.desk.offline, self.desk.offline_reason = True, "(Hub unreachable)"
            self._refresh_chrome()
        source = {"curated": "curated list", "hub": "Hub results", "curated+hub": "curated list, then the Hub"}.get(
            str(result.get("source")), "")
        style = "red" if result.get("failed") else "dim"
        self.query_one("#search-note", Static).update(f"[{style}]{escape(note or source)}[/]")

    @work(thread=True, exclusive=True, group="model-local", exit_on_error=False)
    def load_local(self) -> None:
        try:
            result = self.desk.backend.local_models()
        except CommandFailed:
            result = {"models": []}
        rows = [{"id": m.get("repo_id"), "size_bytes": m.get("size_bytes"), "cached": True,
                 "params": next((r.get("params") for r in m.get("revisions") or [] if r.get("params")), None),
                 "license": "", "note": None if m.get("complete") else "incomplete in the cache: download again"}
                for m in result.get("models") or []]
        self.app.call_from_thread(self._fill, "local-table", [DEMO_ROW] + rows)

    @work(thread=True, exclusive=True, group="model-ollama", exit_on_error=False)
    def load_ollama(self) -> None:
        try:
            result = self.desk.backend.ollama_models(self.desk.draft)
        except CommandFailed as err:
            result = {"models": [], "problems": [err.message]}
        self.app.call_from_thread(self._fill_ollama, result)

    def _fill_ollama(self, result: dict[str, Any]) -> None:
        """Ollama's models with size, GGUF type and fit; the tab says where the store is when it is empty."""
        self._ollama_result = result
        table = self.query_one("#ollama-table", DataTable)
        table.clear()
        chosen = self.desk.draft.model
        for m in result.get("models") or []:
            model_id = str(m.get("name"))
            self.rows[model_id] = {**self.rows.get(model_id, {}), **m, "source": "ollama", "cached": True}
            flags = " ".join(f for f, on in (("✓ chosen", model_id == chosen or chosen == m.get("id")),
                                            ("imported", m.get("imported"))) if on)
            table.add_row(model_id, params_text(m.get("params")),
                          format_bytes(m["size_bytes"]) if m.get("size_bytes") else "-",
                          str(m.get("file_type") or "?"), fit_text(m.get("fit")), flags, key=model_id)
        if not table.row_count:
            where = result.get("store") or "~/.ollama/models"
            self.query_one(TabbedContent).get_tab("tab-ollama").label = "Ollama (none)"
            self._ollama_empty = (f"No Ollama models in {escape(str(where))}. Pull one with `ollama pull NAME`, set "
                                  "OLLAMA_MODELS if Ollama keeps them elsewhere, or type the path of a .gguf file "
                                  "in the search box.")
        else:
            self.query_one(TabbedContent).get_tab("tab-ollama").label = f"Ollama ({table.row_count})"
        if table.row_count and table.has_focus:
            self._highlighted(table)

    def _fill(self, table_id: str, models: list[dict[str, Any]]) -> None:
        table = self.query_one("#" + table_id, DataTable)
        table.clear()
        self._lists[table_id] = models
        chosen = self.desk.draft.model
        for m in models:
            model_id = str(m.get("id"))
            self.rows[model_id] = {**self.rows.get(model_id, {}), **m}
            flags = " ".join(f for f, on in (("✓ chosen", model_id == chosen), ("cached", m.get("cached")),
                                            ("curated", m.get("curated") and not is_demo_model(model_id))) if on)
            gated = m.get("gated")
            r = self.rows[model_id]  # with what `models info` or the plan found earlier (a refill kept only m)
            table.add_row(
                model_id, "tiny" if is_demo_model(model_id) else params_text(r.get("params")),
                format_bytes(r["size_bytes"]) if r.get("size_bytes") else "-", fit_text(r.get("fit")),
                str(m.get("license") or "?"), "gated" if gated else ("" if gated is False else "?"), flags,
                key=model_id,
            )
        if table.row_count and table.has_focus:
            self._highlighted(table)

    # Details of the highlighted model.
    def _current_table(self) -> DataTable:
        tabs = self.query_one(TabbedContent)
        table_id = {"tab-local": "#local-table", "tab-ollama": "#ollama-table"}.get(tabs.active, "#find-table")
        return self.query_one(table_id, DataTable)

    def selected_id(self) -> str | None:
        table = self._current_table()
        if not table.row_count:
            return None
        try:
            return str(table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value)
        except Exception:  # noqa: BLE001 - table being refilled
            return None

    @on(DataTable.RowHighlighted)
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._highlighted(event.data_table)

    def _highlighted(self, _table: DataTable) -> None:
        model_id = self.selected_id()
        if model_id is None:
            return
        row = self.rows.get(model_id, {})
        self._show_details(model_id, row)
        # Hub models and GGUF files have details to fetch (`models info` reads a GGUF's header); Ollama rows
        # arrive complete from `models ollama`.
        wanted = row.get("source") == "gguf" or (not Path(model_id).is_absolute() and not row.get("source"))
        folder = Path(model_id).is_absolute() and not row.get("source") and not row.get("_details")
        if not is_demo_model(model_id) and (wanted or folder):
            if self._info_timer is not None:
                self._info_timer.stop()
            fetch = self._info if wanted else self._folder_fit
            self._info_timer = self.set_timer(INFO_DELAY_S, lambda: fetch(model_id))

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        """The details pane follows the tab: its highlighted model, or why the Ollama tab is empty."""
        if event.pane.id == "tab-ollama" and not self.query_one("#ollama-table", DataTable).row_count:
            self.query_one("#details", Static).update(self._ollama_empty or "Looking for Ollama's models…")
        elif self._current_table().row_count:
            self._highlighted(self._current_table())

    @on(DataTable.RowSelected)
    def _row_selected(self, _event: DataTable.RowSelected) -> None:
        self.action_use()

    @work(thread=True, exclusive=True, group="model-info", exit_on_error=False)
    def _info(self, model_id: str) -> None:
        try:
            details = self.desk.backend.model_info(model_id, self.desk.draft)
        except CommandFailed as err:
            details = {"error": err.message, "hint": err.hint}
        self.app.call_from_thread(self._details_loaded, model_id, details)

    @work(thread=True, exclusive=True, group="model-info", exit_on_error=False)
    def _folder_fit(self, model_id: str) -> None:
        """A model folder's size and fit: `models info` takes Hub ids only, so the folder showed no parameters
        and no fit at all; the memory plan reads its config.json."""
        try:
            plan = self.desk.backend.plan(self.desk.draft, model=model_id)
        except CommandFailed as err:
            details: dict[str, Any] = {"error": err.message, "hint": err.hint}
        except Exception as exc:  # noqa: BLE001 - a folder the planner cannot read: say so in the details pane
            details = {"error": f"could not estimate the memory of {model_id}: {exc}"}
        else:
            details = {"fit": plan, "params": plan.get("params")}
        self.app.call_from_thread(self._details_loaded, model_id, details)

    def _details_loaded(self, model_id: str, details: dict[str, Any]) -> None:
        if "error" not in details:
            self.rows[model_id] = {**self.rows.get(model_id, {}), **details, "_details": True}
            self._update_row_cells(model_id)
        if self.selected_id() == model_id:
            self._show_details(model_id, self.rows.get(model_id, {}), details.get("error"), details.get("hint"))

    def _update_row_cells(self, model_id: str) -> None:
        """The table row shows what `models info` found (a GGUF's parameters, size and fit arrive only there)."""
        row = self.rows.get(model_id, {})
        for table_id in ("find-table", "local-table"):
            table = self.query_one("#" + table_id, DataTable)
            try:
                index = table.get_row_index(model_id)
            except Exception:  # noqa: BLE001 - the model is not in this table
                continue
            cells = {1: params_text(row.get("params")), 3: fit_text(row.get("fit"))}
            if row.get("size_bytes"):
                cells[2] = format_bytes(row["size_bytes"])
            for column, value in cells.items():
                table.update_cell_at(Coordinate(index, column), value)

    def _show_details(self, model_id: str, row: dict[str, Any], error: str | None = None,
                      hint: str | None = None) -> None:
        lines = [f"[b]{escape(model_id)}[/b]" + (f"  [dim]{escape(str(row['model_page']))}[/]"
                                                if row.get("model_page") else "")]
        curated = row.get("curated") if isinstance(row.get("curated"), dict) else {}
        note = row.get("note") or curated.get("note")
        if note:
            lines.append(escape(str(note)))
        facts = []
        if row.get("params"):
            facts.append(f"{params_text(row['params'])} parameters")
        if row.get("source") in ("ollama", "gguf") and row.get("file_type"):
            where = " in Ollama's store" if row.get("source") == "ollama" else ""
            facts.append(f"{escape(str(row.get('file_type') or '?'))} GGUF{where}, "
                         f"{format_bytes(row.get('size_bytes'))}")
            facts.append("[green]imported[/]" if row.get("imported") else "imported once on first use")
        elif row.get("size_bytes"):
            facts.append(f"{format_bytes(row['size_bytes'])} to download")
        if row.get("license"):
            facts.append(f"license {escape(str(row['license']))}")
        if row.get("gated"):
            facts.append("[yellow]gated: accept the terms on the model page, then `hf auth login`[/]")
        if row.get("remote_code"):
            facts.append(f"[yellow]runs its own code ({escape(str(row['remote_code']))})[/]")
        cached = row.get("cached")
        if row.get("source"):
            pass  # a GGUF file or an Ollama model is on this machine: there is nothing to download
        elif isinstance(cached, dict):
            facts.append("[green]downloaded[/]" if cached.get("complete") else
                         f"[yellow]incomplete download: {escape(str(cached.get('problem')))}[/]")
        elif cached is True and not row.get("file_type"):
            facts.append("[green]on this machine[/]")
        elif row.get("_details"):
            facts.append("not downloaded yet: ctrl+d downloads it")
        if facts:
            lines.append(" · ".join(facts))
        if curated:
            lines.append(f"[dim]chat template {curated.get('chat_template')} · recommended max length "
                         f"{curated.get('max_length')}[/]")
        fit = row.get("fit")
        if isinstance(fit, dict) and fit:
            if fit.get("total_bytes") or fit.get("components"):
                lines.append(verdict_line(fit))
                parts = components(fit)
                if parts:
                    lines.append("[dim]" + " · ".join(f"{escape(n)} {format_bytes(b)}" for n, b in parts[:5]) + "[/]")
            elif fit.get("reason"):
                lines.append(f"fit: {escape(str(fit.get('verdict')))} ({escape(str(fit['reason']))})")
        if row.get("problem"):
            lines.append(f"[red]{escape(str(row['problem']))}[/]")
        if error:
            lines.append(f"[red]{escape(error)}[/]" + (f"\n[b]fix:[/] {escape(hint)}" if hint else ""))
        here = row.get("source") or Path(model_id).is_absolute() or is_demo_model(model_id)
        lines.append("[dim]enter uses this model[/]" if here else
                     "[dim]enter uses this model · ctrl+d downloads it[/]")
        self.query_one("#details", Static).update("\n".join(lines))

    # Choosing and downloading.
    def action_use(self) -> None:
        model_id = self.selected_id()
        if model_id is None:
            self.notify("No model highlighted.", severity="warning")
            return
        self._use(model_id)

    def _use(self, model_id: str) -> None:
        draft = self.desk.draft
        draft.model = model_id
        draft.data_checked = False
        if is_demo_model(model_id) and draft.strategy != DEMO_PRESET:
            draft.strategy = DEMO_PRESET
        elif not is_demo_model(model_id) and draft.strategy == DEMO_PRESET:
            draft.strategy = "qlora"
        self.desk.draft_updated()
        row = self.rows.get(model_id, {})
        cached = row.get("cached")
        if cached is False or (isinstance(cached, dict) and not cached.get("complete")):
            self.notify(f"Using {model_id}. It is not downloaded yet: ctrl+d downloads it.", severity="warning")
        else:
            self.notify(f"Using {model_id}. Next: your data (2).")
        self._fill_marks()

    def _fill_marks(self) -> None:
        for table_id in ("find-table", "local-table", "ollama-table"):
            table = self.query_one("#" + table_id, DataTable)
            cursor = table.cursor_row
            if table_id == "ollama-table":
                self._fill_ollama(getattr(self, "_ollama_result", {}))
            else:
                self._fill(table_id, self._lists.get(table_id, []))
            if table.row_count:
                table.move_cursor(row=min(cursor, table.row_count - 1))

    def action_next(self) -> None:
        self.desk.switch_mode("data")

    def action_download(self) -> None:
        model_id = self.selected_id()
        if model_id is None or is_demo_model(model_id) or Path(model_id).is_absolute() \
                or self.rows.get(model_id, {}).get("source"):
            self.notify("The demo model, local folders, GGUF files and Ollama models need no download.",
                        severity="warning")
            return
        if self.downloading:
            self.notify(f"Already downloading {self.downloading}.", severity="warning")
            return
        row = self.rows.get(model_id, {})
        if row.get("remote_code"):
            def answer(yes: bool | None) -> None:
                if yes:
                    self._start_download(model_id, trust=True)

            self.app.push_screen(Confirm(
                f"{model_id} runs its own Python code from the Hub when loaded. Only allow this if you trust its "
                "authors; the download is pinned to the commit shown. Download it?", yes="Trust and download",
                danger=True), answer)
            return
        self._start_download(model_id)

    def _start_download(self, model_id: str, trust: bool = False) -> None:
        self.downloading = model_id
        self._cancel.clear()
        self.query_one("#download-row").display = True
        self.query_one("#download-bar", ProgressBar).update(total=100, progress=0)
        self.query_one("#download-text", Static).update(f"starting {escape(model_id)}…  [dim]ctrl+x cancels[/]")
        self._download(model_id, trust)

    @work(thread=True, exclusive=True, group="download", exit_on_error=False)
    def _download(self, model_id: str, trust: bool) -> None:
        def on_event(event: dict[str, Any]) -> None:
            self.app.call_from_thread(self._download_event, event)

        try:
            result = self.desk.backend.download_model(model_id, on_event, self._cancel.is_set, trust)
        except CommandFailed as err:
            self.app.call_from_thread(self._download_done, model_id, None, err)
            return
        self.app.call_from_thread(self._download_done, model_id, result, None)

    def _download_event(self, event: dict[str, Any]) -> None:
        if event.get("type") != "download_progress":
            return
        total = event.get("bytes_total") or 0
        done = event.get("bytes_done") or 0
        self.query_one("#download-bar", ProgressBar).update(total=total or 100, progress=done)
        rate = event.get("rate_bytes_per_s")
        resumed = event.get("bytes_resumed") or 0
        self.query_one("#download-text", Static).update(
            f"{format_bytes(done)} / {format_bytes(total)}"
            + (f" ({format_bytes(resumed)} resumed)" if resumed else "")
            + f" · {format_bytes(rate) + '/s' if rate else '--/s'} · "
            f"ETA {format_duration(event.get('eta_s'))}  [dim]ctrl+x cancels[/]")

    def _download_done(self, model_id: str, result: dict[str, Any] | None, error: CommandFailed | None) -> None:
        self.downloading = None
        self.query_one("#download-row").display = False
        if self._cancel.is_set():
            self.notify(f"Download of {model_id} cancelled; starting it again resumes it.", severity="warning")
        elif error is not None:
            hint = f"\nfix: {error.hint}" if error.hint else ""
            self.notify(f"{error.message}{hint}", title="Download failed", severity="error", timeout=30)
        else:
            if result and result.get("pinned_revision"):
                self.desk.draft.overrides["model.trust_remote_code"] = "true"
                self.desk.draft.overrides["model.revision"] = str(result["pinned_revision"])
            self.rows.setdefault(model_id, {})["cached"] = True
            self.notify(f"{model_id} is downloaded.", title="Download complete")
            self._searched_for = None
            self.refresh_view()

    def action_cancel_download(self) -> None:
        if self.downloading:
            self._cancel.set()
