"""Recipes that size themselves to the data: what `auto` means for data.max_length, train.row_length,
train.micro_batch_size, train.grad_accum and train.micro_batch_tokens.

The rule, in the order it is applied:
  1. lengths: data.max_length is where an example is truncated (auto: MAX_LENGTH_CAP, 2048, within the model's
     context). The packed row length is the longest tokenized example rounded up to a multiple of 64, within
     data.max_length: short data gets short rows whatever the limit (attention cost grows with the square of the
     row length; issue #12: rows of 1024 for 68-130-token examples cost memory and time for masked-out blocks).
  2. examples per optimizer step: the run's examples (rows x epochs) / TARGET_STEPS, kept within
     [MIN_EXAMPLES_PER_STEP, MAX_EXAMPLES_PER_STEP] = [2, 16]. Evidence (issue #11, SmolLM2-135M-Instruct on
     300 WikiSQL rows x 2 epochs): the old fixed recipe (16 packed rows of 512 tokens per step) made 10 optimizer
     steps and learned little; about 8 examples per step made 77 steps and the train loss fell from 2.0 to 0.25.
     So a small dataset gets about 100 updates, and a large one the usual effective batch of 16 (the QLoRA
     paper's batch for most of its runs).
  3. rows per forward pass (micro-batch): as many rows as fit micro_batch_tokens (auto: 1024 tokens
     on CPU, 2048 on MPS, 4096 on CUDA), and no more than one step needs. Tokens per forward pass, not examples,
     drive activation memory; on a CPU a bigger forward pass is not faster per token.
  4. accumulation: the micro-batches that make up step 2's examples, given how many examples a packed row holds.
A run that would still make fewer than FEW_UPDATES optimizer steps gets a warning with the levers.

Stdlib only: the trainer sizes runs with it, and `ft-desk data check`, `plan` and the TUI show its figures.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from ft_desk.trainer.config import AUTO, RunConfig, replace

MAX_LENGTH_CAP = 2048
LENGTH_MULTIPLE = 64
TARGET_STEPS = 100
MIN_EXAMPLES_PER_STEP = 2
MAX_EXAMPLES_PER_STEP = 16
FEW_UPDATES = 30
MICRO_BATCH_TOKENS = {"cpu": 1024, "mps": 2048, "cuda": 4096}


def is_auto(value: object) -> bool:
    return value == AUTO


def uses_auto(run: RunConfig) -> bool:
    return any(is_auto(v) for v in (run.data.max_length, run.train.row_length, run.train.micro_batch_size,
                                    run.train.grad_accum))


def token_limit(max_length: int | str, context: int | None = None) -> int:
    """Tokens an example may have: data.max_length, or for auto the cap (within the model's context)."""
    if not is_auto(max_length):
        return int(max_length)
    return min(MAX_LENGTH_CAP, context) if context else MAX_LENGTH_CAP


def row_length(run: RunConfig, context: int | None = None) -> int:
    """Tokens of one packed row as the run trains (the longest one without packing): train.row_length within the
    truncation limit; auto, before the data is known, the limit itself (an upper bound)."""
    limit = token_limit(run.data.max_length, context)
    return limit if is_auto(run.train.row_length) else min(int(run.train.row_length), limit)


def micro_batch_tokens(run: RunConfig, device_type: str) -> int:
    value = run.train.micro_batch_tokens
    return MICRO_BATCH_TOKENS.get(device_type, MICRO_BATCH_TOKENS["cpu"]) if is_auto(value) else int(value)


def auto_max_length(lengths: Sequence[int], context: int | None = None, limit: int | str = AUTO) -> int:
    """Rule 1: the longest example rounded up to LENGTH_MULTIPLE, within `limit` (data.max_length; auto: the cap)
    and the model's context."""
    longest = max(lengths, default=LENGTH_MULTIPLE)
    rounded = -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    return min(max(LENGTH_MULTIPLE, rounded), token_limit(limit, context))


def examples_per_step(examples: int, epochs: float) -> int:
    """Rule 2: about TARGET_STEPS updates over the run, within [MIN, MAX] examples per step."""
    wanted = round(examples * epochs / TARGET_STEPS)
    return max(MIN_EXAMPLES_PER_STEP, min(MAX_EXAMPLES_PER_STEP, wanted))


@dataclass(frozen=True)
class Sizing:
    """A run's batching as it will train, and which of it was sized from the data."""

    max_length: int  # truncation limit
    row_length: int  # tokens per packed row
    micro_batch_size: int
    grad_accum: int
    steps: int  # optimizer steps of the run
    examples_per_step: float
    tokens_per_step: float
    auto_keys: tuple[str, ...]  # the dotted keys that were `auto`
    warning: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for the CLI, the run log and the Recipe screen."""
        sized = f" (sized from the data: {', '.join(self.auto_keys)})" if self.auto_keys else ""
        tokens = _tokens(self.tokens_per_step)
        return (f"{self.steps} optimizer steps, ~{self.examples_per_step:.0f} examples (~{tokens} tokens) each: "
                f"micro-batch {self.micro_batch_size} x {self.row_length} tokens, accumulation "
                f"{self.grad_accum}{sized}")


def _tokens(n: float) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else f"{n:.0f}"


def size_run(run: RunConfig, lengths: Sequence[int], rows_for: Callable[[int], int], device_type: str,
             context: int | None = None) -> tuple[RunConfig, Sizing]:
    """`run` with every `auto` batching value replaced by a number, and the figures of the result.

    `lengths` are the tokenized training examples' lengths (truncated at token_limit); `rows_for(row_length)`
    is how many rows one epoch of them packs into at that row length (the examples themselves without packing).
    Values the user set are kept as they are; only the figures are computed for them.
    """
    t, d = run.train, run.data
    auto_keys = tuple(k for k, v in (("data.max_length", d.max_length), ("train.row_length", t.row_length),
                                     ("train.micro_batch_size", t.micro_batch_size),
                                     ("train.grad_accum", t.grad_accum)) if is_auto(v))
    n = len(lengths)
    max_length = token_limit(d.max_length, context)
    lengths = [min(k, max_length) for k in lengths]  # as training truncates them
    row = auto_max_length(lengths, context, max_length) if is_auto(t.row_length) else min(int(t.row_length),
                                                                                          max_length)
    rows = max(1, rows_for(row))
    per_row = max(1.0, n / rows)  # examples a row holds on average
    rows_per_step = examples_per_step(n, t.epochs) / per_row
    if is_auto(t.micro_batch_size):
        fit = max(1, micro_batch_tokens(run, device_type) // row)
        fit = 2 ** int(math.log2(fit))  # few distinct shapes; halving keeps the effective batch exact
        micro = max(1, min(fit, 2 ** int(math.log2(max(1.0, rows_per_step)))))
    else:
        micro = int(t.micro_batch_size)
    accum = max(1, round(rows_per_step / micro)) if is_auto(t.grad_accum) else int(t.grad_accum)
    if auto_keys:
        run = replace(run, "train", row_length=row, micro_batch_size=micro, grad_accum=accum)
        run = replace(run, "data", max_length=max_length)
    batches_per_epoch = -(-rows // micro)
    if t.max_steps:
        steps = t.max_steps
    else:
        whole = int(t.epochs)
        tail = t.epochs - whole
        batches = whole * batches_per_epoch + (max(1, round(batches_per_epoch * tail)) if tail > 1e-9 else 0)
        steps = max(1, -(-batches // accum))
    total_examples = n * t.epochs if not t.max_steps else micro * accum * per_row * steps
    total_tokens = sum(lengths) * (total_examples / n if n else 0)
    warning = ""
    if steps < FEW_UPDATES:
        warning = (f"only {steps} optimizer updates: too few to learn much; add rows, raise train.epochs, or lower "
                   "train.grad_accum")
    return run, Sizing(max_length=max_length, row_length=row, micro_batch_size=micro, grad_accum=accum, steps=steps,
                       examples_per_step=total_examples / steps, tokens_per_step=total_tokens / steps,
                       auto_keys=auto_keys, warning=warning)


def pack_rows(lengths: Sequence[int], max_length: int, packing: bool, seed: int, epoch: int) -> list[tuple[int, ...]]:
    """One epoch's rows from the examples' token counts: a seeded shuffle, then (with packing) first-fit into rows
    of max_length tokens; an example never spans two rows. Training (data/batching.py) and sizing share it."""
    order = list(range(len(lengths)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    if not packing:
        return [(i,) for i in order]
    rows: list[list[int]] = []
    room: list[int] = []
    # Note: only the last few open rows are tried, which keeps packing O(n) and the order mostly shuffled.
    window = 16
    for i in order:
        n = lengths[i]
        for r in range(max(0, len(rows) - window), len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return [tuple(r) for r in rows]


def size_batches(run: RunConfig, lengths: Sequence[int], device_type: str, context: int | None = None):
    """size_run with rows counted by packing the first epoch exactly as training will."""
    clipped = [min(n, token_limit(run.data.max_length, context)) for n in lengths]

    def rows_for(row: int) -> int:
        return len(pack_rows(clipped, row, run.train.packing, run.train.seed, 0))

    return size_run(run, lengths, rows_for, device_type, context)


def length_counts(lengths: Sequence[int]) -> dict[str, int]:
    """{tokens: examples} - the compact form of `lengths` that `ft-desk data check --json` hands the TUI."""
    counts: dict[str, int] = {}
    for n in lengths:
        counts[str(n)] = counts.get(str(n), 0) + 1
    return counts


def lengths_from_counts(counts: dict[str, int]) -> list[int]:
    return [int(n) for n, k in sorted(counts.items(), key=lambda kv: int(kv[0])) for _ in range(int(k))]


def provisional(run: RunConfig, device_type: str, context: int | None = None) -> RunConfig:
    """`run` with `auto` values set for planning before the data is known: the longest row allowed and as many
    rows as micro_batch_tokens holds, so a memory plan made now bounds the run's real peak from above."""
    if not uses_auto(run):
        return run
    row = row_length(run, context)
    micro = run.train.micro_batch_size
    if is_auto(micro):
        fit = max(1, micro_batch_tokens(run, device_type) // row)
        micro = 2 ** int(math.log2(fit))
    accum = 1 if is_auto(run.train.grad_accum) else run.train.grad_accum
    run = replace(run, "train", row_length=row, micro_batch_size=micro, grad_accum=accum)
    return replace(run, "data", max_length=token_limit(run.data.max_length, context))


__all__ = ["MAX_LENGTH_CAP", "Sizing", "auto_max_length", "examples_per_step", "is_auto", "length_counts",
           "lengths_from_counts", "micro_batch_tokens", "pack_rows", "provisional", "row_length", "size_batches",
           "size_run", "token_limit", "uses_auto"]
