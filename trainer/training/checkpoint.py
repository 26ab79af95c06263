"""Crash-safe checkpoints: safetensors + JSON only (ft-desk never writes or reads pickle of its own).

A checkpoint folder (RUN_DIR/checkpoints/step-NNNNNN, named and found by run_folder.py) holds the trainable weights
(peft adapter format, or model.safetensors for full fine-tuning), optimizer.safetensors (AdamW moments and step counts
by parameter name), rng.safetensors (torch generator states) and trainer_state.json (loop progress, optimizer hyper-
parameters, Python RNG state). It is written to a hidden temporary folder, flushed, then renamed, so a crash leaves
either the whole checkpoint or none. A checkpoint whose weights are not all finite is never written.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

from ft_desk.trainer.atomic import fsync_folder, fsync_tree
from ft_desk.trainer.config import RunConfig
from ft_desk.trainer.run_folder import checkpoint_folders, checkpoints_dir, step_folder
from ft_desk.trainer.training.loop import LoopState
from ft_desk.trainer.training.model import load_weights, save_weights

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
FORMAT = 1


def _param_names(model, optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def all_finite(model) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def save_checkpoint(run_dir: Path, model, optimizer, cfg: RunConfig, state: LoopState) -> Path:
    """Write the checkpoint for `state.step` atomically and return its folder."""
    import torch
    from safetensors.torch import save_file

    if not all_finite(model):
        raise RuntimeError("refusing to write a checkpoint with non-finite weights")
    final = step_folder(run_dir, state.step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(model, cfg, tmp)
    (tmp / "README.md").unlink(missing_ok=True)  # peft's model card template: noise in a checkpoint

    names = _param_names(model, optimizer)
    tensors: dict[str, Any] = {}
    opt_state = optimizer.state_dict()
    for index, name in enumerate(names):
        for key, value in opt_state["state"].get(index, {}).items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{name}::{key}"] = tensor.detach().contiguous().cpu()
    save_file(tensors, str(tmp / OPTIMIZER_FILE))

    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, str(tmp / RNG_FILE))

    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]]
    meta = {
        "format": FORMAT,
        "loop": state.to_dict(),
        "param_groups": groups,
        "param_names": names,
        "python_random": _py_random_state(),
    }
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    fsync_tree(tmp)
    if final.exists():  # a re-save of the same step (e.g. stop right after a periodic save)
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_folder(final.parent)
    return final


def _py_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def load_checkpoint(folder: Path, model, optimizer, cfg: RunConfig) -> LoopState:
    """Restore weights, optimizer, RNG states; returns the loop state to continue from."""
    import torch
    from safetensors.torch import load_file

    meta = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    load_weights(model, cfg, folder)

    names = _param_names(model, optimizer)
    if names != meta["param_names"]:
        raise RuntimeError(f"{folder}: the trainable parameters differ from the checkpoint's")
    device = next(model.parameters()).device
    saved = load_file(str(folder / OPTIMIZER_FILE), device=str(device))
    state: dict[int, dict[str, Any]] = {}
    for index, name in enumerate(names):
        entry = {key.split("::", 1)[1]: tensor for key, tensor in saved.items() if key.split("::", 1)[0] == name}
        if entry:
            if "step" in entry:
                entry["step"] = entry["step"].cpu()  # AdamW keeps step on CPU unless capturable/fused
            state[index] = entry
    groups = []
    offset = 0
    for group, saved_group in zip(optimizer.param_groups, meta["param_groups"]):
        n = len(group["params"])
        restored = dict(saved_group)
        if "betas" in restored:
            restored["betas"] = tuple(restored["betas"])
        restored["params"] = list(range(offset, offset + n))
        offset += n
        groups.append(restored)
    optimizer.load_state_dict({"state": state, "param_groups": groups})

    rng = load_file(str(folder / RNG_FILE))
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return LoopState.from_dict(meta["loop"])


def prune(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    """Delete old checkpoints, keeping the newest `keep_last` and the best one."""
    folders = checkpoint_folders(run_dir)
    keep = set(folders[-keep_last:])
    if best_step is not None:
        keep.add(step_folder(run_dir, best_step))
    for folder in folders:
        if folder not in keep:
            shutil.rmtree(folder, ignore_errors=True)
    for stale in checkpoints_dir(run_dir).glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (one with its trainer_state.json), where a resumed run continues."""
    folders = [f for f in checkpoint_folders(run_dir) if (f / STATE_FILE).is_file()]
    return folders[-1] if folders else None
