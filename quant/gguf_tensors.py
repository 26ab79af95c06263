"""The numbers of a GGUF file: which architectures ft-desk writes, what each Hugging Face tensor is called in
llama.cpp, how its values are laid out there, and which GGML type it is stored as.

Per architecture (what llama.cpp's own converter does, and transformers' GGUF loader undoes):
- llama (Llama, Mistral, SmolLM): q_proj / k_proj rows are permuted from the half-split rotary layout transformers
  uses to the interleaved pairs llama.cpp's rope expects (per head; k_proj with the KV head count).
- qwen2, qwen3: no permutation (llama.cpp applies NeoX-style rope to these).
- gemma, gemma2, gemma3: RMSNorm weights are stored as (1 + w), since Gemma's norm multiplies by (1 + weight).
Tensor names come from the gguf package's own name map (`gguf.get_tensor_name_map`).

Types: 1-D tensors (norms, biases) stay F32 as in llama.cpp; 2-D tensors take the requested type, falling back to
F16 when a row is not a whole number of quantization blocks. For q4_0 / q5_0 the token embedding and output layer
are kept at Q8_0 (Note below). Quantization itself is the gguf package's (`gguf.quants.quantize`).

LLAMA_CPP_TYPES are mixes only llama.cpp's own quantizer makes (it picks a type per tensor): ft-desk writes the
file in F16 first and hands it to llama.cpp (trainer/export/llamacpp.py) when llama-cpp-python is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# HF model_type -> GGUF architecture name (llama.cpp's). Mistral and SmolLM are llama in llama.cpp.
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}
GEMMA_FAMILY = ("gemma", "gemma2", "gemma3")
# GGUF architectures llama.cpp can only run with the output layer tied to the token embedding.
ALWAYS_TIED = ("gemma", "gemma2")

TENSOR_TYPES = ("f16", "bf16", "q8_0", "q5_0", "q4_0")
# Made by llama.cpp's quantizer from an F16 file: our name -> the llama_ftype constant's suffix in llama.h.
LLAMA_CPP_TYPES = {"q4_k_m": "MOSTLY_Q4_K_M"}
# Note: q4_0 / q5_0 keep the token embedding and the output layer at Q8_0: those two tensors carry most of the
# quality loss of 4-5 bit files (llama.cpp's own mixes keep them at higher precision for the same reason).
KEEP_Q8_FOR_LOW_BITS = ("token_embd.weight", "output.weight")


class UnsupportedArchitecture(ValueError):
    pass


def gguf_arch(model_type: str) -> str:
    """The GGUF architecture for an HF model_type, or UnsupportedArchitecture naming what is supported."""
    if model_type not in ARCHITECTURES:
        families = "Llama (incl. Mistral, SmolLM), Qwen2/Qwen2.5, Qwen3, Gemma, Gemma 2, Gemma 3"
        raise UnsupportedArchitecture(
            f"GGUF export does not support model type {model_type!r}; supported: {families} "
            f"(model types {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[model_type]


def ggml_type(name: str):
    import gguf  # heavy-ish import, only when writing GGUF

    table = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q5_0": gguf.GGMLQuantizationType.Q5_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
    return table[name]


def file_type(tensor_type: str) -> int:
    """general.file_type for a file whose big tensors are `tensor_type`."""
    import gguf

    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[tensor_type]


def bytes_per_weight(tensor_type: str) -> float:
    # Note: q4_k_m is a mix (Q4_K, with Q6_K for the output layer and half of attn_v / ffn_down); llama.cpp
    # reports about 4.9 bits per weight for 7B models, so 5 bits is a safe size estimate.
    return {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_0": 22 / 32, "q4_0": 18 / 32,
            "q4_k_m": 5 / 8}[tensor_type]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the GGUF file: its name, shape (torch order) and type, and the HF tensor it comes from."""

    hf_name: str
    name: str
    shape: tuple[int, ...]
    type_name: str

    @property
    def nbytes(self) -> int:
        import gguf

        qtype = ggml_type(self.type_name)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n = 1
        for d in self.shape:
            n *= d
        return n // block * size


class NameMap:
    """HF tensor name -> GGUF tensor name, for one architecture and layer count."""

    def __init__(self, arch: str, n_layers: int) -> None:
        import gguf

        arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
        self._map = gguf.get_tensor_name_map(arch_enum, n_layers)

    def get(self, hf_name: str) -> str | None:
        base, _, suffix = hf_name.rpartition(".")
        if suffix not in ("weight", "bias"):
            return None
        mapped = self._map.get_name(base)
        return f"{mapped}.{suffix}" if mapped else None


def choose_type(gguf_name: str, shape: tuple[int, ...], requested: str) -> str:
    """Storage type of one tensor (see the module docstring)."""
    import gguf

    if len(shape) < 2:
        return "f32"
    wanted = requested
    if requested in ("q4_0", "q5_0") and gguf_name in KEEP_Q8_FOR_LOW_BITS:
        wanted = "q8_0"
    block, _ = gguf.GGML_QUANT_SIZES[ggml_type(wanted)]
    if shape[-1] % block:
        return "f16"
    return wanted


def permute_for_rope(weight, n_heads: int):
    """HF half-split rotary rows -> llama.cpp interleaved pairs, per head (works on weights and biases)."""
    shape = weight.shape
    return weight.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# llama.cpp takes some Gemma 2 / 3 settings from the model size or hard-codes them instead of reading them from the
# file: the attention scale (1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B models, which it recognises by
# layer count), which layers use the sliding window (every other one / five in six), and the sliding layers' rope
# (theta 10000, unscaled). Every released Gemma 2 / 3 checkpoint follows these; a model that does not would load
# in llama.cpp and quietly compute something else.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GEMMA_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}


def llama_cpp_mismatches(arch: str, config) -> list[str]:
    """What llama.cpp would compute differently from transformers for this config (see the comment above)."""
    if arch not in _GEMMA_27B_LAYERS:
        return []
    problems = []
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    assumed = config.hidden_size // heads if layers == _GEMMA_27B_LAYERS[arch] else head_dim
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and float(scalar) != float(assumed):
        problems.append(f"its attention scale is 1/sqrt(query_pre_attn_scalar={scalar}) where llama.cpp uses "
                        f"1/sqrt({assumed})")
    pattern = _GEMMA_SWA_PATTERN[arch]
    assumed_types = ["sliding_attention" if i % pattern < pattern - 1 else "full_attention" for i in range(layers)]
    layer_types = list(getattr(config, "layer_types", None) or assumed_types)
    if layer_types != assumed_types:
        problems.append(f"its sliding-window layers {layer_types} differ from llama.cpp's fixed pattern (one full "
                        f"attention layer in {pattern})")
    rope = getattr(config, "rope_parameters", None) or {}
    local = rope.get("sliding_attention") if isinstance(rope, dict) else None
    if arch == "gemma3" and local and (float(local.get("rope_theta", 10000.0)) != 10000.0
                                       or (local.get("rope_type") or "default") != "default"):
        problems.append(f"its sliding layers' rope {local} differs from llama.cpp's fixed theta 10000, unscaled")
    return problems


def transform(arch: str, hf_name: str, tensor, n_heads: int, n_kv_heads: int):
    """The tensor's value as llama.cpp stores it for this architecture (fp32 torch tensor in, same out)."""
    if arch == "llama":
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return permute_for_rope(tensor, n_heads)
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return permute_for_rope(tensor, n_kv_heads)
    if arch in GEMMA_FAMILY and hf_name.endswith("norm.weight"):
        return tensor + 1.0
    return tensor


def encode(tensor, type_name: str) -> Any:
    """The bytes of one tensor in its GGML type, as a numpy array the GGUF writer accepts."""
    import gguf
    import numpy as np

    data = tensor.detach().to("cpu").float().numpy()
    if type_name == "f32":
        return data.astype(np.float32)
    if type_name == "f16":
        return data.astype(np.float16)
    return gguf.quants.quantize(data, ggml_type(type_name))


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict[str, Any]):
    """Per-frequency divisors for Llama 3.x rope scaling, stored as the rope_freqs tensor llama.cpp reads.

    Frequencies whose wavelength is below the high-frequency cutoff keep their value, those above the
    low-frequency cutoff are divided by `factor`, and those in between are blended smoothly.
    """
    import math

    import torch

    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)
