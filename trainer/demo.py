"""The embedded default: a tiny Llama-architecture model built locally, offline, in a couple of seconds.

`ensure_demo_model()` builds (once, into the per-user cache) a randomly initialised LlamaForCausalLM and a
byte-level BPE tokenizer trained with `tokenizers` on the bundled sample data, with a ChatML chat template.
Widths are multiples of 32 so bitsandbytes' CPU 4-bit kernels accept every layer. The same builder makes the
tiny models the tests use (`build_tiny_model`), so tests and demo exercise one code path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

from ft_desk.trainer.atomic import fsync_tree
from ft_desk.trainer.paths import cache_home

DEMO_MODEL_NAME = "demo"
"""`model.name` of the embedded tiny model."""
DEMO_DATA_NAME = "demo"
"""`data.train_file` of the bundled sample data."""
DEMO_PRESET = "demo"
"""The strategy preset that trains the demo."""


def is_demo_model(name: str | None) -> bool:
    return name == DEMO_MODEL_NAME


def is_demo_data(name: str | None) -> bool:
    return name == DEMO_DATA_NAME

# Bumped when the demo model's shape or tokenizer changes, so a stale cached build is replaced.
DEMO_BUILD_VERSION = 2

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class TinyShape:
    """Shape of a locally built model. Every width is a multiple of 32 (bitsandbytes CPU kernels need it)."""

    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    architecture: str = "llama"


DEMO_SHAPE = TinyShape()


def demo_data_path() -> Path:
    return Path(str(resources.files("ft_desk.trainer.assets") / "support_desk.jsonl"))


def retention_probe_path() -> Path:
    return Path(str(resources.files("ft_desk.trainer.assets") / "general_english.txt"))


def _demo_corpus() -> Iterable[str]:
    path = demo_data_path()
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            for message in row.get("messages", []):
                yield message["content"]
    probe = retention_probe_path()
    if probe.exists():
        yield from probe.read_text(encoding="utf-8").splitlines()


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> None:
    """Train a byte-level BPE tokenizer on `texts` and save it as a transformers fast tokenizer in out_dir."""
    # Heavy import kept local: tokenizers/transformers are only needed when building.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) or ["hello world"], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        model_max_length=4096,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)


def _model_config(shape: TinyShape, tokenizer_vocab: int, eos_id: int, pad_id: int):
    import transformers

    common = dict(
        vocab_size=max(shape.vocab_size, tokenizer_vocab),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )
    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "gemma": ("GemmaConfig", "GemmaForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
        "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
        "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    }
    if shape.architecture not in classes:
        raise ValueError(f"architecture must be one of {', '.join(classes)}, got {shape.architecture!r}")
    config_cls, model_cls = (getattr(transformers, n) for n in classes[shape.architecture])
    if shape.architecture.startswith("gemma") or shape.architecture == "qwen3":
        common["head_dim"] = shape.hidden_size // shape.num_attention_heads
    return config_cls(**common), model_cls


def build_tiny_model(
    out_dir: Path,
    shape: TinyShape = DEMO_SHAPE,
    texts: Iterable[str] | None = None,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a randomly initialised model + trained tokenizer to out_dir (standard Hugging Face layout)."""
    import torch  # heavy import, only when building

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(texts if texts is not None else _demo_corpus(), shape.vocab_size, out_dir)
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config, model_cls = _model_config(shape, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def demo_cache_dir() -> Path:
    return cache_home() / f"demo-model-v{DEMO_BUILD_VERSION}"


def ensure_demo_model() -> Path:
    """The demo model folder, building it first if it is missing (atomic: built in a temp dir, then renamed)."""
    target = Path(os.environ.get("FT_DESK_DEMO_MODEL_DIR", "") or demo_cache_dir())
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=target.parent))
    try:
        build_tiny_model(tmp)
        fsync_tree(tmp)  # the files are on disk before the folder is renamed into place
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # another process won the race otherwise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
