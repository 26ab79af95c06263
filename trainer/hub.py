"""Finding a base model on disk: the demo model, a local folder, or a snapshot in the Hugging Face cache."""

from __future__ import annotations

from pathlib import Path

from .config import ModelConfig
from .errors import ModelError


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """A local folder holding the model named by `cfg` (never touches the network)."""
    if cfg.name == "demo":
        from .demo import ensure_demo_model

        return ensure_demo_model()
    path = Path(cfg.name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json, so it is not a Hugging Face model folder")
        return path
    from huggingface_hub import snapshot_download  # heavy-ish import, only for hub ids

    try:
        return Path(snapshot_download(cfg.name, revision=cfg.revision, local_files_only=True))
    except Exception:
        raise ModelError(
            f"model {cfg.name!r} is not a folder and not in the local Hugging Face cache",
            hint=f"download it first: ft-desk models download {cfg.name}",
        ) from None
