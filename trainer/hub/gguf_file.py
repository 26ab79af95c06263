"""What a GGUF file (llama.cpp, LM Studio, an Ollama blob) holds, read from its header with the `gguf` package:
architecture, sizes, tensor types and parameter count - enough to plan a run before anything is converted.

Nothing here imports torch or transformers, and no tensor data is read (the file is memory-mapped; only the
header and the tensor table are parsed). A file that is not a GGUF, is damaged or truncated is a ModelError with
one sentence saying which. The sizes are the standard llama.cpp keys (`<arch>.embedding_length`, `.block_count`,
`.attention.head_count`, ...), turned into the config.json fields the memory planner reads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft_desk.trainer.errors import ModelError

MAGIC = b"GGUF"
# Note: GGUF architecture names that differ from the transformers model_type the planner knows them by.
ARCH_TO_MODEL_TYPE = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# Dtypes a GGUF tensor type is stored as when the file is imported (see storage_dtype).
_PLAIN_TYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


@dataclass(frozen=True)
class GGUFFacts:
    path: Path
    size_bytes: int
    architecture: str
    name: str | None
    file_type: str
    """The weights' type as llama.cpp names the file (Q4_1, Q4_K_M, F16...)."""
    tensor_types: dict[str, int]
    """GGML type -> number of tensors stored in it."""
    params: int
    config: dict[str, Any] = field(repr=False)
    """config.json-style sizes for the memory planner (model_type, hidden_size, layers, heads, vocab...)."""
    has_chat_template: bool = False

    @property
    def quantized(self) -> bool:
        return self.file_type.upper() not in _PLAIN_TYPES

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "size_bytes": self.size_bytes, "architecture": self.architecture,
                "name": self.name, "file_type": self.file_type, "tensor_types": dict(self.tensor_types),
                "params": self.params, "has_chat_template": self.has_chat_template,
                "storage_dtype": storage_dtype(self)}


def is_gguf_file(path: Path) -> bool:
    """Whether `path` is a file that starts with the GGUF magic bytes (never raises)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def looks_like_gguf_path(name: str) -> bool:
    """Whether a model name is meant as a GGUF file: it ends in .gguf (whether or not it exists)."""
    return name.lower().endswith(".gguf")


def _value(field_: Any) -> Any:
    """A header field's value: a string or a number; an array is None (its length is `_array_length`)."""
    import gguf  # light: numpy only

    types = list(field_.types)
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        return None
    part = field_.parts[field_.data[0]]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    value = part[0]
    return value.item() if hasattr(value, "item") else value


def _label(file_type: int | None, counts: Counter) -> str:
    """llama.cpp's name for the file's weight type: general.file_type when present, else the commonest 2-D type."""
    import gguf

    if file_type is not None:
        try:
            name = gguf.LlamaFileType(int(file_type)).name
        except ValueError:
            name = ""
        for prefix in ("MOSTLY_", "ALL_"):
            if name.startswith(prefix):
                return name[len(prefix):]
    return counts.most_common(1)[0][0] if counts else "unknown"


def read_gguf(path: Path | str) -> GGUFFacts:
    """The header facts of a GGUF file; a ModelError (one sentence) when it is not one, is damaged or truncated."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist", hint="check the path")
    size = path.stat().st_size
    if not is_gguf_file(path):
        raise ModelError(f"{path} is not a GGUF file (it does not start with the GGUF signature)",
                         hint="give a .gguf file from llama.cpp, LM Studio or Ollama, a model folder or a Hub id")
    import gguf  # light: numpy only

    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # noqa: BLE001 - the reader raises many types for a damaged or cut-off header
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ModelError(f"{path} is truncated or damaged: its GGUF header cannot be read ({reason})",
                         hint="download or copy the file again") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelError(f"{path} is truncated: its tensors need {end:,} bytes but the file has {size:,}",
                         hint="download or copy the file again (an interrupted download leaves a short file)")
    fields = {key: _value(f) for key, f in reader.fields.items()}
    arch = str(fields.get("general.architecture") or "")
    if not arch:
        raise ModelError(f"{path} is a GGUF file without general.architecture, so it is not a model",
                         hint="give the GGUF of a text-generation model")
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    weights = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    params = sum(int(t.n_elements) for t in reader.tensors)
    tensor_names = {t.name for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)

    def key(suffix: str) -> Any:
        return fields.get(f"{arch}.{suffix}")

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens.data) if tokens is not None else None)
    if not vocab and embed is not None:
        vocab = int(embed.shape[-1])
    heads = key("attention.head_count")
    if not isinstance(heads, int):  # a per-layer array (some hybrid models): the planner assumes hidden / 64
        heads = None
    config = {
        "model_type": ARCH_TO_MODEL_TYPE.get(arch, arch),
        "hidden_size": key("embedding_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv") or heads,
        "intermediate_size": key("feed_forward_length"),
        "vocab_size": vocab,
        "max_position_embeddings": key("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": None,
    }
    head_dim = key("attention.key_length")
    if head_dim:
        config["head_dim"] = head_dim
    experts = key("expert_count")
    if experts:
        config["num_local_experts"] = experts
    config = {k: v for k, v in config.items() if v is not None}
    facts = GGUFFacts(path=path, size_bytes=size, architecture=arch, name=fields.get("general.name"),
                      file_type=_label(fields.get("general.file_type"), weights or counts),
                      tensor_types=dict(counts.most_common()), params=params, config=config,
                      has_chat_template=bool(fields.get("tokenizer.chat_template")))
    facts.config["torch_dtype"] = storage_dtype(facts)
    return facts


def storage_dtype(facts: GGUFFacts) -> str:
    """The dtype an imported GGUF's weights are stored in: the file's own when it is F16, BF16 or F32, else bfloat16.

    Why bfloat16 for quantized files rather than float32: dequantized values are `scale * q (+ min)` with an f16
    scale, so only float32 holds them exactly, but bf16's rounding is small against the rounding the file already
    carries. Measured on SmolLM2-135M-Instruct Q4_1 (per block of 32, error / quantization step): Q4_1 tensors mean
    0.3%, max 3.5% of a step; its Q8_0 embedding mean 4.7%, max 46% of a step. QLoRA then re-quantizes the base to
    NF4, a whole step of error again. Against that, bfloat16 halves the folder and the load against float32, is the
    dtype GPU training loads and computes in (no conversion at load), and widens exactly to fp32 on CPU runs.
    """
    return _PLAIN_TYPES.get(facts.file_type.upper(), "bfloat16")


def dequantized_note(facts_or_type: GGUFFacts | str, dtype: str) -> str:
    """The plain sentence every surface shows: where the weights came from and what they became."""
    label = facts_or_type.file_type if isinstance(facts_or_type, GGUFFacts) else str(facts_or_type)
    if label.upper() in _PLAIN_TYPES:
        return f"weights read from the GGUF's {label} tensors as {dtype} (not quantized, nothing lost)"
    return f"weights dequantized from the GGUF's {label} to {dtype}: they keep the {label} rounding"
