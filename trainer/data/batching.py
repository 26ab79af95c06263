"""Turning tokenized examples into micro-batches: packing, padding-free rows and the block-diagonal mask.

The schedule of every micro-batch of a run is a pure function of the examples, the seed and the settings, so
a resumed run replays exactly the batches an uninterrupted run would see (only an index is checkpointed).

Packing: examples are laid end to end in rows of at most `max_length` tokens. Per-sample position_ids alone do
not stop attention across samples (measured with transformers' SDPA path), so each row gets a 4-D boolean
block-diagonal causal mask. Targets are shifted inside each example, so no token predicts across a boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ft_desk.trainer.recipe_sizing import pack_rows

IGNORE = -100
# Note: rows are padded to a multiple of this many tokens so kernels see few distinct shapes.
PAD_MULTIPLE = 8


@dataclass(frozen=True)
class MicroBatch:
    """Which examples go into which row of one forward pass, and its host-side token counts."""

    rows: tuple[tuple[int, ...], ...]
    tokens: int  # real (non-pad) tokens
    target_tokens: int  # tokens that carry loss


def _lengths(examples: Sequence) -> list[int]:
    return [len(e.input_ids) for e in examples]


def _target_count(example) -> int:
    # Targets are labels shifted left by one, so the first label never counts.
    return sum(1 for t in example.labels[1:] if t != IGNORE)


def epoch_rows(examples: Sequence, max_length: int, packing: bool, seed: int, epoch: int) -> list[tuple[int, ...]]:
    """Rows for one epoch: a seeded shuffle, then (with packing) first-fit into rows of max_length tokens."""
    return pack_rows(_lengths(examples), max_length, packing, seed, epoch)


def schedule(
    examples: Sequence,
    *,
    max_length: int,
    micro_batch_size: int,
    packing: bool,
    seed: int,
    epochs: float,
) -> list[MicroBatch]:
    """Every micro-batch of the run in order; a fractional last epoch takes a prefix of its batches."""
    whole = int(epochs)
    fraction = epochs - whole
    out: list[MicroBatch] = []
    n_epochs = whole + (1 if fraction > 1e-9 else 0)
    # Counted once per example, not once per epoch: a long max_steps run repeats the epochs many times.
    lengths = _lengths(examples)
    target_counts = [_target_count(e) for e in examples] if n_epochs else []
    for epoch in range(n_epochs):
        rows = epoch_rows(examples, max_length, packing, seed, epoch)
        batches = [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
        if epoch == whole:  # the fractional tail
            batches = batches[: max(1, round(len(batches) * fraction))]
        for b in batches:
            tokens = sum(lengths[i] for row in b for i in row)
            targets = sum(target_counts[i] for row in b for i in row)
            out.append(MicroBatch(rows=tuple(b), tokens=tokens, target_tokens=targets))
    return out


def collate(examples: Sequence, batch: MicroBatch, pad_id: int, device: str, packing: bool):
    """Tensors for one micro-batch: input_ids, position_ids, targets and the attention mask.

    With packing the mask is 4-D boolean (rows, 1, L, L), True where attention is allowed; pad positions attend
    to themselves only (a query with no allowed key would give NaN). Without packing it is the usual 2-D mask.
    """
    import torch  # heavy import

    width = max(sum(len(examples[i].input_ids) for i in row) for row in batch.rows)
    width = -(-width // PAD_MULTIPLE) * PAD_MULTIPLE
    n = len(batch.rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    targets = torch.full((n, width), IGNORE, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    segments = torch.full((n, width), -1, dtype=torch.long)
    for r, row in enumerate(batch.rows):
        at = 0
        for seg, i in enumerate(row):
            ids = examples[i].input_ids
            labels = examples[i].labels
            k = len(ids)
            input_ids[r, at : at + k] = torch.tensor(ids, dtype=torch.long)
            targets[r, at : at + k - 1] = torch.tensor(labels[1:], dtype=torch.long)
            positions[r, at : at + k] = torch.arange(k)
            segments[r, at : at + k] = seg
            at += k
        # Each pad position is its own segment so it attends only to itself.
        pad = width - at
        if pad:
            segments[r, at:] = torch.arange(len(row), len(row) + pad)
            positions[r, at:] = torch.arange(pad)
    if packing:
        same = segments[:, :, None] == segments[:, None, :]
        causal = torch.ones((width, width), dtype=torch.bool).tril_()
        mask = (same & causal)[:, None, :, :]
    else:
        mask = (segments == 0).long()  # one example per row: the real tokens are segment 0
    return {
        "input_ids": input_ids.to(device),
        "position_ids": positions.to(device),
        "attention_mask": mask.to(device),
        "targets": targets.to(device),
    }

