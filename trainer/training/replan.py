"""Out of memory in a step: the same run with half the micro-batch and twice the accumulation.

Every micro-batch of the run's schedule (data/batching.py) is cut into `split` pieces of contiguous rows, and the
accumulation is multiplied by `split`, so each optimizer step still sees exactly the same examples and the same
loss normalisation: the effective batch, the number of steps and the learning-rate schedule do not change, only
the peak memory of one forward and backward pass. The loop's position (`micro_index`) counts pieces, so it is
multiplied when the split grows. The split is recorded in state.json (and in each checkpoint), which is how a
resumed run goes on with the smaller micro-batch. When a micro-batch is a single row there is nothing left to cut:
the run stops with the next setting to change and the planner's estimate.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from ft_desk.trainer import run_folder
from ft_desk.trainer.config import RunConfig
from ft_desk.trainer.config import replace as replace_config
from ft_desk.trainer.data.batching import IGNORE, MicroBatch
from ft_desk.trainer.errors import OutOfMemory
from ft_desk.trainer.events import format_bytes
from ft_desk.trainer.recipe_sizing import row_length

log = logging.getLogger("ft_desk")

STATE_KEY = "batch_split"
"""state.json: how many pieces each scheduled micro-batch is cut into (1, 2, 4...)."""

OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory")
"""How allocators say it: CUDA and MPS "out of memory", torch's CPU allocator "can't allocate memory"."""


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocator failure: torch's OutOfMemoryError, Python's MemoryError, or an error in the words CUDA, MPS or
    the CPU allocator use. Our own UserErrors never count (their sentence may quote a memory setting)."""
    from ft_desk.trainer.errors import UserError

    if isinstance(exc, OutOfMemory):
        return True
    if isinstance(exc, UserError):
        return False
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return any(words in str(exc).lower() for words in OOM_WORDS)


def micro_batch_size(cfg: RunConfig, split: int) -> int:
    """Rows per forward pass once each micro-batch is cut into `split` pieces."""
    return -(-cfg.train.micro_batch_size // split)


def effective_config(cfg: RunConfig, split: int) -> RunConfig:
    """The run's config as the loop trains it with `split`: micro-batch divided, accumulation multiplied."""
    if split == 1:
        return cfg
    return replace_config(cfg, "train", micro_batch_size=micro_batch_size(cfg, split),
                          grad_accum=cfg.train.grad_accum * split)


def _targets(example) -> int:
    return sum(1 for t in example.labels[1:] if t != IGNORE)


def split_batches(examples: Sequence, batches: Sequence[MicroBatch], split: int) -> list[MicroBatch]:
    """Each micro-batch cut into exactly `split` pieces of contiguous rows, larger pieces first; a micro-batch
    with fewer rows than `split` gets empty pieces, which the loop skips, so positions stay `split` apart."""
    if split == 1:
        return list(batches)
    out: list[MicroBatch] = []
    for mb in batches:
        n = len(mb.rows)
        at = 0
        for k in range(split):
            size = n // split + (1 if k < n % split else 0)
            rows = mb.rows[at: at + size]
            at += size
            out.append(MicroBatch(rows=rows, tokens=sum(len(examples[i].input_ids) for row in rows for i in row),
                                  target_tokens=sum(_targets(examples[i]) for row in rows for i in row)))
    return out


def recorded_split(run_dir: Path) -> int:
    """The split a run recorded after running out of memory (1 when it never did)."""
    value = run_folder.read_state(run_dir).get(STATE_KEY)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


def record_split(run_dir: Path, cfg: RunConfig, split: int) -> None:
    """Write the split and the micro-batch and accumulation it gives into state.json, for a resume."""
    run_folder.update_state(run_dir, **{STATE_KEY: split, "micro_batch_size": micro_batch_size(cfg, split),
                                        "grad_accum": cfg.train.grad_accum * split})


def free_memory(device: str) -> None:
    """Give the failed step's memory back to the device before it is tried again."""
    import gc

    import torch  # heavy import, loaded by the run already

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    elif device == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def at_the_limit(cfg: RunConfig, split: int, device: str, model_dir: str | None) -> OutOfMemory:
    """Out of memory with one row per forward pass: the next settings to change, with the planner's numbers."""
    eff = effective_config(cfg, split)
    cut = (f" (cut from {cfg.train.micro_batch_size}, with train.grad_accum raised to {eff.train.grad_accum})"
           if split > 1 else "")
    levers = []
    if not cfg.train.gradient_checkpointing:
        levers.append(("turn on gradient checkpointing (--set train.gradient_checkpointing=true)",
                       ("train", {"gradient_checkpointing": True})))
    row = row_length(cfg)
    shorter = max(64, row // 2)
    if shorter < row:
        levers.append((f"use a shorter data.max_length (--set data.max_length={shorter})",
                       ("data", {"max_length": shorter})))
    levers.append(("use a smaller model", None))
    estimate, lever_estimates = planner_estimates(eff, device, model_dir, [change for _, change in levers])
    names = [text + (f" - the planner estimates {format_bytes(peak)}" if peak else "")
             for (text, _), peak in zip(levers, lever_estimates)]
    return OutOfMemory(
        f"the device ran out of memory even with train.micro_batch_size=1{cut}; {estimate}",
        hint="next: " + names[0] + ("; after that: " + "; ".join(names[1:]) if names[1:] else "")
             + "; `ft-desk plan` shows what fits",
    )


def planner_estimates(cfg: RunConfig, device: str, model_dir: str | None,
                      changes: list) -> tuple[str, list[int | None]]:
    """(the planner's verdict on `cfg` as a phrase, the planner's peak with each change applied). The planner is
    advice here: when it cannot answer, the phrase says so and the peaks are None."""
    unknown = [None] * len(changes)
    try:
        from ft_desk.quant.device import probe_facts
        from ft_desk.quant.planner import peak_bytes
        from ft_desk.trainer.planning import plan_inputs, plan_run

        config = json.loads((Path(model_dir or "") / "config.json").read_text(encoding="utf-8"))
        facts = probe_facts(device)
        plan = plan_run(config, cfg, facts)
        budget = f" of the {format_bytes(plan.device_budget_bytes)} this device can give a run" \
            if plan.device_budget_bytes else ""
        phrase = f"the planner estimates a peak of {format_bytes(plan.total_bytes)}{budget}"
        peaks: list[int | None] = []
        for change in changes:
            if change is None:
                peaks.append(None)
                continue
            section, values = change
            peaks.append(peak_bytes(config, plan_inputs(replace_config(cfg, section, **values), facts)))
        return phrase, peaks
    except Exception as exc:  # noqa: BLE001 - the planner is advice; the out-of-memory message must still come
        log.info("no planner estimate for the out-of-memory message: %s", exc)
        return "the planner could not estimate this run's peak", unknown
