"""From a ModelConfig to a checked local folder: the demo model, a folder on disk, or a snapshot in the Hugging
Face cache. Never touches the network (downloading is `ft-desk models download`, hub/download.py); every folder it
returns has passed `check_model_folder`.
"""

from __future__ import annotations

from pathlib import Path

from ft_desk.trainer.config import ModelConfig
from ft_desk.trainer.demo import ensure_demo_model, is_demo_model
from ft_desk.trainer.errors import ModelError
from ft_desk.trainer.hub.cache import find_snapshot
from ft_desk.trainer.hub.folder_check import check_model_folder
from ft_desk.trainer.hub.names import is_repo_id


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """A local folder holding the model named by `cfg`, checked for safety and completeness (no network)."""
    if is_demo_model(cfg.name):
        return ensure_demo_model()
    path = Path(cfg.name).expanduser()
    if path.is_dir():
        check_model_folder(path, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
        return path
    if path.exists():
        raise ModelError(f"{path} is a file; model.name must be a model folder, a Hub id or `demo`")
    if not is_repo_id(cfg.name) or cfg.name.startswith((".", "~", "/")):
        raise ModelError(f"model folder {path} does not exist",
                         hint="check the path, or give a Hub id like Qwen/Qwen2.5-0.5B-Instruct")
    snapshot = find_snapshot(cfg.name, cfg.revision)
    if snapshot is None:
        at = f" at revision {cfg.revision}" if cfg.revision else ""
        pin = f" --revision {cfg.revision}" if cfg.revision else ""
        raise ModelError(
            f"model {cfg.name!r}{at} is not a folder and not in the local Hugging Face cache",
            hint=f"download it first: ft-desk models download {cfg.name}{pin}",
        )
    check_model_folder(snapshot, name=cfg.name, trust_remote_code=cfg.trust_remote_code,
                       allow_pickle=cfg.allow_pickle, pinned_revision=cfg.revision, hub_model=True)
    return snapshot

