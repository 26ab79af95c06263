"""Choosing a data file: completion of typed paths, and a directory tree for browsing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.suggester import Suggester
from textual.widgets import DirectoryTree, Label, Static

from ft_desk.trainer.demo import is_demo_data

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".jsonl.gz", ".json.gz", ".csv.gz")
# A Hugging Face `save_to_disk` folder is chosen by choosing one of these files in it (the folder is the data).
DATASET_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")


def is_data_name(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(DATA_SUFFIXES)


class PathSuggester(Suggester):
    """Completes the last part of a typed path from the file system (folders get a trailing slash)."""

    def __init__(self) -> None:
        super().__init__(use_cache=False, case_sensitive=True)

    async def get_suggestion(self, value: str) -> str | None:
        if not value or is_demo_data(value):
            return None
        expanded = os.path.expanduser(value)
        folder, prefix = os.path.split(expanded)
        try:
            names = sorted(os.listdir(folder or "."))
        except OSError:
            return None
        for name in names:
            if name.startswith(prefix) and name != prefix and not name.startswith("."):
                full = os.path.join(folder, name)
                completed = value + name[len(prefix):]
                return completed + "/" if os.path.isdir(full) else completed
        return None


class DataTree(DirectoryTree):
    """Folders and data files only; hidden entries left out."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".")
                and (p.is_dir() or is_data_name(p.name))]


class FilePicker(ModalScreen["Path | None"]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("backspace", "up", "Parent folder")]

    def __init__(self, start: Path) -> None:
        super().__init__(classes="dialog-screen")
        self.start = start if start.is_dir() else Path.cwd()

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog picker-dialog"):
            yield Label("Choose a training file (.jsonl, .json, .csv, .parquet, .arrow, also .gz; state.json picks "
                        "a save_to_disk folder)", classes="dialog-title")
            yield Static(str(self.start), id="picker-path")
            yield DataTree(self.start, id="picker-tree")
            yield Static("[dim]enter opens / chooses · backspace goes up · escape cancels[/]")

    def on_mount(self) -> None:
        self.query_one(DataTree).focus()

    def action_up(self) -> None:
        tree = self.query_one(DataTree)
        parent = Path(tree.path).parent
        tree.path = parent
        self.query_one("#picker-path", Static).update(str(parent))

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        path = Path(event.path)
        self.dismiss(path.parent if path.name in DATASET_MARKERS else path)
