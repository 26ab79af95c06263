"""Crash-safe checkpoints: safetensors + JSON only (ft-desk never writes or reads pickle of its own).

A checkpoint folder (RUN_DIR/checkpoints/step-NNNNNN, named and found by run_folder.py) holds the trainable weights
(peft adapter format, or model.safetensors for full fine-tuning), optimizer.safetensors (AdamW moments and step counts
by parameter name), rng.safetensors (torch generator states) and trainer_state.json (loop progress, optimizer hyper-
parameters, Python RNG state, the size and SHA-256 of every other file, and the run's identity: its config, a hash
of the tokenized data and a fingerprint of the base model). It is written to a hidden temporary folder, flushed, then
renamed, so a crash leaves either the whole checkpoint or none. A checkpoint whose weights are not all finite is
never written; one that cannot be written for lack of disk space leaves no partial folder and says how much room it
needs (`DiskFull`).

Resuming (`resume_point`) trusts nothing on disk: each checkpoint, newest first, is checked (trainer_state.json
readable and complete, every file present with its recorded size and hash or, for older checkpoints, a sound
safetensors layout) and a damaged one is moved aside (`.damaged-step-NNNNNN`) so the run falls back to the newest
good one. A good checkpoint made with other settings, other data or another base model stops the resume with the
list of differences, because continuing would silently train something else.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ft_desk.trainer.atomic import fsync_folder, fsync_tree
from ft_desk.trainer.config import RunConfig
from ft_desk.trainer.errors import DiskFull, UserError, is_disk_full
from ft_desk.trainer.events import format_bytes
from ft_desk.trainer.run_folder import (
    ADAPTER_WEIGHTS,
    FULL_WEIGHTS,
    checkpoint_folders,
    checkpoints_dir,
    step_folder,
    step_of,
)
from ft_desk.trainer.training.loop import LoopState
from ft_desk.trainer.training.model import load_weights, save_weights

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
FORMAT = 1
DAMAGED_PREFIX = ".damaged-"

IDENTITY_FREE = ("train.device", "train.threads", "train.log_every", "eval.sample_prompts", "eval.max_new_tokens",
                 "output.runs_dir", "output.run_name", "output.save_every", "output.keep_last")
"""Settings a resumed run may differ in from its checkpoint: where and how often it reports and saves, not what it
trains. Any other difference stops the resume."""
# Note: the first and last bytes of each base weights file are hashed (not all of it: a 7B model is 14 GB).
MODEL_SAMPLE_BYTES = 1 << 20


def weights_file(cfg: RunConfig) -> str:
    return FULL_WEIGHTS if cfg.train.method == "full" else ADAPTER_WEIGHTS


def _param_names(model, optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def all_finite(model) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def estimate_bytes(model, optimizer=None) -> int:
    """Disk space one checkpoint takes: the trainable weights, their optimizer state (AdamW: two fp32 moments per
    weight when none exists yet) and a little for JSON and the RNG states."""
    import torch

    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = 0
    if optimizer is not None:
        for entry in optimizer.state.values():
            state += sum(v.numel() * v.element_size() for v in entry.values() if torch.is_tensor(v))
    if not state:
        state = 8 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weights + state + (1 << 20)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(run_dir: Path, model, optimizer, cfg: RunConfig, state: LoopState,
                    identity: dict[str, Any] | None = None, batch_split: int = 1) -> Path:
    """Write the checkpoint for `state.step` atomically and return its folder. Out of disk space, the partial
    folder is removed and `DiskFull` says how much the checkpoint needs; the earlier checkpoints are untouched."""
    if not all_finite(model):
        raise RuntimeError("refusing to write a checkpoint with non-finite weights")
    final = step_folder(run_dir, state.step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    try:
        _write_checkpoint(tmp, model, optimizer, cfg, state, identity, batch_split)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full(run_dir, state.step, estimate_bytes(model, optimizer)) from None
        raise
    if final.exists():  # a re-save of the same step (e.g. stop right after a periodic save)
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_folder(final.parent)
    return final


def _write_checkpoint(tmp: Path, model, optimizer, cfg: RunConfig, state: LoopState,
                      identity: dict[str, Any] | None, batch_split: int) -> None:
    import torch  # heavy imports
    from safetensors.torch import save_file

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
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(tmp.iterdir()) if p.is_file()}
    meta = {
        "format": FORMAT,
        "loop": state.to_dict(),
        "param_groups": groups,
        "param_names": names,
        "python_random": _py_random_state(),
        "files": files,
        "batch_split": int(batch_split),
        "identity": identity,
    }
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    fsync_tree(tmp)


def disk_full(run_dir: Path, step: int, needed: int) -> DiskFull:
    """The sentence for a checkpoint that did not fit: what it needs, what is free, what is still there."""
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        free = None
    have = f" and {format_bytes(free)} is free" if free is not None else ""
    good = [s for s in (step_of(f) for f in checkpoint_folders(run_dir)) if s is not None and s != step]
    kept = f"the checkpoint at step {good[-1]} is intact" if good else "no earlier checkpoint was lost"
    short = f"free at least {format_bytes(needed - free)} " if free is not None and needed > free else "free space "
    return DiskFull(
        f"the disk is full: the checkpoint at step {step} needs about {format_bytes(needed)}{have} in {run_dir}; "
        f"its partial files were removed and {kept}",
        hint=f"{short}(or move the run folder to a larger disk), then resume with: ft-desk train --resume {run_dir}",
    )


def _py_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


# ------------------------------------------------------------------ what a checkpoint is made of

def read_meta(folder: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint; a UserError naming what is wrong when it is missing or unusable."""
    path = folder / STATE_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{STATE_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{STATE_FILE} is not readable JSON ({str(exc).splitlines()[0][:80]})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{STATE_FILE} does not hold a checkpoint's state")
    if meta.get("format") != FORMAT:
        raise UserError(f"{STATE_FILE} has format {meta.get('format')!r}, this ft-desk reads format {FORMAT}")
    loop = meta.get("loop")
    for key, kind in (("loop", dict), ("param_groups", list), ("param_names", list), ("python_random", list)):
        if not isinstance(meta.get(key), kind):
            raise UserError(f"{STATE_FILE} has no usable {key!r}")
    for key in ("step", "micro_index"):
        value = loop.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{STATE_FILE} has no usable loop {key!r} (got {value!r})")
    if step_of(folder) is not None and loop["step"] != step_of(folder):
        raise UserError(f"{STATE_FILE} is for step {loop['step']}, not step {step_of(folder)}")
    if len(meta["python_random"]) != 3:
        raise UserError(f"{STATE_FILE} has no usable 'python_random'")
    return meta


def safetensors_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's header, after checking the file is as long as the
    header says (a truncated or overwritten file is a UserError naming it). Reads only the header."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UserError(f"{name} is truncated ({size} bytes)")
            (length,) = struct.unpack("<Q", raw)
            if length > min(size - 8, 100 << 20):
                raise UserError(f"{name} is truncated or not a safetensors file")
            header = json.loads(f.read(length).decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{name} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError):
        raise UserError(f"{name} is not a readable safetensors file") from None
    if not isinstance(header, dict):
        raise UserError(f"{name} is not a readable safetensors file")
    end = 0
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    try:
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            start, stop = entry["data_offsets"]
            end = max(end, int(stop))
            layout[key] = (str(entry["dtype"]), tuple(int(n) for n in entry["shape"]))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{name} has a damaged header") from None
    if size != 8 + length + end:
        raise UserError(f"{name} is truncated ({format_bytes(size)} of {format_bytes(8 + length + end)})"
                        if size < 8 + length + end else f"{name} has {size - 8 - length - end} stray bytes")
    return layout


def check_checkpoint(folder: Path, cfg: RunConfig) -> str | None:
    """Why `folder` cannot be resumed from (one phrase), or None when every file is whole. Files listed in
    trainer_state.json are checked against their recorded size and SHA-256; otherwise by their layout."""
    try:
        meta = read_meta(folder)
        recorded = meta.get("files")
        needed = (weights_file(cfg), OPTIMIZER_FILE, RNG_FILE)
        for name in needed:
            safetensors_layout(folder / name)
        if isinstance(recorded, dict):
            for name, facts in recorded.items():
                path = folder / name
                if not path.is_file():
                    return f"{name} is missing"
                if not isinstance(facts, dict) or path.stat().st_size != facts.get("bytes"):
                    return f"{name} has {format_bytes(path.stat().st_size)}, it was written with " \
                           f"{format_bytes(facts.get('bytes') if isinstance(facts, dict) else None)}"
                if _sha256(path) != facts.get("sha256"):
                    return f"{name} has changed since it was written (its SHA-256 differs)"
    except UserError as exc:
        return exc.message
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    return None


# ------------------------------------------------------------------ the run's identity

def data_fingerprint(train: Sequence, val: Sequence) -> str:
    """SHA-256 of the tokenized training and validation examples (ids and loss labels): a changed data file, a
    changed tokenizer or changed data settings all show up here."""
    from array import array

    digest = hashlib.sha256()
    for part, examples in (("train", train), ("val", val)):
        digest.update(f"{part}:{len(examples)}".encode())
        for example in examples:
            digest.update(array("q", example.input_ids).tobytes())
            digest.update(b"|")
            digest.update(array("q", example.labels).tobytes())
            digest.update(b";")
    return digest.hexdigest()


def model_fingerprint(model_dir: str | Path | None) -> str | None:
    """A fingerprint of the base model's folder: config.json, and for each safetensors file its name, size,
    header and first and last MiB of data. None when there is no folder to look at."""
    if not model_dir:
        return None
    folder = Path(model_dir)
    digest = hashlib.sha256()
    try:
        config = folder / "config.json"
        if config.is_file():
            digest.update(config.read_bytes())
        for path in sorted(folder.glob("*.safetensors")):
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as f:
                digest.update(f.read(MODEL_SAMPLE_BYTES))
                f.seek(max(0, size - MODEL_SAMPLE_BYTES))
                digest.update(f.read(MODEL_SAMPLE_BYTES))
    except OSError:
        return None
    return digest.hexdigest()


def run_identity(cfg: RunConfig, train: Sequence, val: Sequence, model_dir: str | Path | None) -> dict[str, Any]:
    """What a checkpoint must have been trained with for a resume to continue it."""
    return {"config": cfg.to_dict(), "data_sha256": data_fingerprint(train, val), "model_dir": str(model_dir or ""),
            "model_sha256": model_fingerprint(model_dir)}


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.items() if isinstance(values, dict)
            for key, value in values.items()}


def identity_differences(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """How the run now differs from what the checkpoint was trained with, one phrase each (empty: the same)."""
    if not isinstance(saved, dict):
        return []  # a checkpoint from before identities were recorded: its tensor shapes are still checked
    out = []
    before, after = _flat(saved.get("config") or {}), _flat(now.get("config") or {})
    for key in sorted(set(before) | set(after)):
        if key in IDENTITY_FREE or before.get(key) == after.get(key):
            continue
        if key not in before and before:  # a setting added after this checkpoint; its run config gives the value
            continue
        out.append(f"{key} was {before.get(key)!r}, now {after.get(key)!r}")
    if saved.get("data_sha256") and saved.get("data_sha256") != now.get("data_sha256"):
        out.append("the training or validation data changed (its tokens differ from the ones trained on)")
    if saved.get("model_sha256") and now.get("model_sha256") and saved["model_sha256"] != now["model_sha256"]:
        where = saved.get("model_dir")
        moved = f" ({where} then, {now.get('model_dir')} now)" if where and where != now.get("model_dir") else ""
        out.append(f"the base model's files changed{moved}")
    return out


def shape_differences(folder: Path, model, cfg: RunConfig) -> list[str]:
    """Tensors whose shape in the checkpoint differs from the model's (e.g. another LoRA rank)."""
    from ft_desk.trainer.training.model import trainable_state

    saved = safetensors_layout(folder / weights_file(cfg))
    current = {name: tuple(t.shape) for name, t in trainable_state(model, cfg).items()}
    out = []
    for name, (_, shape) in saved.items():
        if name in current and current[name] != shape:
            out.append(f"{name} is {'x'.join(map(str, shape))} in the checkpoint, "
                       f"{'x'.join(map(str, current[name]))} now")
    return out


# ------------------------------------------------------------------ loading

def load_checkpoint(folder: Path, model, optimizer, cfg: RunConfig) -> LoopState:
    """Restore weights, optimizer, RNG states; returns the loop state to continue from."""
    import torch
    from safetensors.torch import load_file

    meta = read_meta(folder)
    load_weights(model, cfg, folder)

    names = _param_names(model, optimizer)
    if names != meta["param_names"]:
        raise UserError(f"{folder}: the trainable parameters differ from the checkpoint's")
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


@dataclass
class ResumePoint:
    """Where a resumed run continues: the checkpoint loaded (None: step 0), and the ones passed over and why."""

    folder: Path | None
    state: LoopState
    batch_split: int = 1
    """How many pieces each scheduled micro-batch was cut into when the checkpoint was written (see replan.py)."""
    rejected: list[tuple[Path, str, Path | None]] = field(default_factory=list)
    """(checkpoint, why it was passed over, where it was moved aside)."""


def set_aside(folder: Path) -> Path | None:
    """Move a damaged checkpoint out of the way (hidden, never listed or resumed); None if it cannot be moved."""
    target = folder.with_name(f"{DAMAGED_PREFIX}{folder.name}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{DAMAGED_PREFIX}{folder.name}-{n}")
    try:
        folder.rename(target)
    except OSError:
        return None
    return target


def resume_point(run_dir: Path, model, optimizer, cfg: RunConfig, identity: dict[str, Any]) -> ResumePoint:
    """Load the newest good checkpoint of `run_dir` into `model` and `optimizer`.

    Damaged checkpoints (see `check_checkpoint`, or one that fails to load) are moved aside and the next older one
    is tried. A good checkpoint trained with other settings, data or base model raises a UserError listing the
    differences. When every checkpoint is damaged, a UserError lists them: the run never silently starts over.
    """
    folders = checkpoint_folders(run_dir)
    rejected: list[tuple[Path, str, Path | None]] = []
    for folder in reversed(folders):
        problem = check_checkpoint(folder, cfg)
        if problem is None:
            meta = read_meta(folder)
            changes = identity_differences(meta.get("identity"), identity) or shape_differences(folder, model, cfg)
            if changes:
                raise UserError(
                    f"cannot resume {run_dir}: its checkpoint at step {step_of(folder)} was trained differently: "
                    + "; ".join(changes),
                    hint="put the run's config.json, data and base model back as they were, or start a new run "
                         "with the new settings (ft-desk train ...)",
                )
            try:
                state = load_checkpoint(folder, model, optimizer, cfg)
            except Exception as exc:  # noqa: BLE001 - any failure to load means this checkpoint cannot be used
                first = (str(exc).splitlines() or [""])[0][:120]
                problem = f"it does not load ({type(exc).__name__}: {first})"
            else:
                split = meta.get("batch_split")
                split = split if isinstance(split, int) and split >= 1 else 1
                return ResumePoint(folder=folder, state=state, batch_split=split, rejected=rejected)
        rejected.append((folder, problem, set_aside(folder)))
    if rejected:
        listed = "; ".join(f"{f.name}: {why}" for f, why, _ in rejected)
        raise UserError(
            f"cannot resume {run_dir}: none of its {len(rejected)} checkpoint(s) is usable ({listed})",
            hint="the damaged ones were moved aside as checkpoints/.damaged-*; resume again to retrain this run "
                 "from step 0, or start a new run",
        )
    return ResumePoint(folder=None, state=LoopState())


def prune(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    """Delete old checkpoints, keeping the newest `keep_last` and the best one; and staging or damaged folders,
    now that a newer good checkpoint exists."""
    folders = checkpoint_folders(run_dir)
    keep = set(folders[-keep_last:])
    if best_step is not None:
        keep.add(step_folder(run_dir, best_step))
    for folder in folders:
        if folder not in keep:
            shutil.rmtree(folder, ignore_errors=True)
    for pattern in (".tmp-*", f"{DAMAGED_PREFIX}*"):
        for stale in checkpoints_dir(run_dir).glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (one with its trainer_state.json)."""
    folders = [f for f in checkpoint_folders(run_dir) if (f / STATE_FILE).is_file()]
    return folders[-1] if folders else None
