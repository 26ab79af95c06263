"""Will this run fit? The RunConfig side of the memory planner, shared by `ft-desk plan`, `ft-desk doctor`, the
model search's fit column and the TUI's live estimate.

quant.planner is arithmetic on plain data and knows nothing of RunConfig, files or the Hub. This module:
  - resolves a RunConfig and the device into quant.planner.PlanInputs, with the dtypes `ft-desk train` picks,
  - reads the model's config.json (a folder, the demo model, the Hugging Face cache, or fetched from the Hub
    when online; `local_model_config` never leaves the disk); for a GGUF file or an Ollama model, the sizes in
    its GGUF header (or the config.json of its import, once imported), so a plan needs no conversion,
  - and lists the settings that lower the peak as RunConfig overrides (`--set key=value`), each judged by the
    planner, so a suggestion's overrides given to `ft-desk train` reproduce the promised estimate.
No torch import: a plan answers in milliseconds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

from ft_desk.quant.device import TRAINING_CAPS_CPU_ALLOCATOR, DeviceFacts, choose_compute_dtype
from ft_desk.quant.planner import (
    FITS_SHARE,
    MemoryPlan,
    ModelShape,
    PlanInputs,
    Suggestion,
    model_shape,
    peak_bytes,
    plan_memory,
)
from ft_desk.trainer.config import RunConfig
from ft_desk.trainer.config import replace as replace_config
from ft_desk.trainer.demo import demo_cache_dir, ensure_demo_model, is_demo_model
from ft_desk.trainer.errors import ModelError, UserError
from ft_desk.trainer.hub.cache import find_snapshot
from ft_desk.trainer.hub.gguf_file import read_gguf
from ft_desk.trainer.hub.names import is_repo_id
from ft_desk.trainer.hub.resolve import gguf_source, imported_dir
from ft_desk.trainer.recipe_sizing import provisional, row_length
from ft_desk.trainer.training.saved_activations import saved_activations_dtype


def plan_inputs(run: RunConfig, device: DeviceFacts | None, cpu_allocator_capped: bool | None = None) -> PlanInputs:
    """What the planner needs from `run` on `device`. The dtypes mirror trainer.training.model's choice: compute
    from the device, fp32 weights for full fine-tuning. With no device (not on this machine), train.device is
    planned as a current one (a bf16 GPU for auto). `cpu_allocator_capped` defaults to what `ft-desk train` does
    (quant.device.TRAINING_CAPS_CPU_ALLOCATOR)."""
    if device is None:
        kind = run.train.device if run.train.device != "auto" else "cuda"
        device = DeviceFacts(type=kind, bf16=kind != "cpu")
    run = provisional(run, device.type)  # `auto` batching, before the data is known: an upper bound
    method = run.train.method
    requested = run.quant.compute_dtype if method == "qlora" else run.model.dtype
    compute = choose_compute_dtype(device, requested)
    if method == "full":
        weights = "float32"
    else:
        weights = compute if run.model.dtype == "auto" else run.model.dtype
    if method == "lora" and device.type == "cpu" and run.model.dtype == "auto":
        weights = compute
    return PlanInputs(
        device=device.type,
        method=method,
        compute_dtype=compute,
        weights_dtype=weights,
        micro_batch_size=run.train.micro_batch_size,
        max_length=row_length(run),
        grad_accum=run.train.grad_accum,
        gradient_checkpointing=run.train.gradient_checkpointing,
        packing=run.train.packing,
        loss_chunk_tokens=run.train.loss_chunk_tokens,
        lora_r=run.lora.r,
        target_modules=tuple(run.lora.target_modules),
        lora_dropout=run.lora.dropout,
        use_dora=run.lora.use_dora,
        double_quant=run.quant.double_quant,
        cpu_allocator_capped=TRAINING_CAPS_CPU_ALLOCATOR if cpu_allocator_capped is None else cpu_allocator_capped,
        saved_activations=saved_activations_dtype(run.train.saved_activations, compute),
        sample_prompts=run.eval.sample_prompts if run.data.valid_file or run.data.val_fraction > 0 else 0,
        max_new_tokens=run.eval.max_new_tokens,
        available_memory=device.free_memory,
    )


def plan_run(model_config: dict, run: RunConfig, device: DeviceFacts | None, four_bit_ok: bool = True,
             model_name: str | None = None, cpu_allocator_capped: bool | None = None) -> MemoryPlan:
    """Predicted peak memory of `run` on `device` (None: unknown device, no verdict) for the model described by
    `model_config` (its parsed config.json), with the changes that lower it unless it already fits.
    `four_bit_ok=False` keeps QLoRA out of the suggestions."""
    kind = device.type if device is not None else (run.train.device if run.train.device != "auto" else "cuda")
    context = model_config.get("max_position_embeddings")
    run = provisional(run, kind, context if isinstance(context, int) else None)
    shape = model_shape(model_config, model_name or run.model.name)
    plan = plan_memory(shape, plan_inputs(run, device, cpu_allocator_capped), device)
    if plan.verdict == "fits":
        return plan
    suggestions = _suggest(run, shape, device, plan.device_budget_bytes, plan.total_bytes, four_bit_ok,
                           cpu_allocator_capped)
    return dataclasses.replace(plan, suggestions=suggestions)


def four_bit_likely(device_type: str) -> bool:
    """Whether QLoRA can be suggested without running the 4-bit check (ft-desk doctor runs it). On an Apple GPU
    that takes a bitsandbytes with an MPS backend (0.48+); the probe at run start has the last word."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    return device_type != "mps" or bitsandbytes_has_mps_backend()


def bitsandbytes_has_mps_backend() -> bool:
    """Whether the installed bitsandbytes ships an MPS backend, read from its file list (nothing is imported)."""
    from importlib import metadata

    try:
        files = metadata.files("bitsandbytes") or []
    except metadata.PackageNotFoundError:
        return False
    return any(str(f).replace("\\", "/").endswith("backends/mps/ops.py") for f in files)


def device_from_report(report: dict[str, Any]) -> DeviceFacts | None:
    """DeviceFacts from the `facts` of an `ft-desk doctor --json` report, or None when it has none."""
    facts = dict(report.get("facts") or {})
    if not facts.get("type"):
        return None
    if facts.get("compute_capability") is not None:
        facts["compute_capability"] = tuple(facts["compute_capability"])
    known = {k: facts[k] for k in ("type", "name", "total_memory", "free_memory", "compute_capability", "bf16",
                                   "unified_memory", "high_watermark_ratio") if k in facts}
    return DeviceFacts(**known)


# ---------------------------------------------------------------------------------------------------------------
# Suggestions: settings that lower the peak, as RunConfig overrides

# Settings `ft-desk train` may change on its own when the plan does not fit: each keeps what training computes
# (the same effective batch, the same loss), so only speed changes.
SAME_RESULT_KEYS = frozenset({"train.gradient_checkpointing", "train.micro_batch_size", "train.grad_accum",
                              "train.loss_chunk_tokens"})

# Note: a change that saves less than this share of the total is not worth suggesting.
MIN_SAVING = 0.01

Change = dict[str, dict[str, Any]]  # section -> {key: value}, e.g. {"train": {"micro_batch_size": 2}}


def _knobs(run: RunConfig, four_bit_ok: bool) -> list[list[tuple[str, Change]]]:
    """Settings that lower memory, least intrusive first; each is a ladder of steps, mildest step first."""
    t, lora = run.train, run.lora
    knobs: list[list[tuple[str, Change]]] = []
    if not t.gradient_checkpointing:
        knobs.append([("gradient checkpointing on (about 30% slower, same result)",
                       {"train": {"gradient_checkpointing": True}})])
    ladder = []
    mb = t.micro_batch_size
    while mb > 1:
        mb //= 2
        accum = t.grad_accum * t.micro_batch_size // mb
        ladder.append((f"micro-batch {mb} with {accum} accumulation steps (same effective batch, slower)",
                       {"train": {"micro_batch_size": mb, "grad_accum": accum}}))
    knobs.append(ladder)
    knobs.append([("loss in chunks of 256 tokens", {"train": {"loss_chunk_tokens": 256}})]
                 if t.loss_chunk_tokens > 256 else [])
    if t.method != "qlora" and four_bit_ok:
        knobs.append([("QLoRA: 4-bit base instead of 16-bit (slightly lower quality)", {"train": {"method": "qlora"}})])
    ladder = []
    r = lora.r
    while t.method != "full" and r > 4:
        r //= 2
        ladder.append((f"LoRA rank {r} (learns less)", {"lora": {"r": r, "alpha": max(1, lora.alpha * r // lora.r)}}))
    knobs.append(ladder)
    ladder = []
    length = row_length(run)
    while length > 256:
        length //= 2
        ladder.append((f"max length {length} tokens (longer examples are truncated)",
                       {"data": {"max_length": length}}))
    knobs.append(ladder)
    return [k for k in knobs if k]


def _apply(run: RunConfig, change: Change) -> RunConfig:
    for section, values in change.items():
        run = replace_config(run, section, **values)
    return run


def _merge(a: Change, b: Change) -> Change:
    out = {section: dict(values) for section, values in a.items()}
    for section, values in b.items():
        out.setdefault(section, {}).update(values)
    return out


def _overrides(change: Change) -> tuple[str, ...]:
    def text(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    return tuple(f"{section}.{key}={text(v)}" for section, values in change.items() for key, v in values.items())


def _suggest(run: RunConfig, shape: ModelShape, device: DeviceFacts | None, budget: int | None,
             current: int, four_bit_ok: bool, capped: bool | None) -> list[Suggestion]:
    """One suggestion per setting (its mildest step that fits, else its strongest); then, when no single change
    fits, the settings stacked in order (each at its mildest fitting step, else its strongest) until it fits."""
    limit = None if budget is None else FITS_SHARE * budget

    def judge(description: str, change: Change) -> Suggestion:
        total = peak_bytes(shape, plan_inputs(_apply(run, change), device, capped))
        return Suggestion(description, _overrides(change), total, None if limit is None else total <= limit)

    def worth(s: Suggestion) -> bool:
        return s.total_bytes < current * (1 - MIN_SAVING)

    knobs = _knobs(run, four_bit_ok)
    singles: list[Suggestion] = []
    for ladder in knobs:
        tried = [judge(description, change) for description, change in ladder]
        pick = next((s for s in tried if s.fits), tried[-1])
        if worth(pick):
            singles.append(pick)
    if limit is None or any(s.fits for s in singles):
        return singles
    stacked: list[Suggestion] = []
    merged: Change = {}
    parts: list[str] = []
    best = current
    for ladder in knobs:
        tried = [(description, _merge(merged, change)) for description, change in ladder]
        judged = [(d, c, judge(d, c)) for d, c in tried]
        description, change, result = next(((d, c, r) for d, c, r in judged if r.fits), judged[-1])
        if result.total_bytes >= best * (1 - MIN_SAVING):
            continue
        merged, best = change, result.total_bytes
        parts.append(description.split(" (")[0])
        stacked.append(Suggestion(" + ".join(parts), _overrides(merged), result.total_bytes, result.fits))
        if result.fits:
            break
    return singles + stacked[1:]


# ---------------------------------------------------------------------------------------------------------------
# Reading config.json without the weights


def load_model_config(model: str, revision: str | None = None, offline: bool | None = None) -> dict:
    """config.json of `model`: the demo model, a local folder, the HF cache, or (online only) fetched alone.

    Offline mode (HF_HUB_OFFLINE=1, or offline=True) never touches the network.
    """
    if is_demo_model(model):
        return _read_json(ensure_demo_model() / "config.json")
    path = Path(model).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ModelError(f"{path} has no config.json, so it is not a Hugging Face model folder")
        return _read_json(config)
    source = gguf_source(model)
    if source is not None:
        return _gguf_config(model, source[0])
    if path.suffix == ".json" and path.is_file():
        return _read_json(path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelError(f"{model} is not a folder holding a model (no such directory)",
                         hint="give a model folder, a Hub id such as Qwen/Qwen2.5-0.5B-Instruct, or demo")
    if not is_repo_id(model):
        raise ModelError(f"{model!r} is not a valid Hub model id or folder",
                         hint="a Hub id looks like owner/name, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    cached = _cached_config_path(model, revision)
    if cached is not None:
        return _read_json(cached)
    import huggingface_hub  # light enough, but only needed to fetch a Hub id's config.json

    if offline is None:
        offline = huggingface_hub.constants.is_offline_mode()
    if offline:
        raise ModelError(
            f"config.json of {model} is not in the local Hugging Face cache and offline mode is on",
            hint=f"download it first (ft-desk models download {model}) or unset HF_HUB_OFFLINE",
        )
    from huggingface_hub import errors

    try:
        local = huggingface_hub.hf_hub_download(model, "config.json", revision=revision)
    except errors.GatedRepoError:
        raise ModelError(f"{model} is gated: its files need an accepted licence and a token",
                         hint=f"accept the terms on https://huggingface.co/{model} and run: hf auth login") from None
    except errors.RepositoryNotFoundError:
        raise ModelError(f"no model {model!r} on the Hugging Face Hub (or it is private)",
                         hint="check the spelling, or log in with: hf auth login") from None
    except errors.RevisionNotFoundError:
        raise ModelError(f"{model} has no revision {revision!r}") from None
    except errors.LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: the Hub could not be reached
        raise ModelError(f"could not reach the Hugging Face Hub to fetch config.json of {model}",
                         hint=f"check the network, or download it first: ft-desk models download {model}") from None
    except errors.EntryNotFoundError:
        raise ModelError(f"{model} has no config.json, so it is not a transformers model") from None
    except (errors.HfHubHTTPError, OSError) as exc:
        raise ModelError(f"could not fetch config.json of {model}: {exc}".splitlines()[0],
                         hint="check the network, or plan offline from a downloaded model") from None
    return _read_json(Path(local))


def local_model_config(name: str, revision: str | None = None) -> dict[str, Any] | None:
    """config.json of a model that is already on disk, or None: never downloads, never builds the demo model,
    never raises (an unreadable or invalid one is None too, and `load_model_config` says what is wrong)."""
    try:
        source = None if is_demo_model(name) else gguf_source(name)
    except UserError:
        return None
    if source is not None:
        try:
            return _gguf_config(name, source[0])
        except UserError:
            return None
    if is_demo_model(name):
        path = demo_cache_dir() / "config.json"
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser() / "config.json"
    else:
        found = _cached_config_path(name, revision) if is_repo_id(name) else None
        if found is None:
            return None
        path = found
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# (path, size, mtime_ns) -> planner config of a GGUF header: the Recipe screen plans on every keystroke.
_GGUF_CONFIGS: dict[tuple[str, int, int], dict[str, Any]] = {}


def _gguf_config(name: str, gguf_path: Path) -> dict[str, Any]:
    """What the planner reads for a GGUF or Ollama model: its import's config.json once imported (what training
    loads), else the sizes in the GGUF header (no conversion)."""
    folder = imported_dir(name)
    if folder is not None and (folder / "config.json").is_file():
        return _read_json(folder / "config.json")
    st = gguf_path.stat()
    key = (str(gguf_path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _GGUF_CONFIGS:
        _GGUF_CONFIGS[key] = read_gguf(gguf_path).config
    return dict(_GGUF_CONFIGS[key])


def _cached_config_path(repo_id: str, revision: str | None) -> Path | None:
    """config.json of a Hub model in the local cache, found the way training finds the model (hub/cache.py
    find_snapshot: also a model downloaded only at a pinned commit), or None."""
    snapshot = find_snapshot(repo_id, revision)
    config = snapshot / "config.json" if snapshot is not None else None
    return config if config is not None and config.is_file() else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


__all__ = ["SAME_RESULT_KEYS", "device_from_report", "four_bit_likely", "load_model_config", "local_model_config",
           "plan_inputs", "plan_run"]
