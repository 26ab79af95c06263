"""Memory planner: predict a run's peak memory from the model's sizes (its config.json) and the run's settings,
before any weight is downloaded.

The inputs are plain data: a parsed config.json (or a ModelShape) and a PlanInputs; trainer.planning turns a
RunConfig and the device into PlanInputs, reads config.json and works out which settings to change. quant/ sits
below trainer/ and imports nothing of it but trainer.errors.

The estimate describes ft-desk's own training loop (trainer/training/loop.py), component by component:
  - the base weights as they sit in memory (NF4 blocks + absmax + double-quant constants for qlora; the 16-bit
    or fp32 parts: embeddings, lm_head, norms),
  - trainable parameters with their gradients and AdamW's two fp32 states,
  - the activations autograd saves for backward, per decoder layer, with and without gradient checkpointing
    (layer inputs only, plus one layer recomputed at a time), including the attention mask SDPA materialises,
  - the loss: lm_head + cross-entropy in chunks of `train.loss_chunk_tokens` positions, so the logits term is
    chunk x vocab, not batch x length x vocab (the plain-trainer formula is kept in `logits_bytes` for comparison),
  - then the layers' backward (gradients of the widest tensors, one dequantized weight, the recomputed layer):
    it runs after the loss has freed its tensors, so only what it needs beyond the loss peak is added,
  - on CPU with QLoRA, the training samples (before and after training): generation computes from a dense copy
    of the 4-bit weights where RAM allows, next to the resident weights and optimizer states,
  - framework overhead (CUDA context, or the Python/torch runtime on CPU); on CPU also the load-time peak (the
    checkpoint is read while weights are converted and quantized) and, unless the trainer caps glibc's
    allocator, the freed activation memory glibc keeps between steps.
Everything is arithmetic on plain numbers: no torch import, so `ft-desk plan` answers in milliseconds. Constants
that were set from measurements carry a "Note:" comment saying what was measured and why the value holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ft_desk.quant.device import CPU_MMAP_THRESHOLD, DeviceFacts, unified_budget
from ft_desk.quant.policy import DENSE_RAM_SHARE, four_bit_bytes
from ft_desk.trainer.errors import ModelError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Decoder families whose layer structure the planner models exactly: Llama-style pre-norm blocks (RMSNorm,
# q/k/v/o projections with rotary embeddings, gated MLP). Value: (tied embeddings when config.json is silent,
# query/key norms, fused qkv and gate_up projections).
KNOWN_ARCHITECTURES: dict[str, tuple[bool, bool, bool]] = {
    "llama": (False, False, False),
    "mistral": (False, False, False),
    "qwen2": (False, False, False),
    "qwen3": (False, True, False),
    "gemma": (True, False, False),
    "gemma2": (True, False, False),
    "gemma3_text": (True, True, False),
    "phi3": (False, False, True),
    "granite": (True, False, False),
    "olmo2": (False, True, False),
    "smollm3": (True, False, False),
}

# Note: an architecture the planner does not model (other block layouts, MoE routing, vision towers) gets the
# Llama-style estimate of its sizes plus this margin, and the plan says so. Across the known families the
# activation layouts differ by under 20% for the same sizes (extra norms, biases, fused projections).
CONSERVATIVE_MARGIN = 0.25

# Verdict thresholds as a share of the device budget.
# Note: 0.85 leaves room for the planner's error (the bench targets 15%) and allocator fragmentation.
FITS_SHARE = 0.85

# Note: a CUDA context plus cuBLAS/cuDNN workspaces and kernel images takes 0.3-0.8 GB depending on card,
# driver and torch build (not counted by torch.cuda.max_memory_allocated, counted by nvidia-smi). MPS has no
# separate context worth counting.
CUDA_CONTEXT_BYTES = 600 * 1024**2

# Note: resident memory of a Python process after `import torch, transformers, peft, bitsandbytes` (Linux,
# torch 2.13 CPU build: ~390 MiB measured), plus what a run adds beyond its tensors: the tokenizer, the model's
# Python objects and modeling code, data, torch's per-thread kernel scratch, optimizer bookkeeping (measured:
# 25 MiB above the weights right after loading, and 10-20 MiB more by the peak of the first steps).
CPU_IMPORT_BYTES = 390 * 1024**2
CPU_RUNTIME_BYTES = 40 * 1024**2

# Note: chunk x vocab fp32 tensors alive while one lm_head + cross-entropy chunk runs backward: the log-softmax
# output autograd keeps, the gradient of the log-probabilities and the gradient of the logits (the logits
# themselves are freed once log-softmax has run). Measured on CPU: 2.9 chunk-sized tensors at the backward
# peak, 2 in a no-grad forward. One more when logits are 16-bit (the fp32 copy) and one more with final-logit
# softcapping (the tanh output).
LOSS_CHUNK_COPIES = 3

# Note: gradients alive while one decoder layer runs backward: about three tensors as wide as the MLP
# (d gate, d up and d of their product) and two as wide as the residual stream (the incoming gradient and the
# one being accumulated for the layer input).
BACKWARD_MLP_COPIES = 3
BACKWARD_RESIDUAL_COPIES = 2

GIB = 1024**3

# glibc never serves blocks of 32 MiB or more from its heaps (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit).
GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024**2


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that memory depends on, read from config.json."""

    model_type: str
    known: bool
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    qk_norm: bool = False
    fused_projections: bool = False
    attention_bias: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    checkpoint_dtype: str = "bfloat16"
    logit_softcap: bool = False
    notes: tuple[str, ...] = ()

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_layers(self) -> list[tuple[str, int, int, int]]:
        """(module name, in_features, out_features, copies) of every nn.Linear in one decoder layer."""
        h, q, kv = self.hidden_size, self.q_width, self.kv_width
        if self.fused_projections:
            attn = [("qkv_proj", h, q + 2 * kv, 1), ("o_proj", q, h, 1)]
        else:
            attn = [("q_proj", h, q, 1), ("k_proj", h, kv, 1), ("v_proj", h, kv, 1), ("o_proj", q, h, 1)]
        if self.num_experts:
            i = self.expert_intermediate_size or self.intermediate_size
            mlp = [("gate_proj", h, i, self.num_experts), ("up_proj", h, i, self.num_experts),
                   ("down_proj", i, h, self.num_experts), ("gate", h, self.num_experts, 1)]
        elif self.fused_projections:
            mlp = [("gate_up_proj", h, 2 * self.intermediate_size, 1), ("down_proj", self.intermediate_size, h, 1)]
        else:
            i = self.intermediate_size
            mlp = [("gate_proj", h, i, 1), ("up_proj", h, i, 1), ("down_proj", i, h, 1)]
        return attn + mlp

    @property
    def linear_params(self) -> int:
        """Weights of all decoder-layer linears (what 4-bit quantization applies to)."""
        return self.num_layers * sum(i * o * n for _, i, o, n in self.linear_layers())

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head, norms and biases: kept in 16-bit (or fp32) in every method."""
        emb = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        norms = self.num_layers * (2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0))
        bias = self.num_layers * (self.q_width + 2 * self.kv_width) if self.attention_bias else 0
        return emb + norms + self.hidden_size + bias

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    @property
    def largest_tensor(self) -> int:
        widest = max(i * o for _, i, o, _ in self.linear_layers())
        return max(widest, self.vocab_size * self.hidden_size)


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def model_shape(config: dict[str, Any], name: str = "the model") -> ModelShape:
    """Sizes from a parsed config.json; raises ModelError when the basic sizes are missing."""
    notes: list[str] = []
    model_type = str(config.get("model_type", "unknown"))
    text = config
    if isinstance(config.get("text_config"), dict):
        # Multimodal wrappers (Gemma 3, Llava, Qwen-VL...) describe the language model in text_config.
        text = {**config, **config["text_config"]}
        model_type = str(config["text_config"].get("model_type", model_type))
        if "vision_config" in config:
            notes.append("the vision tower is not counted; only the language model is planned")
    known = model_type in KNOWN_ARCHITECTURES and "vision_config" not in config
    tied_default, qk_norm, fused = KNOWN_ARCHITECTURES.get(model_type, (False, False, False))
    hidden = _first(text, "hidden_size", "n_embd", "d_model", "dim")
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    vocab = _first(text, "vocab_size", "padded_vocab_size")
    missing = [k for k, v in (("hidden_size", hidden), ("num_hidden_layers", layers), ("vocab_size", vocab))
               if not isinstance(v, int) or v <= 0]
    if missing:
        raise ModelError(
            f"config.json of {name} has no usable {', '.join(missing)}, so its memory cannot be planned",
            hint="check that it is a text-generation (causal LM) model",
        )
    heads = int(_first(text, "num_attention_heads", "n_head", "num_heads", default=max(1, hidden // 64)))
    kv_heads = int(_first(text, "num_key_value_heads", "num_kv_heads", "n_head_kv", default=heads))
    if text.get("multi_query"):
        kv_heads = 1
    head_dim = int(_first(text, "head_dim", default=hidden // heads) or hidden // heads)
    intermediate = int(_first(text, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", default=0) or 0)
    if not intermediate:
        intermediate = 4 * hidden
        notes.append("intermediate_size missing: assumed 4 x hidden_size")
    experts = int(_first(text, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
    if experts:
        known = False
        notes.append(f"mixture of experts ({experts} experts): every expert's weights are counted")
    tied = text.get("tie_word_embeddings")
    if tied is None:
        tied = tied_default if known else False
    dtype = str(_first(text, "torch_dtype", "dtype", default="bfloat16"))
    return ModelShape(
        model_type=model_type,
        known=known,
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=intermediate,
        num_layers=int(layers),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        tied_embeddings=bool(tied),
        qk_norm=qk_norm,
        fused_projections=fused,
        attention_bias=bool(_first(text, "attention_bias", "qkv_bias", default=model_type == "qwen2")),
        num_experts=experts,
        experts_per_token=int(_first(text, "num_experts_per_tok", "top_k", default=0) or 0),
        expert_intermediate_size=int(_first(text, "moe_intermediate_size", default=0) or 0),
        checkpoint_dtype=dtype if dtype in DTYPE_BYTES else "bfloat16",
        logit_softcap=bool(text.get("final_logit_softcapping")),
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class Suggestion:
    """One change that lowers the estimate: what it is, the --set overrides that apply it, the new total."""

    description: str
    overrides: tuple[str, ...]
    total_bytes: int
    fits: bool | None = None  # None when the device budget is unknown

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, "overrides": list(self.overrides),
                "set_args": " ".join(f"--set {o}" for o in self.overrides),
                "total_bytes": self.total_bytes, "fits": self.fits}


@dataclass
class MemoryPlan:
    """A run's predicted peak memory, by component, and the verdict against the device; `suggestions` are
    filled in by trainer.planning (plan_memory leaves them empty)."""

    components: list[tuple[str, int]]
    total_bytes: int
    verdict: str  # "fits" | "tight" | "does not fit" | "unknown device"
    conservative: bool
    suggestions: list[Suggestion]
    device_budget_bytes: int | None
    device: str = "cpu"
    compute_dtype: str = "float32"
    method: str = "qlora"
    model_type: str = ""
    params: int = 0
    trainable_params: int = 0
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def first_fit(self) -> Suggestion | None:
        return next((s for s in self.suggestions if s.fits), None)

    def component(self, label_start: str) -> int:
        """Bytes of the first component whose label starts with `label_start` (0 when absent)."""
        return next((b for label, b in self.components if label.startswith(label_start)), 0)

    def to_dict(self) -> dict[str, Any]:
        first = self.first_fit
        return {
            "components": [{"label": label, "bytes": b} for label, b in self.components],
            "total_bytes": self.total_bytes,
            "verdict": self.verdict,
            "conservative": self.conservative,
            "device": self.device,
            "device_budget_bytes": self.device_budget_bytes,
            "compute_dtype": self.compute_dtype,
            "method": self.method,
            "model_type": self.model_type,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "settings": self.settings,
            "suggestions": [s.to_dict() for s in self.suggestions],
            "first_fit": first.to_dict() if first else None,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class PlanInputs:
    """The settings of one run that its peak memory depends on, as plain values (trainer.planning derives them
    from a RunConfig and the device, the way `ft-desk train` resolves them)."""

    device: str
    """Device type the run trains on: "cuda", "mps" or "cpu"."""
    method: str
    """"qlora" (4-bit base + LoRA), "lora" (16-bit base + LoRA) or "full" (every weight trained)."""
    compute_dtype: str
    """dtype of matmuls and activations ("float32", "bfloat16", "float16"), already resolved (never "auto")."""
    weights_dtype: str
    """dtype of the parts of the model that are not 4-bit (all of it for lora; float32 for full)."""
    micro_batch_size: int
    """Rows per forward/backward pass."""
    max_length: int
    """Tokens per row (packed rows are assumed full)."""
    grad_accum: int
    """Accumulation steps per optimizer step; costs no memory, reported with the plan's settings."""
    gradient_checkpointing: bool
    """Keep only each decoder layer's input for backward and recompute the layer."""
    packing: bool
    """Rows are packed to max_length (a note on the plan; the estimate always assumes full rows)."""
    loss_chunk_tokens: int
    """Positions per lm_head + cross-entropy chunk of the loss."""
    lora_r: int
    """LoRA rank (unused for full fine-tuning)."""
    target_modules: tuple[str, ...]
    """Module names LoRA attaches to, or ("all-linear",)."""
    lora_dropout: float
    """LoRA dropout probability: above 0 each adapter keeps its dropped-out input for backward."""
    use_dora: bool
    """DoRA (weight-decomposed LoRA) on top of LoRA."""
    double_quant: bool
    """4-bit scales quantized again (qlora only)."""
    cpu_allocator_capped: bool = True
    """Whether a CPU run pins glibc's mmap threshold (quant.device.cap_cpu_allocator); off adds retained heap."""
    saved_activations: str = ""
    """dtype the activations kept for backward are stored in ("": the compute dtype; a CPU run keeps bfloat16)."""
    sample_prompts: int = 0
    """Held-out prompts the run answers before and after training (eval.sample_prompts)."""
    max_new_tokens: int = 0
    """Tokens each of those answers may take (eval.max_new_tokens)."""
    available_memory: int = 0
    """Memory free for the run before it starts (0: unknown); decides whether CPU samples get a dense copy."""

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch."""
        return self.micro_batch_size * self.max_length


def _targeted(shape: ModelShape, targets: tuple[str, ...]) -> list[tuple[str, int, int, int]]:
    """The decoder-layer linears LoRA attaches to (`all-linear`: every one; lm_head never)."""
    layers = shape.linear_layers()
    if "all-linear" in targets:
        return [layer for layer in layers if layer[0] != "gate"]  # MoE routers are tiny and left out by peft
    wanted = set(targets)
    # Fused projections answer to the names of their parts, as users write q_proj/v_proj for any model.
    aliases = {"qkv_proj": {"q_proj", "k_proj", "v_proj"}, "gate_up_proj": {"gate_proj", "up_proj"}}
    return [layer for layer in layers if layer[0] in wanted or aliases.get(layer[0], set()) & wanted]


def lora_params(shape: ModelShape, r: int, targets: tuple[str, ...], dora: bool = False) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted linear (+ one magnitude per output with DoRA),
    lm_head included when it is named (`all-linear` leaves it out, as peft does)."""
    per_layer = sum(n * (r * (i + o) + (o if dora else 0)) for _, i, o, n in _targeted(shape, targets))
    head = 0
    if "lm_head" in targets:
        # Note: measured on CPU, adapting lm_head adds its adapter's weights, grads and AdamW states and nothing
        # visible to the loss (+9 MiB on a 32K vocabulary, +28 MiB on 152K; the parameter count gives 8 and 39).
        head = r * (shape.hidden_size + shape.vocab_size) + (shape.vocab_size if dora else 0)
    return shape.num_layers * per_layer + head


def _layer_saved_tensors(shape: ModelShape, s: PlanInputs) -> list[int]:
    """Sizes in bytes *per token of the micro-batch* of the tensors one decoder layer saves for backward (not
    counting its input). Listed tensor by tensor because the CPU allocator treats large and small ones apart."""
    a = DTYPE_BYTES[s.compute_dtype]
    h, inter, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_width, shape.kv_width
    if shape.num_experts:
        inter = (shape.expert_intermediate_size or inter) * max(1, shape.experts_per_token)
    # With a mask (always, when packing) transformers' SDPA path repeats k/v to every query head first.
    kv_saved = q if shape.num_kv_heads < shape.num_heads else kv
    tensors = [q * a, kv_saved * a, kv_saved * a, q * a]  # rotated q, k and v as SDPA keeps them, and its output
    tensors += [h * a]  # residual stream after attention
    tensors += [inter * a] * 3  # gate and up projections, and the activation of gate
    if shape.qk_norm:
        tensors += [q * a, kv * a]  # inputs of the per-head q/k norms
    tensors += [4, 4, shape.num_heads * 4]  # two RMSNorm rsqrt values and the attention log-sum-exp, in fp32
    # Note: SDPA turns the boolean block-diagonal mask into an additive one of the activation dtype, and its
    # backward keeps that copy: batch x length x length per layer (measured with saved_tensors_hooks).
    tensors += [s.max_length * a]
    inputs = {"attn_in": h, "o_in": 0, "mlp_in": h, "down_in": inter}  # o_proj's input is a view of SDPA's output
    group_of = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in",
                "o_proj": "o_in", "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in",
                "down_proj": "down_in", "gate": "mlp_in"}
    if s.method == "full":
        saved_groups = set(inputs)  # every weight has a gradient, so every linear keeps its input
        tensors += [h * a, h * a]  # trainable norm weights keep the normalized input too
    else:
        saved_groups = set()
        for name, i, o, n in _targeted(shape, s.target_modules):
            group = group_of.get(name, "attn_in")
            if s.lora_dropout > 0:
                # Each adapter draws its own dropout on its (fp32-cast) input: the dropped-out copy and the mask
                # are kept per module (the mask is fp32 on CPU, measured; bool on CUDA).
                tensors += [i * 4, i * (1 if s.device == "cuda" else 4)]
            elif a != 4:
                # LoRA weights are fp32: peft casts the 16-bit input to fp32 per module, and that copy is kept.
                tensors += [i * 4]
            else:
                saved_groups.add(group)
            tensors += [s.lora_r * 4]  # lora_A's output
            if s.use_dora:
                tensors += [o * a, o * a]  # DoRA's two scaled terms
    tensors += [inputs[g] * a for g in sorted(saved_groups) if inputs[g]]
    return tensors


def _activation_bytes(shape: ModelShape, s: PlanInputs) -> tuple[int, int, int]:
    """(activations saved through the whole backward pass, what one layer's backward adds while it runs - with
    checkpointing that includes its recomputed activations -, the bytes of one step's activation tensors small
    enough for glibc's heap, checkpointed or not) for one micro-batch."""
    a = DTYPE_BYTES[s.compute_dtype]
    n = s.tokens
    layer = [t * n for t in _layer_saved_tensors(shape, s)]
    layer_input = shape.hidden_size * a * n
    inter = shape.intermediate_size
    if shape.num_experts:
        inter = (shape.expert_intermediate_size or inter) * max(1, shape.experts_per_token)
    # Final norm output and the gathered hidden states of labelled positions feeding the chunked loss.
    tensors = [layer_input] * (shape.num_layers + 2)
    working = (BACKWARD_MLP_COPIES * inter + BACKWARD_RESIDUAL_COPIES * shape.hidden_size) * a * n
    if s.gradient_checkpointing:
        # Only each layer's input is kept; backward recomputes one layer at a time, after the loss is done.
        working += sum(layer)
    else:
        tensors += layer * shape.num_layers
    saved = sum(tensors)
    if not s.gradient_checkpointing:
        # Stored in another dtype than computed (trainer/training/saved_activations.py); the plan rounds the few
        # small tensors that stay in the compute dtype into the same factor.
        saved = saved * DTYPE_BYTES.get(s.saved_activations, a) // a
    # Checkpointing or not, every layer's forward allocates its full set once per step (see the allocator note).
    everything = [layer_input] * (shape.num_layers + 2) + layer * shape.num_layers
    heap = sum(t for t in everything if t < _heap_limit(s))
    return saved, working, heap


def _heap_limit(s: PlanInputs) -> int:
    """Blocks below this size come from glibc's heaps, where freed memory stays resident (the allocator note)."""
    return CPU_MMAP_THRESHOLD if s.cpu_allocator_capped else GLIBC_MMAP_THRESHOLD_MAX


def logits_bytes(shape: ModelShape, s: PlanInputs, chunked: bool = True) -> int:
    """Memory of the loss: one chunk of fp32 logits with its softmax and gradients (ft-desk), or the full
    batch x length x vocab logits of a plain trainer (chunked=False)."""
    positions = min(s.loss_chunk_tokens, s.tokens) if chunked else s.tokens
    copies = LOSS_CHUNK_COPIES + (1 if DTYPE_BYTES[s.weights_dtype] != 4 else 0) + (1 if shape.logit_softcap else 0)
    return positions * shape.vocab_size * 4 * copies


def _weights(shape: ModelShape, s: PlanInputs) -> list[tuple[str, int]]:
    w = DTYPE_BYTES[s.weights_dtype]
    if s.method == "qlora":
        quantized = four_bit_bytes(shape.linear_params, s.double_quant)
        label = "4-bit weights (incl. absmax, double quant)" if s.double_quant else "4-bit weights (incl. absmax)"
        return [(label, quantized), (f"embeddings, lm_head and norms ({s.weights_dtype})", shape.other_params * w)]
    if s.method == "lora":
        return [(f"base weights ({s.weights_dtype})", shape.params * w)]
    return [("weights (float32, trainable)", shape.params * 4)]


def _trainable(shape: ModelShape, s: PlanInputs) -> tuple[str, int, int]:
    if s.method == "full":
        n = shape.params
        # Note: AdamW keeps two fp32 states per parameter; grads are fp32 like the weights: 12 B/param here,
        # the weights themselves are counted above.
        return "gradients + AdamW states (fp32)", n * 12, n
    n = lora_params(shape, s.lora_r, s.target_modules, s.use_dora)
    # Note: LoRA weights, their gradients and AdamW's two states are all fp32: 16 bytes per trainable parameter.
    return f"LoRA r={s.lora_r}: weights, grads, AdamW states (fp32)", n * 16, n


def _dequant_bytes(shape: ModelShape, s: PlanInputs) -> int:
    """The transient full-precision copy of one 4-bit weight that each matmul dequantizes (qlora only)."""
    if s.method != "qlora":
        return 0
    widest = max(i * o for _, i, o, _ in shape.linear_layers())
    return widest * DTYPE_BYTES[s.compute_dtype]


def _optimizer_step_extra(shape: ModelShape, s: PlanInputs) -> int:
    """Temporaries of the AdamW step, which runs after backward has freed the activations (full only matters).

    Note: torch's AdamW takes its multi-tensor (foreach) path on CUDA, which materialises sqrt(v) for every
    parameter at once (4 bytes each); on CPU it updates tensor by tensor, so only the largest tensor counts.
    """
    if s.method != "full":
        return 0
    return shape.params * 4 if s.device == "cuda" else shape.largest_tensor * 4 * 2


def _load_peak(shape: ModelShape, s: PlanInputs, resident: int) -> int:
    """Host memory while loading on CPU: the checkpoint pages being read plus the converted weights, plus the
    full-precision copy of the linear weight being quantized."""
    converts = s.method == "qlora" or shape.checkpoint_dtype != (s.weights_dtype if s.method != "full" else "float32")
    # Note: safetensors files are memory-mapped; when no dtype conversion is needed the weights *are* the
    # mapped pages, so the file is not counted twice (measured: RSS after load = weights, peak = weights + file).
    checkpoint = shape.params * DTYPE_BYTES[shape.checkpoint_dtype] if converts else 0
    widest_linear = max(i * o for _, i, o, _ in shape.linear_layers())
    quantizing = widest_linear * 4 if s.method == "qlora" else 0
    if s.device == "mps":
        # A QLoRA base is quantized on the GPU tensor by tensor from the mapped checkpoint, whose pages macOS can
        # drop under pressure (file cache, not the run's memory). A 16-bit base is loaded on the host and then
        # moved to the GPU: converted to another dtype on the way, the host copy is a second full copy until then.
        host_copy = resident if s.method != "qlora" and converts else 0
        return resident + host_copy + quantizing
    return resident + checkpoint + quantizing


def _sample_phase(shape: ModelShape, s: PlanInputs, resident: int) -> int:
    """Model memory while a CPU QLoRA run answers its sample prompts (before and after training), or 0 when that
    phase has nothing of its own: generation then works from a dense copy of every 4-bit weight in the compute
    dtype (trainer.generation.inference_weights) next to the resident weights, LoRA and optimizer states, plus
    the key/value cache of the prompts. The copy is only made where it takes at most DENSE_RAM_SHARE of the RAM
    left to the run, the rule inference_weights applies at run time (else generation dequantizes per token)."""
    if s.device != "cpu" or s.method != "qlora" or s.sample_prompts <= 0:
        return 0
    dense = shape.linear_params * DTYPE_BYTES[s.compute_dtype]
    left = s.available_memory - resident - CPU_IMPORT_BYTES - CPU_RUNTIME_BYTES
    if s.available_memory and dense > DENSE_RAM_SHARE * left:
        return 0
    # The samples are generated one prompt at a time (no padding); a prompt is at most a training row.
    positions = s.max_length + s.max_new_tokens
    kv_cache = positions * shape.num_layers * 2 * shape.kv_width * DTYPE_BYTES[s.compute_dtype]
    return resident + dense + kv_cache


def _estimate(shape: ModelShape, s: PlanInputs) -> tuple[list[tuple[str, int]], int]:
    components = _weights(shape, s)
    resident = sum(b for _, b in components)  # the weights as loaded, before anything trains
    label, train_bytes, trainable = _trainable(shape, s)
    components.append((label, train_bytes))
    saved, working, heap = _activation_bytes(shape, s)
    act_label = "activations, checkpointed" if s.gradient_checkpointing else "activations (no checkpointing)"
    if not s.gradient_checkpointing and s.saved_activations not in ("", s.compute_dtype):
        act_label = f"activations kept in {s.saved_activations} (no checkpointing)"
    components.append((f"{act_label}: {s.micro_batch_size} x {s.max_length} tokens", saved))
    # The loss runs backward first, then the layers one by one: the peak is the larger of the two phases.
    loss = logits_bytes(shape, s)
    layer_phase = working + _dequant_bytes(shape, s)
    transient = [(f"loss: logits in chunks of {min(s.loss_chunk_tokens, s.tokens)} tokens", loss)]
    if layer_phase > loss:
        transient.append(("layer backward beyond the loss peak" + (" (one layer recomputed)" if s.gradient_checkpointing
                                                                    else ""), layer_phase - loss))
    if s.method == "full" and s.compute_dtype != "float32":
        # Note: autocast keeps a 16-bit copy of every fp32 weight it casts for the forward, and linear layers
        # save those copies for backward, so they live until the backward pass has used them.
        transient.append((f"{s.compute_dtype} weight copies (autocast)", shape.params * DTYPE_BYTES[s.compute_dtype]))
    components += transient
    model_bytes = sum(b for _, b in components)
    # The optimizer step runs once backward has freed all of the above that is transient.
    step_extra = _optimizer_step_extra(shape, s) - saved - sum(b for _, b in transient)
    if step_extra > 0:
        components.append(("optimizer step temporaries above the backward peak", step_extra))
        model_bytes += step_extra
    retained = 0
    if s.device == "cpu":
        # Note: with glibc's default (growing) mmap threshold, blocks under 32 MiB come from its heaps once the
        # first step has freed some, and the next step's activations do not fit the holes the last step left:
        # peak RSS grew by about the heap-sized part of one step's activations and loss tensors (measured on an
        # 11M and a 135M model: +152 MiB for 139 predicted, +1072 for 1082). With gradient checkpointing the
        # layers still allocate their full activations once per step, transiently, between long-lived layer
        # outputs: the heap grew by 0.6-1.0x of what the run would save without checkpointing (bench/
        # plan_accuracy.py); 1.0x is taken, the safe side. cap_cpu_allocator leaves only the blocks under its
        # threshold to this term.
        chunk_tensor = min(s.loss_chunk_tokens, s.tokens) * shape.vocab_size * 4
        loss_heap = logits_bytes(shape, s) if chunk_tensor < _heap_limit(s) else 0
        retained = heap + loss_heap
        if retained:
            components.append(("CPU allocator retention (glibc keeps the last step's blocks)", retained))
        model_bytes += retained
    # After training, what glibc kept of the steps stays resident beside the samples' dense copy.
    samples = _sample_phase(shape, s, resident + train_bytes + retained)
    if samples > model_bytes:
        components.append(("samples: dense copy of the 4-bit weights (above training)",
                           samples - model_bytes))
        model_bytes = samples
    if s.device in ("cpu", "mps"):
        # Note: on a Mac the loader's host-side copies and the Python process live in the same unified memory as
        # the GPU's tensors, so the CPU rules apply (the MPS figures are not measured on Apple hardware).
        load = _load_peak(shape, s, resident)
        if load > model_bytes:
            components.append(("loading peak above training (checkpoint read while converting)", load - model_bytes))
        where = "" if s.device == "cpu" else " in unified memory"
        components.append((f"framework overhead (Python, torch, libraries){where}",
                           CPU_IMPORT_BYTES + CPU_RUNTIME_BYTES))
    elif s.device == "cuda":
        components.append(("framework overhead (CUDA context, kernels)", CUDA_CONTEXT_BYTES))
    if not shape.known:
        components.append(("margin for an architecture the planner does not model",
                           int(CONSERVATIVE_MARGIN * model_bytes)))
    return components, trainable


def device_budget(device: DeviceFacts | None) -> int | None:
    """Bytes the run may use on `device`, or None: free memory on CUDA; on MPS the unified-memory budget
    (quant.device.UnifiedBudget: the recommended working set, torch's hard limit and the free RAM, whichever is
    least), or the recommended working set alone when the RAM is not known; free RAM on CPU."""
    if device is None:
        return None
    if device.type == "cuda":
        return device.free_memory or device.total_memory or None
    if device.type == "mps":
        unified = unified_budget(device)
        if unified is not None:
            return unified.budget or None
        return device.total_memory or device.free_memory or None
    return device.free_memory or device.total_memory or None


def fit_verdict(total: int, budget: int | None) -> str:
    """"fits" (under FITS_SHARE of the budget), "tight", "does not fit", or "unknown device" without a budget."""
    if budget is None:
        return "unknown device"
    if total <= FITS_SHARE * budget:
        return "fits"
    if total <= budget:
        return "tight"
    return "does not fit"


def _shape_of(shape_or_config: ModelShape | dict, model_name: str) -> ModelShape:
    if isinstance(shape_or_config, ModelShape):
        return shape_or_config
    return model_shape(shape_or_config, model_name)


def peak_bytes(shape_or_config: ModelShape | dict, inputs: PlanInputs) -> int:
    """The predicted peak alone (the sum of plan_memory's components)."""
    components, _ = _estimate(_shape_of(shape_or_config, "the model"), inputs)
    return sum(b for _, b in components)


def plan_memory(shape_or_config: ModelShape | dict, inputs: PlanInputs, device: DeviceFacts | None,
                model_name: str = "the model") -> MemoryPlan:
    """Predicted peak memory of a run with `inputs` for the model described by `shape_or_config` (a ModelShape,
    or the parsed config.json), judged against `device` (None: no verdict). The plan carries no suggestions:
    which settings to change is the caller's business (trainer.planning), each judged with `peak_bytes`."""
    shape = _shape_of(shape_or_config, model_name)
    components, trainable = _estimate(shape, inputs)
    total = sum(b for _, b in components)
    budget = device_budget(device)
    notes = list(shape.notes)
    if not shape.known:
        notes.append(f"architecture {shape.model_type!r} is not one the planner models exactly: the estimate is "
                     f"padded by {CONSERVATIVE_MARGIN:.0%}")
    if inputs.use_dora:
        notes.append("DoRA adds activations per adapted layer; its estimate is less exact than plain LoRA's")
    if inputs.method == "qlora" and inputs.device == "mps":
        notes.append("QLoRA on an Apple GPU runs through bitsandbytes' MPS backend; ft-desk train checks it with a "
                     "4-bit test layer first (ft-desk doctor shows the result)")
    unified = unified_budget(device) if device is not None else None
    if unified is not None:
        notes.append(unified.describe())
    if inputs.packing:
        notes.append("assumes packed rows filled to max length (the worst case)")
    settings = {
        "micro_batch_size": inputs.micro_batch_size, "max_length": inputs.max_length,
        "gradient_checkpointing": inputs.gradient_checkpointing,
        "lora_r": inputs.lora_r if inputs.method != "full" else None,
        "target_modules": list(inputs.target_modules), "loss_chunk_tokens": inputs.loss_chunk_tokens,
        "packing": inputs.packing, "grad_accum": inputs.grad_accum,
    }
    return MemoryPlan(
        components=components,
        total_bytes=total,
        verdict=fit_verdict(total, budget),
        conservative=not shape.known,
        suggestions=[],
        device_budget_bytes=budget,
        device=inputs.device,
        compute_dtype=inputs.compute_dtype,
        method=inputs.method,
        model_type=shape.model_type,
        params=shape.params,
        trainable_params=trainable,
        notes=notes,
        settings=settings,
    )


def plain_trainer_logits(shape_or_config: ModelShape | dict, inputs: PlanInputs) -> int:
    """The logits term of a trainer that materialises batch x length x vocab fp32 logits (for comparisons)."""
    return logits_bytes(_shape_of(shape_or_config, "the model"), inputs, chunked=False)


def human_bytes(n: int | float) -> str:
    """1.23 GB style (powers of 1024, as memory is sold and reported)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}" if abs(n) < 10 else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


__all__ = ["FITS_SHARE", "MemoryPlan", "ModelShape", "PlanInputs", "Suggestion", "device_budget",
           "fit_verdict", "human_bytes", "logits_bytes", "lora_params", "model_shape", "peak_bytes",
           "plain_trainer_logits", "plan_memory"]
