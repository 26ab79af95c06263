"""Finding and layering preset YAML files.

A preset is a YAML mapping of config sections (see config.py), optionally with a top-level `extends:` naming
other presets that are applied first. Presets are looked up by name in the user's preset folder (written by the
TUI's "Save as preset"), then in the presets shipped with ft-desk; a path to a .yaml file works too.
Stdlib + PyYAML only.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ft_desk.trainer.config import ConfigError, RunConfig, apply_overrides, build_config, merge_layer
from ft_desk.trainer.demo import DEMO_PRESET
from ft_desk.trainer.paths import config_home

DEFAULT_PRESET = DEMO_PRESET


def user_presets_dir() -> Path:
    return config_home() / "presets"


def shipped_presets_dir() -> Path:
    return Path(str(resources.files("ft_desk.presets")))


def _search_dirs() -> list[Path]:
    return [user_presets_dir(), shipped_presets_dir(), shipped_presets_dir() / "hardware"]


def available_presets() -> dict[str, Path]:
    """Preset name -> file, user presets shadowing shipped ones. models.yaml is a catalogue, not a preset."""
    found: dict[str, Path] = {}
    for folder in reversed(_search_dirs()):
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                if path.stem != "models":
                    found[path.stem] = path
    return found


def find_preset(name: str) -> Path:
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    known = available_presets()
    if name in known:
        return known[name]
    available = ", ".join(sorted(known))
    raise ConfigError(f"no preset named {name!r}; available: {available} (or give a path to a .yaml file)")


def read_preset(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read preset {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of sections, got {type(data).__name__}")
    return data


def _layers(name: str, seen: tuple[str, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    path = find_preset(name)
    if str(path) in seen:
        raise ConfigError(f"preset {name!r} extends itself through {' -> '.join(seen)}")
    data = dict(read_preset(path))
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    out: list[tuple[Path, dict[str, Any]]] = []
    for parent in parents:
        out.extend(_layers(str(parent), seen + (str(path),)))
    out.append((path, data))
    return out


def load_config(presets: list[str] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then each preset (with what it extends), then `--set` overrides: validated RunConfig."""
    raw: dict[str, dict[str, Any]] = {}
    for name in presets or [DEFAULT_PRESET]:
        for path, data in _layers(name):
            merge_layer(raw, data, str(path))
    apply_overrides(raw, overrides or [])
    return build_config(raw)


def save_preset(config: RunConfig, name: str, note: str = "") -> Path:
    """Write `config` as a preset the CLI can use (`--preset name`); refuses to overwrite an existing file."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ConfigError(f"preset name {name!r} must be a plain file name like my-recipe")
    folder = user_presets_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    if path.exists():
        raise ConfigError(f"preset {path} already exists; choose another name or delete that file first")
    header = f"# {note}\n" if note else "# Saved from ft-desk.\n"
    header += f"# Use it with: ft-desk train --preset {name}\n"
    path.write_text(header + yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    return path
