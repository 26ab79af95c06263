"""The numbers of merging a LoRA adapter: the base weight exactly as training saw it, plus the update in fp32.

Contract:
- `training_view(weight, recipe)` is the weight a QLoRA run computed with. transformers loads the checkpoint
  tensor in the run's weight dtype and bitsandbytes quantizes it (`quantize_4bit`, NF4 or FP4, double quant,
  blocksize 64); every forward pass then uses `dequantize_4bit` of that. Running the same two functions on the same
  input here gives a bit-identical tensor (tests compare it with the loaded 4-bit layer), one tensor at a time.
- `AdapterUpdates.from_state(...)` reads a peft LoRA state dict (keys as `save_pretrained` writes them) into one
  update per base weight: a low-rank delta `(B @ A) * scale` (scale = alpha / r, or alpha / sqrt(r) for rsLoRA,
  with peft's per-module rank/alpha patterns), a DoRA magnitude, a full replacement (modules_to_save, saved
  embedding layers), or replaced rows (trainable tokens). Anything else is refused by name.
- `merge_weight(...)` applies one update in fp32; the caller casts the result to the output dtype once.
Stays free of file I/O so the callers decide how to stream (trainer/export/merged.py reads and writes shards).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ft_desk.quant.policy import torch_dtype

# Note: bitsandbytes' Params4bit quantizes in blocks of 64 values unless told otherwise, and transformers'
# BitsAndBytesConfig never tells it otherwise. A test patches this and sees the merge stop matching training.
BNB_BLOCKSIZE = 64

_PREFIX = "base_model.model."


class MergeError(ValueError):
    """The adapter holds something this merge cannot reproduce; the message names it."""


@dataclass(frozen=True)
class QuantRecipe:
    """How training quantized the base: enough to recompute every 4-bit weight bit for bit."""

    quant_type: str = "nf4"
    double_quant: bool = True
    load_dtype: str = "float32"
    """dtype transformers loaded the checkpoint in before bitsandbytes quantized it."""
    device: str = "cpu"
    """Where to run bitsandbytes (the device the run trained on, when it is here)."""
    blocksize: int = BNB_BLOCKSIZE


def training_view(weight, recipe: QuantRecipe):
    """`weight` (a checkpoint tensor) quantized and dequantized exactly as the QLoRA run did, as fp32 on CPU."""
    import bitsandbytes.functional as F  # heavy import: only qlora exports reach this
    import torch

    w = weight.to(torch_dtype(recipe.load_dtype)).contiguous().to(recipe.device)
    packed, state = F.quantize_4bit(
        w,
        blocksize=recipe.blocksize,
        compress_statistics=recipe.double_quant,
        quant_type=recipe.quant_type,
        quant_storage=torch.uint8,
    )
    del w
    return F.dequantize_4bit(packed, state).to("cpu", torch.float32)


@dataclass
class WeightUpdate:
    """Everything the adapter changes about one base weight (`target` is its checkpoint name)."""

    target: str
    lora_a: Any = None
    lora_b: Any = None
    scale: float = 1.0
    embedding: bool = False
    """LoRA on an nn.Embedding: A is (r, vocab), B is (dim, r), the delta is (B @ A).T."""
    fan_in_fan_out: bool = False
    magnitude: Any = None
    """DoRA magnitude vector (one per output row)."""
    replacement: Any = None
    """A full new tensor (modules_to_save, or an embedding layer peft saved because the vocabulary grew)."""
    rows: Any = None
    row_values: Any = None
    """Trainable tokens: these row indices take these values (peft writes them with index_copy)."""

    @property
    def has_lora(self) -> bool:
        return self.lora_a is not None


def lora_delta(update: WeightUpdate):
    """(B @ A) * scale in fp32, shaped like the base weight."""
    a = update.lora_a.float()
    b = update.lora_b.float()
    delta = (b @ a) * update.scale
    if update.embedding or update.fan_in_fan_out:
        delta = delta.T
    return delta


def merge_weight(base, update: WeightUpdate | None):
    """The merged fp32 tensor for one base weight (base is fp32 already, as training saw it)."""
    import torch

    if update is None:
        return base
    merged = update.replacement.float().clone() if update.replacement is not None else base
    if update.rows is not None:
        merged = merged.clone() if merged is base else merged
        merged.index_copy_(0, update.rows.long(), update.row_values.float())
    if update.has_lora:
        delta = lora_delta(update)
        if tuple(delta.shape) != tuple(merged.shape):
            raise MergeError(
                f"adapter update for {update.target} has shape {tuple(delta.shape)} but the weight is "
                f"{tuple(merged.shape)}; the adapter was trained on a different model"
            )
        merged = merged + delta
        if update.magnitude is not None:
            # DoRA: W' = m * (W + dW) / ||W + dW|| with the norm taken per output row, as peft merges it.
            norm = torch.linalg.norm(merged, dim=1)
            merged = merged * (update.magnitude.float() / norm).unsqueeze(1)
    return merged


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class AdapterUpdates:
    """All updates of one adapter, keyed by the base checkpoint tensor they change."""

    updates: dict[str, WeightUpdate] = field(default_factory=dict)
    use_dora: bool = False

    def get(self, name: str) -> WeightUpdate | None:
        return self.updates.get(name)

    @classmethod
    def from_state(cls, state: dict[str, Any], config: dict[str, Any]) -> "AdapterUpdates":
        """Parse a peft LoRA state dict (as saved) and its adapter_config.json."""
        import torch

        if config.get("peft_type", "LORA") != "LORA":
            raise MergeError(f"only LoRA adapters can be merged, this one is {config.get('peft_type')}")
        if config.get("lora_bias"):
            raise MergeError("adapters trained with lora_bias=True cannot be merged by ft-desk")
        r_default = int(config.get("r", 8))
        alpha_default = float(config.get("lora_alpha", r_default))
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        rslora = bool(config.get("use_rslora"))
        fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        token_indices = config.get("trainable_token_indices")

        out = cls(use_dora=bool(config.get("use_dora")))

        def entry(target: str) -> WeightUpdate:
            if target not in out.updates:
                out.updates[target] = WeightUpdate(target=target, fan_in_fan_out=fan_in_fan_out)
            return out.updates[target]

        def scale_for(module: str) -> float:
            r = int(_pattern_value(rank_pattern, module, r_default))
            alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
            return alpha / math.sqrt(r) if rslora else alpha / r

        for key, tensor in state.items():
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            if name.endswith(".lora_A.weight"):
                module = name[: -len(".lora_A.weight")]
                upd = entry(module + ".weight")
                upd.lora_a, upd.scale = tensor, scale_for(module)
            elif name.endswith(".lora_B.weight"):
                entry(name[: -len(".lora_B.weight")] + ".weight").lora_b = tensor
            elif name.endswith(".lora_embedding_A"):
                module = name[: -len(".lora_embedding_A")]
                upd = entry(module + ".weight")
                upd.lora_a, upd.scale, upd.embedding = tensor, scale_for(module), True
            elif name.endswith(".lora_embedding_B"):
                entry(name[: -len(".lora_embedding_B")] + ".weight").lora_b = tensor
            elif name.endswith(".lora_magnitude_vector"):
                entry(name[: -len(".lora_magnitude_vector")] + ".weight").magnitude = tensor
            elif name.endswith(".token_adapter.trainable_tokens_delta"):
                module = name[: -len(".token_adapter.trainable_tokens_delta")]
                indices = token_indices
                if isinstance(indices, dict):
                    leaf = module.rsplit(".", 1)[-1]
                    indices = indices.get(leaf, indices.get(module))
                if not indices:
                    raise MergeError(f"adapter has trainable tokens for {module} but no token indices in its config")
                upd = entry(module + ".weight")
                upd.rows, upd.row_values = torch.tensor(list(indices)), tensor
            elif ".lora_" in name or ".token_adapter." in name:
                raise MergeError(f"adapter tensor {key} is of a kind ft-desk cannot merge")
            else:
                # A whole tensor: modules_to_save, or an embedding peft saved because the vocabulary changed.
                target = name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
                entry(target).replacement = tensor
        for upd in out.updates.values():
            if (upd.lora_a is None) != (upd.lora_b is None):
                raise MergeError(f"adapter has only one of lora_A / lora_B for {upd.target}; the file is incomplete")
            if upd.magnitude is not None and upd.embedding:
                raise MergeError(f"DoRA on an embedding layer ({upd.target}) cannot be merged by ft-desk")
        return out
