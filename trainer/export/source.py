"""What an export reads from a run folder: its config, the checkpoint asked for, the base model, the tokenizer
and the validation rows. It reads the layout `ft-desk train` writes (trainer/run_folder.py), nothing else, so an
export of a real run and of a test's hand-made run take the same path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft_desk.trainer import run_folder
from ft_desk.trainer.config import RunConfig
from ft_desk.trainer.errors import ModelError, UserError
from ft_desk.trainer.hub.resolve import resolve_model_dir
from ft_desk.trainer.run_folder import ADAPTER_WEIGHTS, FULL_WEIGHTS
from ft_desk.trainer.training.model import load_run_config, load_tokenizer

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


@dataclass(frozen=True)
class RunSource:
    """One run's checkpoint, ready to export."""

    run_dir: Path
    cfg: RunConfig
    state: dict[str, Any]
    checkpoint: str
    """best, last or a step number, as asked."""
    weights_dir: Path
    """Folder with the adapter (peft format) or, for method=full, the trained model.safetensors."""
    step: int | None
    base_dir: Path
    tokenizer_dir: Path
    val_path: Path | None
    trained_device: str
    """Device the run trained on (from state.json), so 4-bit weights can be recomputed on the same kind."""

    @property
    def method(self) -> str:
        return self.cfg.train.method

    @property
    def run_name(self) -> str:
        return self.run_dir.name

    def adapter_config(self) -> dict[str, Any]:
        return json.loads((self.weights_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))


def _step_of(folder: Path, state: dict[str, Any]) -> int | None:
    step = run_folder.step_of(folder)
    if step is not None:
        return step
    for key in ("best_step", "step"):
        if isinstance(state.get(key), int):
            return state[key]
    return None


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file() or (
        folder / "vocab.json").is_file()


def open_run(run_dir: Path, checkpoint: str = "best") -> RunSource:
    """Read a run folder; a missing or unusable piece is a UserError naming it."""
    run_dir = Path(run_dir).expanduser().absolute()
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder", hint="give a run folder; list them with: ft-desk runs")
    cfg = load_run_config(run_dir)
    state = run_folder.read_state(run_dir)
    if run_folder.judged_status(state, run_dir) == run_folder.RUNNING:
        raise UserError(f"run {run_dir.name} is still training (pid {state.get('pid')})",
                        hint="export it when it finishes, or stop it first (a stopped run exports its best "
                             "checkpoint, or any one with --checkpoint last / N)")
    weights_dir = None
    final = run_folder.final_weights_dir(run_dir, cfg.train.method)
    if cfg.train.method == "full" and checkpoint == "best" and (final / FULL_WEIGHTS).is_file():
        weights_dir = final
    if weights_dir is None:
        weights_dir = run_folder.checkpoint_folder(run_dir, checkpoint)
    if cfg.train.method == "full":
        if not (weights_dir / FULL_WEIGHTS).is_file():
            raise UserError(f"{weights_dir} has no {FULL_WEIGHTS}; the checkpoint is incomplete",
                            hint="export another checkpoint (--checkpoint last or a step number)")
    elif not ((weights_dir / ADAPTER_WEIGHTS).is_file() and (weights_dir / ADAPTER_CONFIG).is_file()):
        raise UserError(f"{weights_dir} has no {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}; the checkpoint is incomplete",
                        hint="export another checkpoint (--checkpoint last or a step number)")

    base_dir = None
    recorded = state.get("model_dir")
    if recorded and (Path(recorded) / "config.json").is_file():
        base_dir = Path(recorded)
    if base_dir is None:
        base_dir = resolve_model_dir(cfg.model)
    if not any(base_dir.glob("*.safetensors")):
        raise ModelError(f"{base_dir} has no safetensors weights; ft-desk exports only from safetensors models",
                         hint="download the base model again (ft-desk models download) or convert it to safetensors")

    tokenizer_dir = base_dir
    for candidate in (weights_dir, *run_folder.final_weight_dirs(run_dir)):
        if candidate.is_dir() and _has_tokenizer(candidate):
            tokenizer_dir = candidate
            break
    val_path = run_folder.val_path(run_dir)
    return RunSource(
        run_dir=run_dir, cfg=cfg, state=state, checkpoint=str(checkpoint), weights_dir=weights_dir,
        step=_step_of(weights_dir, state), base_dir=base_dir, tokenizer_dir=tokenizer_dir,
        val_path=val_path if val_path.is_file() else None,
        trained_device=str(state.get("device") or "cpu"),
    )


def base_shards(base_dir: Path) -> list[Path]:
    """The base model's safetensors files, in the order of its index (or the single file)."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        ordered: list[Path] = []
        for name in dict.fromkeys(weight_map.values()):
            ordered.append(base_dir / name)
        missing = [p.name for p in ordered if not p.is_file()]
        if missing:
            raise ModelError(f"{base_dir} is missing {missing[0]}; the download is incomplete",
                             hint="download the model again")
        return ordered
    single = base_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(base_dir.glob("*.safetensors"))
    if not found:
        raise ModelError(f"{base_dir} has no safetensors weights")
    return found


def load_run_tokenizer(source: RunSource):
    """The tokenizer the run trained with (saved next to its weights), chat template included, loaded the way
    training loads it."""
    return load_tokenizer(source.tokenizer_dir, source.cfg.model)


def read_val_rows(source: RunSource, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` validation rows of the run (chat rows or text rows)."""
    rows: list[dict[str, Any]] = []
    if source.val_path is None:
        return rows
    with open(source.val_path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
            if len(rows) >= limit:
                break
    return rows
