"""The one way ft-desk generates text: training samples, `ft-desk eval`, `ft-desk chat` and the export checks.

`generate(model, tokenizer, prompts, ...)` takes prompts as token ids and returns, per prompt and in prompt order,
the new token ids up to and including the first stop token, their text and whether a stop token ended them.

One padding policy, so every caller pads alike:
- Prompts are sorted by length and left-padded into batches of `batch_size` (a decoder-only model continues from
  the last position, so padding goes on the left, masked out). `batch_size=1` never pads.
- The pad id is the tokenizer's, else the first stop id, else EOS: a tokenizer without a pad token still works.
- Greedy unless `sampling` is given; sampling seeds torch once per call, so two models see the same draws.
- A row's output ends at its first stop token (what a batch generates after that for a finished row is dropped).

Streaming: `on_token` receives every new token id as it is generated (single prompt only). torch is imported
inside the function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Progress = Callable[[int, int], None]  # (prompts done, total)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; without a Sampling, decoding is greedy."""

    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    text: str  # decoded new tokens, special tokens dropped, stripped
    tokens: int  # new tokens up to and including the stop token
    stopped: bool  # ended with a stop token (EOS / turn end) rather than the token limit
    token_ids: tuple[int, ...] = ()  # the new tokens themselves, the stop token included


def pad_id_for(tokenizer, stop_ids: Sequence[int]) -> int:
    """The id generation pads with: the tokenizer's pad token, else the first stop id, else EOS, else 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if stop_ids:
        return int(stop_ids[0])
    eos = tokenizer.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return int(eos) if isinstance(eos, int) else 0


class _TokenStream:
    """The streamer protocol of transformers' generate (put/end), forwarding each new token id."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for tid in value.reshape(-1).tolist():
            self.on_token(int(tid))

    def end(self) -> None:
        pass


def _model_device(model):
    return next(model.parameters()).device


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: Sequence[int],
             batch_size: int = 1, device=None, sampling: Sampling | None = None,
             on_token: Callable[[int], None] | None = None, progress: Progress | None = None) -> list[Generation]:
    """Continue every prompt (token ids); one Generation per prompt, in prompt order."""
    import torch  # heavy import: only once a model is loaded

    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if on_token is not None and len(prompts) != 1:
        raise ValueError(f"streaming with on_token needs exactly one prompt, got {len(prompts)}")
    device = device if device is not None else _model_device(model)
    pad_id = pad_id_for(tokenizer, stop_ids)
    stop = {int(s) for s in stop_ids}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    results: list[Generation | None] = [None] * len(prompts)
    options: dict = {"do_sample": False}
    if sampling is not None:
        options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
        torch.manual_seed(sampling.seed)
    if on_token is not None:
        options["streamer"] = _TokenStream(on_token)
    was_training = model.training
    model.eval()
    done = 0
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                ids = list(prompts[i])
                input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[r, width - len(ids):] = 1
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                    eos_token_id=list(stop_ids), pad_token_id=pad_id, use_cache=True, **options,
                )
            new_tokens = out[:, width:].tolist()  # the one device -> host copy of the batch
            for r, i in enumerate(batch):
                row = new_tokens[r]
                end = next((k for k, tok in enumerate(row) if tok in stop), None)
                kept = row[: end + 1] if end is not None else row
                text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                results[i] = Generation(text=text, tokens=len(kept), stopped=end is not None,
                                        token_ids=tuple(kept))
            done += len(batch)
            if progress:
                progress(done, len(prompts))
    finally:
        if was_training:
            model.train()
    return [g for g in results if g is not None]
