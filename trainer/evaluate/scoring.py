"""The teacher-forced half of `ft-desk eval`: the loss of every example, and the general-text perplexity of the
retention probe.

The loss is training's own (training/loss.py `per_example_loss`: the same labels and the same hidden-state -> head
cross-entropy), kept per example; one example per row, so padding never mixes examples. Generation is not here:
eval uses the one `generate()` in trainer/generation.py. torch is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ft_desk.trainer.data.batching import MicroBatch, collate
from ft_desk.trainer.training.loss import per_example_loss

Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class PhaseTiming:
    """Time and tokens one phase of an evaluation took (loss, generation, retention), for the report."""

    seconds: float = 0.0
    tokens: int = 0

    def to_dict(self) -> dict:
        rate = self.tokens / self.seconds if self.seconds > 0 else None
        return {"seconds": round(self.seconds, 3), "tokens": self.tokens,
                "tokens_per_s": round(rate, 1) if rate is not None else None}


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i : i + size]) for i in range(0, len(order), size)]


def losses(model, examples: Sequence, *, pad_id: int, device: str, batch_size: int, chunk_tokens: int,
           autocast: Callable | None = None, progress: Progress | None = None,
           clock: Callable[[], float] = time.perf_counter) -> tuple[list[tuple[float, int]], PhaseTiming]:
    """(summed loss, target tokens) for every tokenized example (input_ids + labels), teacher-forced."""
    import torch  # heavy import

    timing = PhaseTiming()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    done = 0
    was_training = model.training
    model.eval()
    for chunk in _batches(order, batch_size):
        started = clock()
        mb = MicroBatch(rows=tuple((i,) for i in chunk), tokens=sum(len(examples[i].input_ids) for i in chunk),
                        target_tokens=0)
        batch = collate(examples, mb, pad_id, device, packing=False)
        with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
            sums, counts = per_example_loss(model, batch, len(chunk), chunk_tokens)
        sums, counts = sums.tolist(), counts.tolist()  # one sync per batch
        timing.seconds += clock() - started
        for r, i in enumerate(chunk):
            out[i] = (float(sums[r]), int(counts[r]))
            timing.tokens += len(examples[i].input_ids)
        done += len(chunk)
        if progress:
            progress(done, len(examples))
    if was_training:
        model.train()
    return out, timing


@dataclass
class ProbePassage:
    """A plain-text passage tokenized for perplexity: every token after the first is a target."""

    input_ids: list[int]
    labels: list[int]
    where: str
    truncated: bool = False


def probe_passages(tokenizer, lines: Sequence[str], max_length: int, source: str) -> list[ProbePassage]:
    """Each non-empty line a passage, tokenized plainly (the tokenizer's BOS if it adds one; no chat template)."""
    passages = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])[:max_length]
        if len(ids) >= 2:
            passages.append(ProbePassage(ids, list(ids), f"{source}:{number}", False))
    return passages
