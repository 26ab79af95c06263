"""Merged export: one standalone Hugging Face model folder that behaves like the trained run.

Each base weight is read from the base model's safetensors, turned into what training computed with (for QLoRA:
re-quantized to NF4 and dequantized with the run's exact settings, see quant/merge.py; `--merge-into original`
takes the 16-bit weight instead), the adapter's update is added in fp32, and the result is cast once to bf16 or
fp16 and written straight into the output shard. One tensor is in memory at a time, so peak memory is about the
largest tensor (in fp32, plus the bytes read) and the adapter, not the model.

The folder gets config.json without any quantization_config (and the real vocab size / tying), a
generation_config whose eos_token_id includes the chat template's turn-end token, and the run's tokenizer with
its chat template. Tied embeddings stay tied unless the adapter changed the output layer differently from the
input embedding, in which case both are written and the config says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ft_desk.quant.device import available_device_types
from ft_desk.quant.merge import AdapterUpdates, MergeError, QuantRecipe, WeightUpdate, merge_weight, training_view
from ft_desk.quant.policy import bnb_config, four_bit_layers, torch_dtype
from ft_desk.trainer import run_folder
from ft_desk.trainer.chat_format import stop_token_ids, turn_end_tokens
from ft_desk.trainer.errors import ModelError, UserError
from ft_desk.trainer.events import read_events
from ft_desk.trainer.export.safetensors_io import (
    ShardWriter,
    TensorEntry,
    element_size,
    read_all,
    read_header,
    read_tensor,
)
from ft_desk.trainer.export.source import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FULL_WEIGHTS, RunSource, base_shards
from ft_desk.trainer.training.model import run_dtypes

OUT_DTYPES = {"bf16": ("bfloat16", "BF16"), "fp16": ("float16", "F16")}
MERGE_INTO = ("quantized", "original")
# Note: output shards are cut at this size (transformers' own default for save_pretrained is in the same range);
# it bounds file sizes only, not memory, since tensors stream into the file one at a time.
MAX_SHARD_BYTES = 4 * 1024**3
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}

Progress = Callable[[int, int, str], None]


@dataclass
class OutTensor:
    """One tensor of the merged model and where its value comes from."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    """safetensors dtype written."""
    source: TensorEntry
    update: Any = None
    """quant.merge.WeightUpdate or None."""
    quantized: bool = False
    """Training used this weight through 4-bit NF4/FP4."""
    trained: bool = False
    """The value is a fully fine-tuned weight (fp32 master copy), not a base weight."""

    @property
    def nbytes(self) -> int:
        n = element_size(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass
class MergePlan:
    tensors: list[OutTensor]
    out_dtype: str
    """bf16 or fp16."""
    merge_into: str
    recipe: Any
    """quant.merge.QuantRecipe when 4-bit weights are re-derived, else None."""
    load_dtype: str
    """dtype training held the 16-bit base weights in."""
    config_changes: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    merged_modules: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def shards(self, max_bytes: int = MAX_SHARD_BYTES) -> list[list[OutTensor]]:
        groups: list[list[OutTensor]] = [[]]
        size = 0
        for t in self.tensors:
            if groups[-1] and size + t.nbytes > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        return groups


def _meta_model(base_dir: Path, cfg):
    """The model skeleton on the meta device (no memory), quantized the way training loaded it for qlora."""
    import torch  # heavy imports
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=cfg.model.trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise ModelError(
            f"{base_dir} is already quantized ({config.quantization_config.get('quant_method', '?')}); "
            "ft-desk merges only into 16-bit base models",
            hint="train from the 16-bit version of this model to export merged weights, or export --format adapter",
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.train.method == "qlora":
        from transformers.quantizers import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(
            bnb_config(cfg.quant.quant_type, cfg.quant.double_quant, "float32", cfg.quant.skip_modules),
            pre_quantized=False,
        )
        quantizer.preprocess_model(model, device_map={"": "cpu"})
    return model, config


def training_dtypes(source: RunSource) -> tuple[str, str]:
    """(compute dtype, dtype of the 16-bit base weights) the run used on the device it trained on.

    Where that device is here, the training code's own rule answers; otherwise the compute dtype the run
    recorded in its model_loaded event does (a CUDA run exported on a laptop).
    """
    cfg = source.cfg
    if source.trained_device in available_device_types():
        return run_dtypes(cfg, source.trained_device)
    compute = next((e.get("dtype") for e in read_events(run_folder.events_path(source.run_dir))
                    if e.get("type") == "model_loaded" and e.get("dtype")), None)
    if compute is None:
        return run_dtypes(cfg, "cpu")
    if cfg.train.method == "full":
        return compute, "float32"
    return compute, compute if cfg.model.dtype == "auto" else cfg.model.dtype


def _quant_device(source: RunSource) -> str:
    """bitsandbytes runs where training ran when that device is here; otherwise on CPU (noted in the report)."""
    import torch

    if source.trained_device == "cuda" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def plan_merge(source: RunSource, out_dtype: str = "bf16", merge_into: str = "quantized") -> MergePlan:
    """Work out every output tensor (name, shape, source, update) without reading any weights."""
    if out_dtype not in OUT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(OUT_DTYPES)}, got {out_dtype!r}")
    if merge_into not in MERGE_INTO:
        raise UserError(f"--merge-into must be one of {', '.join(MERGE_INTO)}, got {merge_into!r}")
    cfg = source.cfg
    notes: list[str] = []
    if merge_into == "quantized" and cfg.train.method != "qlora":
        merge_into = "original"
        notes.append(f"method {cfg.train.method} trained on 16-bit weights, so they are merged as they are")

    base_entries: dict[str, TensorEntry] = {}
    order: list[str] = []
    for shard in base_shards(source.base_dir):
        entries, _ = read_header(shard)
        for e in entries:
            base_entries[e.name] = e
            order.append(e.name)

    model, config = _meta_model(source.base_dir, cfg)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(text_config, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
    embed_name = _param_name(model, model.get_input_embeddings())
    lm_module = model.get_output_embeddings()
    lm_name = _param_name(model, lm_module) if lm_module is not None else None
    quantized_names: set[str] = set()
    if cfg.train.method == "qlora":
        quantized_names = {f"{name}.weight" for name, _ in four_bit_layers(model)}
    del model

    compute, load_dtype = training_dtypes(source)
    recipe = None
    if merge_into == "quantized" and quantized_names:
        recipe = QuantRecipe(quant_type=cfg.quant.quant_type, double_quant=cfg.quant.double_quant,
                             load_dtype=load_dtype, device=_quant_device(source))
        if source.trained_device == "cuda" and recipe.device == "cpu":
            notes.append("the run trained on CUDA but no GPU is here: 4-bit weights were recomputed with "
                         "bitsandbytes' CPU kernels")

    updates: dict[str, Any] = {}
    trained: dict[str, TensorEntry] = {}
    merged_modules = 0
    if cfg.train.method == "full":
        for e in read_header(source.weights_dir / FULL_WEIGHTS)[0]:
            trained[e.name] = e
        if tied and lm_name in trained and embed_name not in trained:
            # safetensors' save_model keeps one name of a shared tensor; for tied weights it may be the output's.
            trained[embed_name] = trained[lm_name]
    else:
        state = read_all(source.weights_dir / ADAPTER_WEIGHTS)
        adapter_cfg = json.loads((source.weights_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        try:
            parsed = AdapterUpdates.from_state(state, adapter_cfg)
        except MergeError as exc:
            raise UserError(str(exc), hint="export --format adapter instead; it needs no merge") from None
        updates = parsed.updates
        merged_modules = sum(1 for u in updates.values() if u.has_lora)
        if parsed.use_dora:
            notes.append("DoRA adapter: magnitudes applied per output row, as peft merges them")
        unknown = [name for name in updates if name not in base_entries
                   and not (tied and name == lm_name and lm_name not in base_entries)]
        if unknown:
            raise UserError(
                f"the adapter changes {unknown[0]}, which {source.base_dir.name} does not have; "
                "it was trained on a different base model",
                hint="check model.name in the run's config.json",
            )

    def out_dtype_for(entry: TensorEntry) -> str:
        return OUT_DTYPES[out_dtype][1] if entry.dtype in _FLOAT_DTYPES else entry.dtype

    tensors: list[OutTensor] = []
    config_changes: dict[str, Any] = {}
    for name in order:
        entry = trained.get(name, base_entries[name])
        upd = updates.get(name)
        shape = tuple(upd.replacement.shape) if upd is not None and upd.replacement is not None else entry.shape
        tensors.append(OutTensor(name=name, shape=shape, dtype=out_dtype_for(entry), source=entry, update=upd,
                                 quantized=name in quantized_names, trained=name in trained))
    if (cfg.train.method == "full" and tied and lm_name and lm_name in trained and lm_name not in base_entries
            and trained[lm_name] is not trained.get(embed_name)):
        # Full fine-tuning saved an untied output layer.
        entry = trained[lm_name]
        tensors.append(OutTensor(name=lm_name, shape=entry.shape, dtype=out_dtype_for(entry), source=entry,
                                 trained=True))
        config_changes["tie_word_embeddings"] = False
    if tied and lm_name and lm_name not in base_entries and embed_name in base_entries:
        embed_upd = updates.get(embed_name)
        lm_upd = updates.get(lm_name)
        if _same_shared_update(embed_upd, lm_upd):
            lm_upd = None  # peft saved the one tied (resized) matrix under both names
        if lm_upd is not None or (embed_upd is not None and embed_upd.has_lora):
            # The trained model's output layer differs from its input embedding: write both, untied.
            shared = embed_upd
            merged_lm = WeightUpdate(target=lm_name)
            if shared is not None:
                merged_lm.replacement, merged_lm.rows, merged_lm.row_values = (
                    shared.replacement, shared.rows, shared.row_values)
            if lm_upd is not None:
                for attr in ("lora_a", "lora_b", "scale", "fan_in_fan_out", "magnitude"):
                    setattr(merged_lm, attr, getattr(lm_upd, attr))
                if lm_upd.replacement is not None:
                    merged_lm.replacement = lm_upd.replacement
                if lm_upd.rows is not None:
                    merged_lm.rows, merged_lm.row_values = lm_upd.rows, lm_upd.row_values
            source_entry = base_entries[embed_name]
            shape = tuple(merged_lm.replacement.shape) if merged_lm.replacement is not None else source_entry.shape
            tensors.append(OutTensor(name=lm_name, shape=shape, dtype=out_dtype_for(source_entry),
                                     source=source_entry, update=merged_lm))
            config_changes["tie_word_embeddings"] = False
            notes.append("the adapter changed the output layer apart from the tied input embedding, so the "
                         "merged model has untied embeddings")
    vocab = next((t.shape[0] for t in tensors if t.name == embed_name), None)
    if vocab is not None and vocab != getattr(text_config, "vocab_size", vocab):
        config_changes["vocab_size"] = vocab
        notes.append(f"vocabulary resized from {text_config.vocab_size} to {vocab} tokens")
    lm_shape = next((t.shape for t in tensors if t.name == lm_name), None)
    if vocab is not None and lm_shape is not None and lm_shape[0] != vocab:
        raise UserError(f"merged input embedding has {vocab} rows but the output layer has {lm_shape[0]}; "
                        "the adapter resized only one of them", hint="export --format adapter instead")
    return MergePlan(tensors=tensors, out_dtype=out_dtype, merge_into=merge_into, recipe=recipe,
                     load_dtype=load_dtype, config_changes=config_changes, notes=notes,
                     merged_modules=merged_modules)


def _same_shared_update(a, b) -> bool:
    """Both updates are the same full replacement with no LoRA on either (a tied matrix saved twice)."""
    import torch

    if a is None or b is None or a.has_lora or b.has_lora or a.rows is not None or b.rows is not None:
        return False
    return (a.replacement is not None and b.replacement is not None
            and a.replacement.shape == b.replacement.shape and torch.equal(a.replacement, b.replacement))


def _param_name(model, module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return f"{name}.weight"
    raise ModelError("could not find the embedding layer of this model")


def base_view(t: OutTensor, plan: MergePlan):
    """The fp32 value training computed with for this tensor, before the adapter."""
    import torch

    raw = read_tensor(t.source)
    if not raw.is_floating_point():
        return raw
    if t.quantized and plan.recipe is not None:
        return training_view(raw, plan.recipe)
    if not t.trained:
        raw = raw.to(torch_dtype(plan.load_dtype))
    return raw.to(torch.float32)


def iter_merged(plan: MergePlan) -> Iterator[tuple[OutTensor, Any]]:
    """(tensor plan, merged fp32 value) one at a time, in output order."""
    for t in plan.tensors:
        value = base_view(t, plan)
        if t.update is not None and value.is_floating_point():
            try:
                value = merge_weight(value, t.update)
            except MergeError as exc:
                raise UserError(str(exc)) from None
        yield t, value


def write_weights(plan: MergePlan, folder: Path, progress: Progress | None = None) -> list[str]:
    """The safetensors shard(s) and, when sharded, model.safetensors.index.json."""
    import torch

    out_torch = torch_dtype(OUT_DTYPES[plan.out_dtype][0])
    groups = plan.shards()
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    total = plan.total_bytes
    done = 0
    merged = iter_merged(plan)
    weight_map: dict[str, str] = {}
    for file_name, group in zip(names, groups):
        writer = ShardWriter(folder / file_name, [(t.name, t.dtype, t.shape) for t in group])
        try:
            for expected in group:
                t, value = next(merged)
                assert t is expected
                if value.is_floating_point():
                    value = value.to(out_torch)
                    if not bool(torch.isfinite(value).all()):
                        raise UserError(f"merged tensor {t.name} is not finite after casting to {plan.out_dtype}",
                                        hint="try --dtype bf16, whose range is that of fp32")
                writer.write(t.name, value)
                weight_map[t.name] = file_name
                done += t.nbytes
                del value
                if progress:
                    progress(done, total, t.name)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        names.append("model.safetensors.index.json")
    return names


def write_model_files(source: RunSource, plan: MergePlan, folder: Path, tokenizer) -> dict[str, Any]:
    """config.json, generation_config.json and the tokenizer; returns what was decided (for the report)."""
    from transformers import AutoConfig, GenerationConfig  # heavy import

    config = AutoConfig.from_pretrained(source.base_dir, trust_remote_code=source.cfg.model.trust_remote_code)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    for key, value in plan.config_changes.items():
        setattr(config, key, value)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if text is not config:
            setattr(text, key, value)
    config.dtype = OUT_DTYPES[plan.out_dtype][0]
    config.use_cache = True
    config.save_pretrained(folder)

    stops = stop_token_ids(tokenizer)
    try:
        gen = GenerationConfig.from_pretrained(source.base_dir)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    existing = gen.eos_token_id
    eos = [existing] if isinstance(existing, int) else list(existing or [])
    for tid in stops:
        if tid not in eos:
            eos.append(tid)
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    gen.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"eos_token_id": eos, "turn_end_tokens": turn_end_tokens(tokenizer),
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "vocab_size": getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                                  "vocab_size", None)}


def export_merged(source: RunSource, folder: Path, tokenizer, out_dtype: str = "bf16",
                  merge_into: str = "quantized", progress: Progress | None = None) -> dict[str, Any]:
    """Write the merged model folder; returns facts for the report."""
    plan = plan_merge(source, out_dtype, merge_into)
    files = write_weights(plan, folder, progress)
    facts = write_model_files(source, plan, folder, tokenizer)
    return {"weights": files, "bytes": plan.total_bytes, "merge_into": plan.merge_into, "dtype": out_dtype,
            "notes": plan.notes, "merged_modules": plan.merged_modules, **facts}
