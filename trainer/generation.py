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

Speed on CPU: a bitsandbytes 4-bit layer dequantizes its whole weight on every forward pass, so generating one
token dequantized every weight of the model again. `inference_weights` dequantizes each 4-bit layer once, into
the layer's compute dtype (bf16 on request, DENSE_DTYPE), for the duration of a `generate` call
(when the dense copy fits in memory), with a LoRA adapter merged into it, so a new token costs one plain matmul
per layer. Nothing changes on CUDA, where
bitsandbytes' kernels are fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from ft_desk.quant.policy import DENSE_RAM_SHARE  # the share of free RAM the dense copy may take

log = logging.getLogger("ft_desk.generation")

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


# Note: the dtype of the dense copy. "compute" (the default): the layer's compute dtype, the training path's math
# bit for bit. "auto": bf16 on a CPU with native bf16 (AVX512-BF16, AMX, Arm BF16) when the layer computes in
# fp32, the fp32 output layer in bf16 too - half the bytes read per token, but on SmolLM2 on 2 busy cores it did
# not beat the fp32 copy clearly (x0.82 against x0.81 of transformers' bf16 generate, separate runs) and greedy
# answers can change (a memorized test model stopped answering), so it is opt-in.
DENSE_DTYPE = "compute"


def dense_bytes(model) -> int:
    """Bytes the dense inference copy of every 4-bit layer of `model` takes (0 without 4-bit layers)."""
    from ft_desk.quant.policy import four_bit_layers

    return sum(_dense_size(module) for _, module in four_bit_layers(model))


def _dense_size(module) -> int:
    return module.in_features * module.out_features * _dense_dtype(module).itemsize


def _dense_dtype(module):
    import torch  # heavy import, loaded with the model

    compute = module.compute_dtype or torch.float32
    if DENSE_DTYPE == "auto" and compute == torch.float32 and _cpu_bf16():
        return torch.bfloat16
    return compute


def _cpu_bf16() -> bool:
    from ft_desk.quant.device import cpu_features

    return bool(cpu_features().get("bf16"))


@contextmanager
def inference_weights(model, device=None, available: int | None = None) -> Iterator[int]:
    """CPU: every 4-bit layer of `model` computes from a dense weight made once, until the block ends.

    A 4-bit layer under a peft LoRA adapter gets one merged weight (base + scaling x B @ A of the active
    adapters): one matmul per layer and token instead of three, and none of peft's per-call bookkeeping, which
    at SmolLM2's size cost more than the matmuls. The base alone (an adapter turned off, as chat's /base does,
    DoRA and other variants, extra arguments) is dequantized on first use. Yields how many 4-bit layers were
    switched (0: nothing to do, not CPU, or the dense copy would not fit in DENSE_RAM_SHARE of `available`
    bytes, default the RAM available now). For no-grad inference only; the adapter must not change inside.
    """
    from ft_desk.quant.policy import four_bit_layers

    device = device if device is not None else _model_device(model)
    layers = four_bit_layers(model) if str(device).split(":")[0] == "cpu" else []
    layers = [(n, m) for n, m in layers if "forward" not in vars(m)]  # an enclosing block already switched these
    if not layers:
        yield 0
        return
    need = sum(_dense_size(m) for _, m in layers)
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    if need > DENSE_RAM_SHARE * available:
        log.info("generation dequantizes per token: a dense copy of the 4-bit weights needs %.0f MiB, %.0f MiB "
                 "of RAM is available", need / 2**20, available / 2**20)
        yield 0
        return
    import torch  # heavy import: a model is loaded

    switched = []
    try:
        with torch.no_grad():
            bases = {}
            for _, module in layers:
                bases[id(module)] = module.forward = _DenseForward(module)  # an instance attribute shadows the class's
                switched.append(module)
            for _, module in model.named_modules():  # peft LoRA layers around a switched 4-bit layer
                base = getattr(module, "base_layer", None)
                wraps = base is not None and id(base) in bases and hasattr(module, "lora_A")
                if wraps and "forward" not in vars(module) and not module.merged:
                    module.forward = _MergedLoraForward(module, bases[id(base)])
                    switched.append(module)
            head = _output_layer(model)
            if head is not None and _dense_dtype(layers[0][1]) == torch.bfloat16:
                # The 16-bit output layer (often tied to the embeddings) is read once per token as well.
                head.forward = _CastLinear(head, torch.bfloat16)
                switched.append(head)
        yield len(bases)
    finally:
        for module in switched:
            del module.forward


def _output_layer(model):
    """The plain fp32 nn.Linear that turns hidden states into logits, if the model has one (not LoRA-wrapped)."""
    import torch

    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter else None
    if type(head) is torch.nn.Linear and head.weight.dtype == torch.float32 and "forward" not in vars(head):
        return head
    return None


class _CastLinear:
    """An nn.Linear's forward from a copy of its weight in another dtype, the output back in the input's."""

    def __init__(self, layer, dtype) -> None:
        self.weight = layer.weight.detach().to(dtype)
        self.bias = None if layer.bias is None else layer.bias.detach().to(dtype)

    def __call__(self, x):
        import torch.nn.functional as F  # heavy import, already loaded with the model

        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def _dequantized(module):
    """The dense weight of a bitsandbytes 4-bit layer in its compute dtype: what its forward multiplies by."""
    import torch
    from bitsandbytes.functional import dequantize_4bit  # heavy import, loaded with the model

    return dequantize_4bit(module.weight.data, module.weight.quant_state).to(module.compute_dtype or torch.float32)


class _DenseForward:
    """A 4-bit layer's forward from its dense weight (made on first use), with Linear4bit's dtype handling. In
    the compute dtype it is the training path's dequantization and matmul, the same output to the bit."""

    def __init__(self, module) -> None:
        self.module = module
        self.weight = None

    def __call__(self, x):
        import torch.nn.functional as F  # heavy import, already loaded with the model

        if self.weight is None:
            self.weight = _dequantized(self.module).to(_dense_dtype(self.module))
        bias = self.module.bias
        bias = None if bias is None else bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


class _MergedLoraForward:
    """A peft LoRA layer around a 4-bit layer as one matmul: base + sum of scaling x B @ A over the adapters that
    were active when the block began (float rounding apart, what peft computes). Anything else - the adapter
    turned off, other adapters active, training mode, extra arguments, DoRA and other variants - goes through
    peft's own forward, whose 4-bit base then computes from its dense weight too."""

    def __init__(self, layer, base: _DenseForward) -> None:
        self.layer = layer
        self.adapters = tuple(name for name in layer.active_adapters if name in layer.lora_A)
        weight = _dequantized(base.module)
        for name in self.adapters:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            weight += (b.to(weight.dtype) @ a.to(weight.dtype)) * layer.scaling[name]
        self.weight = weight.to(_dense_dtype(base.module))
        bias = base.module.bias
        self.bias = None if bias is None else bias.detach().to(self.weight.dtype)

    def __call__(self, x, *args, **kwargs):
        import torch.nn.functional as F  # heavy import, already loaded with the model

        layer = self.layer
        plain = not (args or kwargs or layer.training or layer.merged or layer.disable_adapters
                     or getattr(layer, "lora_variant", None))
        if not plain or tuple(n for n in layer.active_adapters if n in layer.lora_A) != self.adapters:
            return type(layer).forward(layer, x, *args, **kwargs)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


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
        with inference_weights(model, device):  # CPU: dequantize the 4-bit weights once, not per token
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
                        input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids), pad_token_id=pad_id,
                        use_cache=True, **options,
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
