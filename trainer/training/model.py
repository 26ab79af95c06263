"""Loading models the way a run trains them: the base (4-bit NF4 for qlora, 16-bit for lora, fp32 for full),
LoRA adapters on top, and a trained run's weights back for evaluation, export and chat.

Every path goes through `load_base`, so training, evaluation and export see bit-identical base weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ft_desk.quant.device import DeviceFacts, choose_compute_dtype, probe_facts, resolve_device
from ft_desk.quant.mps_probe import (
    FourBitProbe,
    cached_probe,
    candidate_dtypes,
    compute_dtype_from_probe,
    describe_probe,
)
from ft_desk.quant.planner import human_bytes
from ft_desk.quant.policy import bnb_config, disable_cpu_repack, four_bit_layers, torch_dtype
from ft_desk.trainer.config import ModelConfig, RunConfig, config_from_dict
from ft_desk.trainer.config import replace as replace_config
from ft_desk.trainer.errors import ModelError, UserError
from ft_desk.trainer.hub.resolve import resolve_model_dir
from ft_desk.trainer.planning import plan_run
from ft_desk.trainer.run_folder import ADAPTER_WEIGHTS, FULL_WEIGHTS, checkpoint_folder, config_path

log = logging.getLogger("ft_desk.model")


@dataclass(frozen=True)
class LoadedInfo:
    model_dir: str
    device: str
    dtype: str  # dtype of the 16-bit parts / compute
    quantized: bool
    params: int
    load_seconds: float


def load_tokenizer(folder: Path, model: ModelConfig):
    """The tokenizer in `folder` (a base model's, or the one a run saved), set up exactly as training uses it.

    Training, `ft-desk data check` and export all load tokenizers here, so the data check counts the tokens
    training will see and an export writes the tokenizer the run trained with. No weights are loaded.
    """
    from transformers import AutoTokenizer  # heavy import

    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=model.trust_remote_code)
    except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
        raise ModelError(f"cannot load the tokenizer of {model.name} from {folder} ({exc})") from None
    if tok.pad_token_id is None:
        # Padding never carries loss (targets are -100 there), so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    return tok


def run_dtypes(cfg: RunConfig, device: str, model_dir: Path | None = None) -> tuple[str, str]:
    """(compute dtype, dtype of the unquantized weights) for this run on this device.

    QLoRA on an Apple GPU takes the compute dtype the 4-bit probe shows works there (`mps_qlora_dtype`);
    `model_dir` only sharpens its failure message with the 16-bit LoRA plan of that model.
    """
    facts = probe_facts(device)
    if device == "mps" and cfg.train.method == "qlora":
        compute = mps_qlora_dtype(cfg, facts, model_dir)
    else:
        requested = cfg.quant.compute_dtype if cfg.train.method == "qlora" else cfg.model.dtype
        compute = choose_compute_dtype(facts, requested)
    if cfg.train.method == "full":
        return compute, "float32"  # full fine-tuning keeps fp32 master weights; autocast does the 16-bit math
    weights = compute if cfg.model.dtype == "auto" else cfg.model.dtype
    return compute, weights


def read_model_config(model_dir: Path) -> dict:
    """The model folder's config.json as a dict ({} when it cannot be read: loading the model will say why)."""
    try:
        data = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def mps_qlora_dtype(cfg: RunConfig, facts: DeviceFacts, model_dir: Path | None = None,
                    probe: Callable[..., FourBitProbe] | None = None) -> str:
    """The compute dtype QLoRA trains in on this Apple GPU, from the 4-bit probe (bf16 where it passes, else
    fp16; a requested dtype must pass itself). When nothing passes: a UserError that says why and offers
    16-bit LoRA with its memory plan; ft-desk never switches methods behind the user's back."""
    requested = cfg.quant.compute_dtype
    probe = probe or cached_probe  # looked up at call time, so tests can inject results
    result = probe("mps", candidate_dtypes(facts.bf16, requested), cfg.quant.quant_type, cfg.quant.double_quant)
    chosen = compute_dtype_from_probe(result, requested)
    for op in result.cpu_fallbacks:
        log.warning("4-bit probe: %s ran on the CPU instead of the Apple GPU (PYTORCH_ENABLE_MPS_FALLBACK=1)", op)
    if chosen is not None:
        log.info("4-bit probe on the Apple GPU: %s; QLoRA computes in %s", describe_probe(result), chosen)
        return chosen
    where = ""
    if requested != "auto":
        where = f" in {requested}"
        works = compute_dtype_from_probe(probe("mps", candidate_dtypes(facts.bf16), cfg.quant.quant_type,
                                               cfg.quant.double_quant))
        if works is not None:
            raise UserError(f"4-bit QLoRA does not work{where} on this Mac's GPU: {result.reason}",
                            hint=f"use --set quant.compute_dtype={works} (it passed the same test)")
    raise UserError(f"4-bit QLoRA does not work{where} on this Mac's GPU: {result.reason}",
                    hint=_lora_instead(cfg, facts, model_dir))


def _lora_instead(cfg: RunConfig, facts: DeviceFacts, model_dir: Path | None) -> str:
    """The hint of a failed probe: 16-bit LoRA, with what it needs for this model when its config is at hand."""
    base = "train 16-bit LoRA instead with --preset lora"
    config = None
    if model_dir is not None and (Path(model_dir) / "config.json").is_file():
        try:
            config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = None
    if not isinstance(config, dict):
        return f"{base} (ft-desk plan {cfg.model.name} --preset lora shows what it needs)"
    lora = replace_config(cfg, "train", method="lora")
    try:
        plan = plan_run(config, lora, facts, four_bit_ok=False)
    except UserError:
        return f"{base} (ft-desk plan {cfg.model.name} --preset lora shows what it needs)"
    first = plan.first_fit
    text = (f"{base}: its plan for {cfg.model.name} is about {human_bytes(plan.total_bytes)} at these settings "
            f"({plan.verdict}")
    if plan.device_budget_bytes:
        text += f" in the {human_bytes(plan.device_budget_bytes)} this Mac gives the GPU"
    text += ")"
    if plan.verdict != "fits" and first is not None:
        text += f"; with {' '.join(f'--set {o}' for o in first.overrides)} it needs {human_bytes(first.total_bytes)}"
    return text


def load_base(cfg: RunConfig, device: str, model_dir: Path | None = None, tokenizer=None):
    """(model, tokenizer, LoadedInfo) with the base loaded exactly as training loads it; no adapter yet.
    `tokenizer`: one already loaded from model_dir with load_tokenizer (it is not loaded twice)."""
    import time

    from transformers import AutoModelForCausalLM  # heavy import: only when a model is really loaded

    started = time.perf_counter()
    model_dir = Path(model_dir) if model_dir else resolve_model_dir(cfg.model)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir, cfg.model)
    compute, weights_dtype = run_dtypes(cfg, device, model_dir)
    kwargs: dict = dict(
        dtype=torch_dtype(weights_dtype),
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=None if cfg.model.allow_pickle else True,
    )
    quantized = cfg.train.method == "qlora"
    if quantized:
        kwargs["quantization_config"] = bnb_config(
            cfg.quant.quant_type, cfg.quant.double_quant, compute, cfg.quant.skip_modules
        )
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except OSError as exc:
        if "safetensors" in str(exc).lower() or "pytorch_model.bin" in str(exc):
            raise ModelError(
                f"{model_dir} has no safetensors weights and ft-desk does not load pickle files by default",
                hint="pass --set model.allow_pickle=true only if you trust where the model came from",
            ) from None
        raise
    if not quantized:
        model.to(device)
    else:
        disable_cpu_repack(model)
    model.config.use_cache = False
    params = sum(p.numel() for p in model.parameters())
    info = LoadedInfo(
        model_dir=str(model_dir),
        device=device,
        dtype=compute,
        quantized=quantized,
        params=_logical_params(model, params),
        load_seconds=time.perf_counter() - started,
    )
    return model, tokenizer, info


def _logical_params(model, stored: int) -> int:
    """Parameter count as the model defines it (a packed 4-bit tensor stores two weights per element)."""
    extra = 0
    for _, module in four_bit_layers(model):
        extra += module.in_features * module.out_features - module.weight.numel()
    return stored + extra


def target_modules(cfg: RunConfig):
    targets = list(cfg.lora.target_modules)
    return "all-linear" if targets == ["all-linear"] else targets


def attach_lora(model, cfg: RunConfig):
    """Wrap `model` with fresh LoRA adapters (peft); seeded so a run's initial adapter is reproducible."""
    import torch  # heavy imports
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.train.seed)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=target_modules(cfg),
        use_dora=cfg.lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise UserError(
            f"lora.target_modules {list(cfg.lora.target_modules)} do not match this model ({exc})",
            hint="use --set lora.target_modules=all-linear, or names such as q_proj,v_proj",
        ) from None


def prepare_for_training(model, cfg: RunConfig):
    """Adapters or full training set up, gradient checkpointing on if asked. Returns the model to train."""
    if cfg.train.method in ("qlora", "lora"):
        for p in model.parameters():
            p.requires_grad_(False)
        model = attach_lora(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(base, "enable_input_require_grads") and cfg.train.method != "full":
            base.enable_input_require_grads()
    return model


def trainable_state(model, cfg: RunConfig) -> dict:
    """The tensors a checkpoint must hold to restore training: adapter weights, or every weight for full."""
    if cfg.train.method == "full":
        return {k: v for k, v in model.state_dict().items()}
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def save_weights(model, cfg: RunConfig, folder: Path) -> None:
    """Adapter (peft format) or full weights (safetensors) into folder."""
    if cfg.train.method == "full":
        from safetensors.torch import save_model  # handles tied (shared) tensors

        save_model(model, str(folder / FULL_WEIGHTS))
        model.config.save_pretrained(folder)
        return
    model.save_pretrained(folder, safe_serialization=True)


def load_weights(model, cfg: RunConfig, folder: Path) -> None:
    """Restore what save_weights wrote into an already prepared model (same structure)."""
    if cfg.train.method == "full":
        from safetensors.torch import load_model

        load_model(model, str(folder / FULL_WEIGHTS))
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(folder / ADAPTER_WEIGHTS), device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"{folder} does not match this model: unexpected tensors {unexpected[:3]}")


def with_old_row_length(raw):
    """A run saved before train.row_length existed packed its rows to data.max_length: keep that on a resume, so
    the batches it continues with are the ones it started."""
    if not isinstance(raw, dict):
        return raw  # config_from_dict says what is wrong with it
    train, data = raw.get("train"), raw.get("data")
    if isinstance(train, dict) and isinstance(data, dict) and "row_length" not in train \
            and isinstance(data.get("max_length"), int):
        return {**raw, "train": {**train, "row_length": data["max_length"]}}
    return raw


def load_run_config(run_dir: Path) -> RunConfig:
    path = config_path(run_dir)
    if not path.is_file():
        raise UserError(f"{run_dir} is not an ft-desk run folder (no {path.name})", hint="list runs with: ft-desk runs")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return config_from_dict(with_old_row_length(raw))
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # garbage, truncated, or no longer a valid config
        reason = exc.message if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        raise UserError(f"{path} is not a readable ft-desk config ({reason.splitlines()[0][:200]})",
                        hint="restore config.json from a copy, or start a new run (nothing in the folder was "
                             "changed)") from None


def load_trained(run_dir: Path, checkpoint: str | int = "best", device: str | None = None):
    """(model, tokenizer, cfg): the run's base loaded as in training with its trained weights, in eval mode."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    folder = checkpoint_folder(run_dir, checkpoint)
    device = device or resolve_device(cfg.train.device)
    model, tokenizer, _ = load_base(cfg, device)
    if cfg.train.method == "full":
        load_weights(model, cfg, folder)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    model.eval()
    return model, tokenizer, cfg
