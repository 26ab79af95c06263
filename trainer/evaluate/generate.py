"""The model-facing half of `ft-desk eval`: batched generation, teacher-forced loss per example, and the
general-text perplexity of the retention probe.

Generation: prompts sorted by length and left-padded into batches (attention mask on the padding), greedy unless
sampling is asked for, stopping at EOS or the chat template's turn-end token. A row counts as stopped when one of
those tokens appears among its new tokens; otherwise it hit the token limit. Loss: the same labels and the same
hidden-state -> head cross-entropy as training (loop.causal_lm_loss), kept per example; one example per row, so
padding never mixes examples. torch is imported inside the functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ft_desk.trainer.data.batching import IGNORE, MicroBatch, collate

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; None everywhere means greedy decoding."""

    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0


@dataclass
class Generation:
    text: str  # decoded new tokens, special tokens dropped, stripped
    tokens: int  # new tokens up to and including the stop token
    stopped: bool  # ended with EOS / turn end rather than the token limit


@dataclass
class PhaseTiming:
    seconds: float = 0.0
    tokens: int = 0

    def to_dict(self) -> dict:
        rate = self.tokens / self.seconds if self.seconds > 0 else None
        return {"seconds": round(self.seconds, 3), "tokens": self.tokens,
                "tokens_per_s": round(rate, 1) if rate is not None else None}


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i : i + size]) for i in range(0, len(order), size)]


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int,
             stop_ids: Sequence[int], device: str, sampling: Sampling | None = None,
             progress: Progress | None = None, clock: Callable[[], float] = time.perf_counter,
             ) -> tuple[list[Generation], PhaseTiming]:
    """Continuations of every prompt (token ids), in prompt order, and the time and tokens it took."""
    import torch  # heavy import

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    results: list[Generation | None] = [None] * len(prompts)
    timing = PhaseTiming()
    if sampling is not None:
        torch.manual_seed(sampling.seed)  # base and tuned draw from the same seed
    stop = set(int(s) for s in stop_ids)
    done = 0
    was_training = model.training
    model.eval()
    for batch in _batches(order, batch_size):
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            ids = list(prompts[i])
            input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[r, width - len(ids):] = 1
        kwargs = dict(do_sample=False)
        if sampling is not None:
            kwargs = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        started = clock()
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                eos_token_id=list(stop_ids), pad_token_id=pad_id, use_cache=True, **kwargs,
            )
        new_tokens = out[:, width:].tolist()  # the one device -> host copy of the batch
        timing.seconds += clock() - started
        for r, i in enumerate(batch):
            row = new_tokens[r]
            end = next((k for k, tok in enumerate(row) if tok in stop), None)
            kept = row[: end + 1] if end is not None else row
            text = tokenizer.decode(kept, skip_special_tokens=True).strip()
            results[i] = Generation(text=text, tokens=len(kept), stopped=end is not None)
            timing.tokens += len(kept)
        done += len(batch)
        if progress:
            progress(done, len(prompts))
    if was_training:
        model.train()
    return [g for g in results if g is not None], timing


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def per_example_loss(model, batch: dict, rows: int, chunk_tokens: int):
    """(summed cross-entropy, target tokens) per row of a collated batch, computed as training computes it:
    decoder hidden states at labelled positions, the output head in chunks, fp32 logits."""
    import torch  # heavy import
    import torch.nn.functional as F

    from ft_desk.trainer.training.loop import torch_tanh_cap

    base = _unwrap(model)
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                position_ids=batch["position_ids"], use_cache=False)[0]
    head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    targets = batch["targets"]
    keep = targets != IGNORE
    row_of = keep.nonzero()[:, 0]
    h, t = hidden[keep], targets[keep]
    sums = torch.zeros(rows, dtype=torch.float64, device=hidden.device)
    for start in range(0, h.shape[0], chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        logits = head(h[piece]).float()
        if softcap:
            logits = torch_tanh_cap(logits, softcap)
        ce = F.cross_entropy(logits, t[piece], reduction="none")
        sums.index_add_(0, row_of[piece], ce.double())
    counts = keep.sum(dim=1)
    return sums, counts


def losses(model, examples: Sequence, *, pad_id: int, device: str, batch_size: int, chunk_tokens: int,
           autocast: Callable | None = None, progress: Progress | None = None,
           clock: Callable[[], float] = time.perf_counter) -> tuple[list[tuple[float, int]], PhaseTiming]:
    """(summed loss, target tokens) for every tokenized example (input_ids + labels), teacher-forced."""
    import contextlib

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
