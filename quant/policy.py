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

# Note: bitsandbytes' CPU repacked kernel works on blocks of this many output features.
CPU_REPACK_BLOCK = 32

QUANT_TYPES = ("nf4", "fp4")


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


def misaligned_layers(model) -> list[str]:
    """Names of 4-bit layers whose out_features would trip the CPU repack assertion (for the doctor report)."""
    return [n for n, m in four_bit_layers(model) if m.out_features % CPU_REPACK_BLOCK]
