"""The real SmolLM2-135M-Instruct for benchmarks, as a plain transformers folder both tools can load.

tests/real_model.py fetches the published Q4_1 GGUF (cached outside the repo). transformers reads it with its
`gguf_file` support (dequantized); `smollm2_folder()` saves that model once, in bf16 safetensors with its
tokenizer, next to the GGUF, so every benchmark run gives ft-desk and the baseline the same weights without
paying the ~20 s GGUF read again. Weights never enter the repository.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDER_NAME = "SmolLM2-135M-Instruct-bf16"


def smollm2_folder() -> Path:
    """A local folder holding SmolLM2-135M-Instruct (bf16 safetensors + tokenizer), made from the real GGUF."""
    sys.path.insert(0, str(ROOT))
    from tests.real_model import real_model_gguf

    gguf = real_model_gguf()
    target = gguf.parent / FOLDER_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch  # heavy imports: only when converting
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=gguf.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        # A model read from GGUF refuses save_pretrained (it counts as quantized): copy the weights into a plain one.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(smollm2_folder())
