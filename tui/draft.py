"""The run being put together on the wizard screens (model, data, recipe) and the command line it becomes.

A `Draft` is plain mutable data owned by the app: the steps write into it, and `config()` turns it into a
validated `RunConfig` exactly the way `ft-desk train` will (same presets, same `--set` overrides), so what the
Recipe screen shows and what the child process runs cannot drift apart. `to_dict()` / `from_saved()` keep it
across restarts of the app. Light imports only (no torch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft_desk.trainer.columns import ColumnsError, columns_line, parse_columns
from ft_desk.trainer.config import ConfigError, RunConfig
from ft_desk.trainer.demo import DEMO_DATA_NAME, DEMO_MODEL_NAME, DEMO_PRESET, is_demo_data
from ft_desk.trainer.presets import load_config

# The strategy presets offered on the Recipe screen, in the order shown; user presets are added after these.
STRATEGIES = ("qlora", "lora", "full", "instruction", "few-shot", "demo")
HARDWARE = ("cpu", "gpu-8gb", "gpu-24gb", "mac-16gb")


@dataclass
class Draft:
    """What the user has chosen so far. Empty strings mean "not chosen yet"."""

    model: str = ""
    """Base model: a Hub id, a local folder, a .gguf file, an Ollama model (`name:tag`) or `demo`."""
    train_file: str = ""
    """Training data file, or `demo` for the bundled sample."""
    strategy: str = "qlora"
    """Strategy preset name (qlora, lora, full, instruction, few-shot, demo, or a saved preset)."""
    hardware: str = ""
    """Hardware preset layered after the strategy ("" for none)."""
    overrides: dict[str, str] = field(default_factory=dict)
    """Dotted key -> value typed by the user, exactly as `--set key=value` would receive it."""
    data_checked: bool = False
    """The Data step ran the lint report on train_file without errors."""

    def to_dict(self) -> dict[str, Any]:
        """What is saved between sessions; the data check is kept only while the file is unchanged."""
        return {"model": self.model, "train_file": self.train_file, "strategy": self.strategy,
                "hardware": self.hardware, "overrides": dict(self.overrides), "data_checked": self.data_checked,
                "data_stamp": file_stamp(self.train_file)}

    @classmethod
    def from_saved(cls, saved: Any) -> "Draft | None":
        """The draft saved by `to_dict()`, or None when there is none or it is not one of ours."""
        if not isinstance(saved, dict):
            return None
        texts = {key: saved.get(key, default) for key, default in
                 (("model", ""), ("train_file", ""), ("strategy", "qlora"), ("hardware", ""))}
        overrides = saved.get("overrides") or {}
        if not all(isinstance(v, str) for v in texts.values()) or not isinstance(overrides, dict):
            return None
        draft = cls(**texts, overrides={str(k): str(v) for k, v in overrides.items()})
        draft.data_checked = (saved.get("data_checked") is True and bool(draft.train_file)
                              and saved.get("data_stamp") == file_stamp(draft.train_file))
        return draft

    def presets(self) -> list[str]:
        return [self.strategy] + ([self.hardware] if self.hardware else [])

    def set_args(self) -> list[str]:
        """The `--set` values: model and data first, then the recipe overrides in a stable order."""
        out = []
        if self.model:
            out.append(f"model.name={self.model}")
        if self.train_file:
            out.append(f"data.train_file={self.train_file}")
        out.extend(f"{k}={v}" for k, v in sorted(self.overrides.items()))
        return out

    def config(self) -> RunConfig:
        """The validated config `ft-desk train` would build; raises ConfigError with the readable message."""
        return load_config(self.presets(), self.set_args())

    def config_for(self, model: str) -> RunConfig:
        """The config with another base model (planning a model before choosing it)."""
        args = [a for a in self.set_args() if not a.startswith("model.name=")]
        return load_config(self.presets(), [f"model.name={model}", *args])

    def base_config(self) -> RunConfig:
        """The config without the user's recipe overrides (what the presets alone give)."""
        model_data = [a for a in self.set_args() if a.startswith(("model.name=", "data.train_file="))]
        return load_config(self.presets(), model_data)

    def valid_file_problem(self) -> str | None:
        """Why the separate validation file (data.valid_file) cannot be read, or None (none set, or it is there)."""
        path = self.overrides.get("data.valid_file", "").strip()
        if not path or Path(path).expanduser().is_file():
            return None
        return f"the validation file {path} does not exist"

    def plan_key(self) -> tuple:
        """What a memory plan depends on: a plan made for another key is out of date."""
        return (self.model, tuple(self.presets()), tuple(sorted(self.overrides.items())))

    def error(self) -> str | None:
        try:
            self.config()
        except ConfigError as err:
            return str(err)
        return None

    def cli_args(self) -> list[str]:
        """Arguments after `ft-desk train` (without the event flag)."""
        args: list[str] = []
        for name in self.presets():
            args += ["--preset", name]
        for item in self.set_args():
            args += ["--set", item]
        return args

    def command_line(self) -> str:
        """The equivalent headless command, for the user to copy."""
        import shlex

        return "ft-desk train " + " ".join(shlex.quote(a) for a in self.cli_args())

    def set_override(self, key: str, value: str) -> None:
        """Record a recipe value; a value equal to what the presets give removes the override."""
        value = value.strip()
        try:
            preset_value = _dotted(self.base_config(), key)
        except ConfigError:
            preset_value = None
        if value == "" or same_value(value, format_value(preset_value)):
            self.overrides.pop(key, None)
        else:
            self.overrides[key] = value

    def columns(self) -> dict[str, str]:
        """The column mapping (role -> column) the run will use: data.columns as typed or from the presets."""
        try:
            return parse_columns(self.value("data.columns"))
        except ColumnsError:
            return {}

    def set_columns(self, mapping: dict[str, str]) -> None:
        """Write a column mapping into the draft as `data.columns` (an empty one removes the override)."""
        self.set_override("data.columns", columns_line(parse_columns(mapping)))

    def value(self, key: str) -> str:
        """What a recipe field shows: the user's text if they typed one, else the preset value."""
        if key in self.overrides:
            return self.overrides[key]
        try:
            return format_value(_dotted(self.base_config(), key))
        except ConfigError:
            return ""

    def ready(self) -> dict[str, bool]:
        """Which wizard steps are complete (the sidebar shows a check mark)."""
        return {
            "model": bool(self.model),
            "data": bool(self.train_file) and self.data_checked and self.valid_file_problem() is None,
            "recipe": bool(self.model and self.train_file) and self.error() is None,
        }


def file_stamp(path: str) -> list[int] | str | None:
    """Size and modification time of a data file, to tell whether it changed since it was checked."""
    if not path or is_demo_data(path):
        return path or None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def _dotted(config: RunConfig, key: str):
    section, name = key.split(".", 1)
    return getattr(getattr(config, section), name)


def format_value(value) -> str:
    """A config value as the user would type it on the command line."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, float):
        if value and abs(value) < 1e-3:  # learning rates read as 2e-4, not 0.0002
            mantissa, exponent = f"{value:e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:g}"
    return str(value)


def same_value(typed: str, shown: str) -> bool:
    """Whether two field texts mean the same value (`1.0` and `1`, `2e-4` and `0.0002`)."""
    if typed.strip() == shown.strip():
        return True
    try:
        return float(typed) == float(shown)
    except ValueError:
        return False


def demo_draft() -> Draft:
    """The one-key demo: the tiny local model on the bundled data with the demo recipe."""
    return Draft(model=DEMO_MODEL_NAME, train_file=DEMO_DATA_NAME, strategy=DEMO_PRESET, data_checked=True)
