"""Where ft-desk keeps things on disk. FT_DESK_HOME overrides the per-user folders (tests, portable installs)."""

from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    override = os.environ.get("FT_DESK_HOME")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_path

    return user_data_path("ft-desk")


def cache_home() -> Path:
    override = os.environ.get("FT_DESK_HOME")
    if override:
        return Path(override).expanduser() / "cache"
    from platformdirs import user_cache_path

    return user_cache_path("ft-desk")


def config_home() -> Path:
    """User settings and presets saved from the TUI."""
    override = os.environ.get("FT_DESK_HOME")
    if override:
        return Path(override).expanduser() / "config"
    from platformdirs import user_config_path

    return user_config_path("ft-desk")


def log_home() -> Path:
    """Log files of commands that have no run folder to log into (a traceback, when something breaks)."""
    override = os.environ.get("FT_DESK_HOME")
    if override:
        return Path(override).expanduser() / "logs"
    from platformdirs import user_log_path

    return user_log_path("ft-desk")


def runs_home(configured: str | None = None) -> Path:
    """The folder holding one sub-folder per run."""
    return Path(configured).expanduser() if configured else data_home() / "runs"
