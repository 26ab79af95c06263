"""What `ft-desk export` can write, said once: the CLI's choices, the export pipeline's checks and the TUI's
Export screen all read these. Light to import (the TUI does): no heavy library.
"""

from __future__ import annotations

from dataclasses import dataclass

from ft_desk.quant.gguf_tensors import LLAMA_CPP_TYPES, TENSOR_TYPES


@dataclass(frozen=True)
class ExportFormat:
    name: str
    """The value of `--format`."""
    label: str
    """How the TUI names it."""
    description: str
    """One line on what the user gets."""


FORMATS = (
    ExportFormat("adapter", "adapter", "PEFT adapter + tokenizer: small; load it onto the base model with peft"),
    ExportFormat("merged", "merged",
                 "one standalone model (safetensors, Hugging Face layout): works with plain transformers"),
    ExportFormat("gguf", "GGUF", "one .gguf file for llama.cpp and friends, written without llama.cpp"),
    ExportFormat("ollama", "Ollama",
                 "GGUF + a Modelfile with the chat template and stop tokens; prints the `ollama create` line"),
)
FORMAT_NAMES = tuple(f.name for f in FORMATS)
GGUF_FORMATS = ("gguf", "ollama")
"""Formats that write a GGUF file (and take `--gguf-type`)."""
LLAMA_CPP_ONLY_TYPES = tuple(LLAMA_CPP_TYPES)
"""GGUF types made by llama.cpp's own quantizer: offered only where llama-cpp-python is installed."""
GGUF_TYPES = TENSOR_TYPES + LLAMA_CPP_ONLY_TYPES
MERGED_DTYPES = ("bf16", "fp16")


def default_gguf_type(fmt: str) -> str:
    """The GGUF tensor type written when none is asked for: q8_0 for Ollama (its usual size), f16 for a GGUF."""
    return "q8_0" if fmt == "ollama" else "f16"
