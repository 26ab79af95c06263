"""4-bit policy: turn ft-desk's quant settings into transformers' BitsAndBytesConfig, and steer around
known bitsandbytes pitfalls.

Pitfall guarded here: on CPUs with AVX512-BF16, bitsandbytes' Linear4bit switches to a repacked inference
layout the first time it runs in eval mode without grad, and that repacking asserts unless the layer's
out_features is a multiple of 32 (it also changes the numerics between train and eval). `disable_cpu_repack`
turns that path off for every 4-bit layer, so evaluation and generation use the same dequantize-then-matmul
path as training and never crash, whatever the model's widths.
"""

from __future__ import annotations

from typing import Any

QUANT_TYPES = ("nf4", "fp4")

# Note: bitsandbytes' 4-bit default (used by transformers' BitsAndBytesConfig): one absmax scale per 64 weights.
# With double quantization those scales are themselves quantized to 8 bits in blocks of 256, each block with an
# fp32 scale; a 256-entry fp32 code table and an offset come with every tensor. That is 4 + 8/64 + 32/(64*256)
# = ~4.127 bits per weight with double quant, and 4 + 32/64 = 4.5 bits without (the QLoRA paper, section 3).
BLOCKSIZE = 64
DOUBLE_QUANT_BLOCKSIZE = 256
PER_TENSOR_BYTES = 256 * 4 + 64  # code table + offset and bookkeeping, only with double quant


# Note: the share of the RAM available at the time that generation's dense copy of the 4-bit weights may take on
# CPU (trainer.generation.inference_weights); above it, generation dequantizes per token (slow, but it never
# pushes the machine into swap). The memory planner applies the same rule to a run's training samples.
DENSE_RAM_SHARE = 0.5


def four_bit_bytes(n_weights: int, double_quant: bool = True, n_tensors: int = 0) -> int:
    """Bytes that `n_weights` quantized weights occupy in 4-bit, with their scales (and per-tensor tables)."""
    packed = (n_weights + 1) // 2
    blocks = -(-n_weights // BLOCKSIZE)
    if not double_quant:
        return packed + blocks * 4
    return packed + blocks + -(-blocks // DOUBLE_QUANT_BLOCKSIZE) * 4 + n_tensors * PER_TENSOR_BYTES


def torch_dtype(name: str):
    import torch  # heavy import: only callers that build models reach this

    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def bnb_config(quant_type: str, double_quant: bool, compute_dtype: str, skip_modules: tuple[str, ...] | list[str]):
    """transformers.BitsAndBytesConfig for 4-bit loading; compute_dtype must already be resolved (not auto)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    from transformers import BitsAndBytesConfig  # heavy import

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
        llm_int8_skip_modules=list(skip_modules) or None,
    )


def four_bit_layers(model) -> list[tuple[str, Any]]:
    """(name, module) for every bitsandbytes Linear4bit in `model`."""
    try:
        import bitsandbytes as bnb  # heavy import; absent means no 4-bit layers can exist
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def disable_cpu_repack(model) -> int:
    """Keep every 4-bit layer on the training matmul path on CPU; returns how many layers were changed."""
    changed = 0
    for _, module in four_bit_layers(model):
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed

