"""Activations kept for the backward pass, stored in bf16 where the model computes in fp32 (a CPU run).

Without gradient checkpointing, autograd keeps every layer's inputs and intermediate results (norm inputs, the
LoRA inputs, q/k/v and the attention output, the MLP's gate and up projections) until the backward pass: on
SmolLM2-135M with 608 tokens per forward pass that is about 1 GB of fp32. `BF16SavedActivations` is a pair of
autograd saved-tensor hooks that keeps a bf16 copy of each such tensor instead and turns it back into fp32 when
the backward pass reads it. What changes and what does not:
- The forward pass, and so the loss, is computed from the fp32 tensors as before, to the bit. Only the backward
  pass sees the activations rounded to bf16 (8 mantissa bits), as under bf16 autocast, so the gradients move by
  about that rounding and the steps after the first follow the fp32 path closely rather than exactly.
- Kept in fp32: parameters (the LoRA weights and anything trainable), integer and boolean tensors, tensors of
  under MIN_ELEMENTS elements, and - given the model's feature widths - every tensor whose last dimension is not
  one of them: statistics such as the attention's log-sum-exp (its last dimension is the sequence) and the norms'
  scale factors, where bf16's rounding would move every recomputed attention weight, stay exact.
- A tensor saved by several ops (the normed hidden state feeds q, k and v, each through a reshaped view) is
  copied once: copies are shared per underlying tensor, shape, strides and version until `release()`.
Measured on 2 CPU cores, SmolLM2-135M QLoRA, 12 micro-batches of 4 x <=192 tokens: peak RSS 2.37 -> 1.87 GiB,
239 -> 253 tokens/s (less memory traffic); bench/train_levers.py measures it.
"""

from __future__ import annotations

import weakref
from typing import Any

MIN_ELEMENTS = 65536


class BF16SavedActivations:
    """Context manager around a forward pass whose saved fp32 activations are kept in bf16 until backward.

    Use one instance per training loop: enter it for each micro-batch's forward pass and call `release()` after
    that micro-batch's backward pass (it drops the table of shared copies; the copies themselves are freed by
    autograd as the backward pass consumes them). `stored_bytes` / `saved_bytes` count what was kept, for tests."""

    def __init__(self, widths: frozenset[int] | None = None, min_elements: int = MIN_ELEMENTS) -> None:
        import torch  # heavy import: a model is being trained

        self._torch = torch
        self.widths = widths
        self.min_elements = min_elements
        self._copies: dict[tuple, tuple[weakref.ref, Any]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.saved_bytes = 0  # fp32 bytes the forward passes asked autograd to keep
        self.stored_bytes = 0  # bytes actually kept for them

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self._hooks.__exit__(*exc)
        return False

    def release(self) -> None:
        self._copies.clear()

    def _pack(self, tensor):
        torch = self._torch
        if (tensor.dtype != torch.float32 or tensor.numel() < self.min_elements or tensor.dim() < 2
                or (self.widths is not None and tensor.shape[-1] not in self.widths)
                or isinstance(tensor, torch.nn.Parameter) or (tensor.requires_grad and tensor.is_leaf)):
            return tensor
        nbytes = tensor.numel() * 4
        self.saved_bytes += nbytes
        base = tensor._base if tensor._base is not None else tensor
        key = (id(base), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor._version)
        shared = self._copies.get(key)
        if shared is not None and shared[0]() is base:  # the same live tensor: id() cannot have been reused
            return shared[1]
        copy = _Bf16Copy(tensor.detach().to(torch.bfloat16, memory_format=torch.preserve_format))
        self._copies[key] = (weakref.ref(base), copy)
        self.stored_bytes += nbytes // 2
        return copy

    def _unpack(self, packed):
        if isinstance(packed, _Bf16Copy):
            return packed.tensor.to(self._torch.float32)
        return packed


class _Bf16Copy:
    """Marks a stored copy (a tensor saved as it was is returned unchanged)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor) -> None:
        self.tensor = tensor


def feature_widths(config) -> frozenset[int]:
    """The last dimensions of a transformers decoder's activations: hidden size, MLP width (per expert too),
    attention head width, and the q and k/v projection widths."""
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    widths = {hidden, getattr(config, "intermediate_size", None), getattr(config, "moe_intermediate_size", None),
              head_dim, heads * head_dim if heads and head_dim else None,
              kv_heads * head_dim if kv_heads and head_dim else None}
    return frozenset(w for w in widths if isinstance(w, int) and w > 0)


def saved_activations_dtype(setting: str, compute_dtype: str) -> str:
    """The dtype a run keeps its saved activations in for `train.saved_activations = setting`: auto is bfloat16
    exactly where the model computes in float32 (bf16/fp16 models keep theirs as they are)."""
    if setting == "auto":
        return "bfloat16" if compute_dtype == "float32" else compute_dtype
    return setting
