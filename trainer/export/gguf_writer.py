"""GGUF export, written with the `gguf` package (maintained with llama.cpp): no llama.cpp build, no network.

Input is a merged Hugging Face folder (merged.py writes it). Output is one .gguf file with the architecture
metadata llama.cpp reads, the tokenizer (vocabulary, merges or scores, token types, special token ids, BOS/EOS
behaviour, chat template) and every tensor under its llama.cpp name and layout (quant/gguf_tensors.py). Tensors
stream from the safetensors shards into the file one at a time.

Tokenizers: byte-level BPE (GPT-2 style: Qwen, Llama 3, SmolLM, the demo model) is written as `gpt2` with its
merges and the pre-tokenizer name llama.cpp uses for its split pattern; BPE with byte fallback (sentencepiece
style: Llama 2, Mistral, Gemma) is written as `llama` with the merges (transformers' loader uses them) and scores
that reproduce the merge order (llama.cpp merges by score and never reads merges). Other tokenizer models are
refused. One sentencepiece difference remains that no GGUF key expresses: llama.cpp prepends the "▁" space to
every text run that follows a special token and to text that already starts with a space, where a Hugging Face
Metaspace tokenizer (prepend_scheme "first") prepends it only at the start of the input, and only when no space is
there (tests/trainer/export/test_gguf_spm.py pins both).

q4_k_m is written as F16 and then quantized by llama.cpp itself (llamacpp.py), when llama-cpp-python is installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ft_desk.quant.gguf_tensors import (
    ALWAYS_TIED,
    LLAMA_CPP_TYPES,
    TENSOR_TYPES,
    NameMap,
    TensorSpec,
    UnsupportedArchitecture,
    choose_type,
    encode,
    file_type,
    ggml_type,
    gguf_arch,
    llama3_rope_factors,
    llama_cpp_mismatches,
    transform,
)
from ft_desk.quant.gguf_tensors import bytes_per_weight as bpw
from ft_desk.trainer.chat_format import stop_token_ids, turn_end_tokens
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.export import llamacpp
from ft_desk.trainer.export.safetensors_io import read_header, read_tensor
from ft_desk.trainer.export.source import base_shards

Progress = Callable[[int, int, str], None]


def bytes_per_weight(tensor_type: str) -> float:
    if tensor_type not in TENSOR_TYPES and tensor_type not in LLAMA_CPP_TYPES:
        return 2.0
    return bpw(tensor_type)


def _rope(config) -> tuple[float, dict[str, Any]]:
    """(rope theta of the full-attention layers, rope scaling parameters) from a transformers config."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and "full_attention" in params:
        params = params["full_attention"]
    params = dict(params or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None)) or 10000.0
    return float(theta), params


def _split_regexes() -> dict[str, str]:
    """Known pre-tokenizer split patterns -> the name llama.cpp gives them (patterns taken from transformers)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _LLAMA3_SPLIT
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2

    return {_LLAMA3_SPLIT: "llama-bpe", QWEN2: "qwen2"}


def _pre_tokenizer_name(spec: dict[str, Any]) -> tuple[str, str | None]:
    """(llama.cpp pre-tokenizer name, note when it had to be guessed) for a byte-level BPE tokenizer.json."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2", None
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm", None
    if kinds and kinds[0] == "Split":
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        name = _split_regexes().get(pattern)
        if name:
            return name, None
    return "default", (f"pre-tokenizer {kinds} is not one ft-desk recognizes; llama.cpp will split text with its "
                       "default pattern, which may tokenize some inputs differently")


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict[str, Any]:
    """Everything the GGUF needs about the tokenizer."""
    import gguf

    if not getattr(tokenizer, "is_fast", False):
        raise UserError("GGUF export needs a fast tokenizer (tokenizer.json); this model has only a slow one")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export supports BPE tokenizers; this model's tokenizer is {model.get('type')}")
    byte_fallback = bool(model.get("byte_fallback"))
    kind = "llama" if byte_fallback else "gpt2"
    notes: list[str] = []
    n_tok = len(tokenizer)
    if n_tok > vocab_size:
        raise UserError(f"the tokenizer has {n_tok} tokens but the model only {vocab_size} embeddings")
    id_to_token = tokenizer.convert_ids_to_tokens(list(range(n_tok)))
    added = {tid: tok for tid, tok in tokenizer.added_tokens_decoder.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        text = id_to_token[i] if i < n_tok else None
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(text)
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif kind == "llama" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        elif i == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = []
    for m in model.get("merges", []):
        pair = m.split(" ", 1) if isinstance(m, str) else list(m)
        merges.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair))
    meta: dict[str, Any] = {"model": kind, "tokens": tokens, "types": [int(t) for t in types], "merges": merges}
    if kind == "gpt2":
        meta["pre"], note = _pre_tokenizer_name(spec)
        if note:
            notes.append(note)
    else:
        meta["pre"] = "default"
        # llama.cpp's sentencepiece tokenizer merges the adjacent pair whose result has the highest score, so a
        # token made by merge rank k gets score -k: the same order the Hugging Face BPE merges apply in.
        vocab = model.get("vocab", {})
        rank: dict[str, int] = {}
        for k, m in enumerate(merges):
            merged = m.replace(" ", "")
            rank.setdefault(merged, k)
        scores = []
        for text, tid in zip(tokens, range(vocab_size)):
            scores.append(-float(rank[text]) - 1.0 if text in rank and text in vocab else 0.0)
        meta["scores"] = scores
        normalizer = json.dumps(spec.get("normalizer") or {})
        pre = spec.get("pre_tokenizer") or {}
        meta["add_space_prefix"] = '"Prepend"' in normalizer or (
            pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") != "never")
    probe = tokenizer("a")["input_ids"]
    meta["add_bos"] = tokenizer.bos_token_id is not None and bool(probe) and probe[0] == tokenizer.bos_token_id
    meta["add_eos"] = tokenizer.eos_token_id is not None and bool(probe) and probe[-1] == tokenizer.eos_token_id
    meta["bos"] = tokenizer.bos_token_id
    meta["eos"] = tokenizer.eos_token_id
    meta["unk"] = tokenizer.unk_token_id
    meta["pad"] = tokenizer.pad_token_id
    ends = [tokenizer.convert_tokens_to_ids(t) for t in turn_end_tokens(tokenizer)]
    meta["eot"] = next((t for t in ends if t != tokenizer.eos_token_id), None)
    meta["stop_ids"] = stop_token_ids(tokenizer)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    meta["chat_template"] = template
    meta["notes"] = notes
    return meta


def _add_tokenizer(writer, meta: dict[str, Any]) -> None:
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    if "scores" in meta:
        writer.add_token_scores(meta["scores"])
        writer.add_add_space_prefix(meta["add_space_prefix"])
    if meta["merges"]:
        writer.add_token_merges(meta["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id),
                     ("eot", writer.add_eot_token_id)):
        if meta.get(key) is not None:
            add(int(meta[key]))
    writer.add_add_bos_token(bool(meta["add_bos"]))
    writer.add_add_eos_token(bool(meta["add_eos"]))
    if meta.get("chat_template"):
        writer.add_chat_template(meta["chat_template"])


def _add_hparams(writer, arch: str, config, tensor_type: str, name: str) -> list[Any]:
    """Architecture metadata; returns extra tensors [(gguf name, fp32 tensor)] (Llama 3 rope factors)."""
    import gguf

    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_file_type(file_type(tensor_type))
    if tensor_type not in ("f16", "bf16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    theta, rope = _rope(config)
    writer.add_rope_freq_base(theta)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch != "llama" or head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if arch in ("gemma2", "gemma3") and getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma3" and getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    extra = []
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        orig = rope.get("original_max_position_embeddings")
        if orig:
            writer.add_rope_scaling_orig_ctx_len(int(orig))
    elif rope_type == "llama3" and arch == "llama":
        extra.append(("rope_freqs.weight", llama3_rope_factors(head_dim, theta, rope)))
    elif rope_type != "default":
        raise UserError(f"GGUF export does not support rope scaling {rope_type!r} for {arch} models",
                        hint="export --format merged instead")
    return extra


def plan_tensors(merged_dir: Path, arch: str, config, tensor_type: str):
    """[(TensorSpec, safetensors entry or None)] in file order, plus notes."""
    names = NameMap(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    specs = []
    for shard in base_shards(merged_dir):
        for entry in read_header(shard)[0]:
            if entry.name.endswith("rotary_emb.inv_freq"):
                continue
            gname = names.get(entry.name)
            if gname is None:
                raise UserError(f"tensor {entry.name} has no name in the {arch} GGUF layout",
                                hint="this model variant is not supported for GGUF; export --format merged instead")
            if gname == "output.weight" and tied:
                continue
            specs.append((TensorSpec(entry.name, gname, entry.shape, choose_type(gname, entry.shape, tensor_type)),
                          entry))
    if arch in ALWAYS_TIED and any(s.name == "output.weight" for s, _ in specs):
        raise UserError(f"llama.cpp's {arch} models always tie the output layer to the token embedding, but this "
                        "merged model has them untied", hint="export --format merged instead")
    return specs


def export_gguf(merged_dir: Path, out_dir: Path, tensor_type: str, name: str,
                progress: Progress | None = None, work_dir: Path | None = None) -> dict[str, Any]:
    """Write out_dir/<name>-<type>.gguf from a merged model folder; returns facts for the report.

    Types llama.cpp makes (q4_k_m) are written as F16 into work_dir first and quantized from there by llama.cpp.
    """
    import gguf  # heavy-ish imports
    import numpy as np
    from transformers import AutoConfig, AutoTokenizer

    if tensor_type in LLAMA_CPP_TYPES and work_dir is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix=".gguf-work-", dir=out_dir.parent) as tmp:
            return _export_with_llama_cpp(merged_dir, out_dir, tensor_type, name, progress, Path(tmp))
    if tensor_type in LLAMA_CPP_TYPES:
        return _export_with_llama_cpp(merged_dir, out_dir, tensor_type, name, progress, work_dir)
    if tensor_type not in TENSOR_TYPES:
        raise UserError(f"--gguf-type must be one of {', '.join((*TENSOR_TYPES, *LLAMA_CPP_TYPES))}, "
                        f"got {tensor_type!r}")
    config = AutoConfig.from_pretrained(merged_dir)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        arch = gguf_arch(text_config.model_type)
    except UnsupportedArchitecture as exc:
        raise UserError(str(exc), hint="export --format merged (or adapter) instead") from None
    problems = llama_cpp_mismatches(arch, text_config)
    if problems:
        raise UserError(f"llama.cpp would not run this {arch} model as transformers does: {'; '.join(problems)}",
                        hint="export --format merged instead (fine-tunes of released Gemma models are not affected)")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    meta = tokenizer_metadata(tokenizer, text_config.vocab_size)
    specs = plan_tensors(merged_dir, arch, text_config, tensor_type)

    file_name = f"{name}-{tensor_type}.gguf"
    path = out_dir / file_name
    writer = gguf.GGUFWriter(path, arch)
    extra = _add_hparams(writer, arch, text_config, tensor_type, name)
    _add_tokenizer(writer, meta)
    for gname, value in extra:
        specs.append((TensorSpec(gname, gname, tuple(value.shape), "f32"), value))
    for spec, _ in specs:
        qtype = ggml_type(spec.type_name)
        if spec.type_name in ("f32", "f16"):
            writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32 if spec.type_name == "f32"
                                                                    else np.float16), spec.nbytes)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(spec.shape, qtype)
            writer.add_tensor_info(spec.name, byte_shape, np.dtype(np.uint8), spec.nbytes, raw_dtype=qtype)
    total = sum(s.nbytes for s, _ in specs)
    done = 0
    types: dict[str, int] = {}
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for spec, source in specs:
            value = source if not hasattr(source, "path") else read_tensor(source)
            value = transform(arch, spec.hf_name, value.float(), text_config.num_attention_heads,
                              getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads)
            writer.write_tensor_data(encode(value, spec.type_name))
            types[spec.type_name] = types.get(spec.type_name, 0) + 1
            done += spec.nbytes
            if progress:
                progress(done, total, spec.name)
    finally:
        writer.close()
    return {"file": file_name, "architecture": arch, "gguf_type": tensor_type, "tensor_types": types,
            "tokenizer_model": meta["model"], "pre_tokenizer": meta["pre"], "stop_ids": meta["stop_ids"],
            "eot_token_id": meta["eot"], "notes": meta["notes"], "bytes": path.stat().st_size,
            "transformers_can_load": transformers_reads(arch)}


def _export_with_llama_cpp(merged_dir: Path, out_dir: Path, tensor_type: str, name: str,
                           progress: Progress | None, work_dir: Path) -> dict[str, Any]:
    """F16 file into work_dir, then llama.cpp's quantizer into out_dir; the facts describe the quantized file."""
    llamacpp.require(tensor_type)
    f16 = export_gguf(merged_dir, work_dir, "f16", name, progress)
    file_name = f"{name}-{tensor_type}.gguf"
    path = out_dir / file_name
    if progress:
        progress(0, 0, f"quantizing to {tensor_type} with llama.cpp")
    done = llamacpp.quantize(work_dir / f16["file"], path, tensor_type, work_dir)
    (work_dir / f16["file"]).unlink()
    types = llamacpp.stored_types(path)
    notes = list(f16["notes"])
    # Note: K-quants pack 256 values per block (QK_K); llama.cpp stores a tensor whose rows are not a multiple of
    # that in another type (Q5_0 / Q8_0 / F16...), which the report should show rather than hide.
    other = {t: n for t, n in types.items() if t not in ("q4_k", "q6_k", "f32")}
    if other:
        listed = " and ".join(f"{n} tensors as {t}" for t, n in sorted(other.items()))
        notes.append(f"llama.cpp stored {listed}: those tensors' rows are not a multiple of 256 values, which "
                     "Q4_K/Q6_K need")
    return {**f16, "file": file_name, "gguf_type": tensor_type, "tensor_types": types, "notes": notes,
            "bytes": path.stat().st_size, "quantized_by": f"llama.cpp (llama-cpp-python {done['llama_cpp_version']})"}


def transformers_reads(arch: str) -> bool:
    """Whether transformers' GGUF loader knows this architecture (it does not read gemma v1 files)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return arch in GGUF_CONFIG_MAPPING


# Note: the largest error, relative to the tensor's largest value, each storage type may show on read-back, with
# margin. F16 rounds to 2^-11; Q8_0 to half a step of absmax/127; Q5_0 / Q4_0 can be off by a whole step (absmax/16,
# absmax/8), since a block's extreme value on the side opposite its scale's sign is clipped to the last code; Q6_K /
# Q5_K / Q4_K use half a step of their range (2 * absmax / 63, 31, 15) plus the rounding of their 6-8 bit block
# scales. Measured on the test models' random weights: F16 3.9e-4, Q8_0 4.0e-3, Q5_0 0.049, Q4_0 0.099, Q4_K 0.065.
READBACK_LIMITS = {"F32": 1e-6, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q6_K": 0.04, "Q5_K": 0.06, "Q5_0": 0.08,
                   "Q4_K": 0.12, "Q4_0": 0.15}


def readback_check(path: Path, merged_dir: Path) -> dict[str, Any]:
    """Read every tensor back with the gguf package's reader and compare it with the merged weight it came from.

    This checks the file's bytes (names, shapes, types, values); it cannot catch a wrong layout convention, which
    only a real loader can. It is the check used where transformers cannot load the architecture (gemma v1).
    Each tensor is held to the limit of the type it is stored in (READBACK_LIMITS).
    """
    import gguf
    import numpy as np
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(merged_dir)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    arch = gguf_arch(text_config.model_type)
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    specs = plan_tensors(merged_dir, arch, text_config, "f16")
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    worst, worst_name, missing, unknown = 0.0, "", [], []
    for spec, entry in specs:
        if spec.name not in stored:
            missing.append(spec.name)
            continue
        t = stored[spec.name]
        limit = READBACK_LIMITS.get(t.tensor_type.name)
        if limit is None:
            unknown.append(f"{spec.name} ({t.tensor_type.name})")
            continue
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        want = transform(arch, spec.hf_name, read_tensor(entry).float(), text_config.num_attention_heads, kv_heads)
        got = got.reshape(want.shape)
        scale = float(want.abs().max()) or 1.0
        error = float((got - want).abs().max()) / scale
        if error / limit > worst:
            worst, worst_name = error / limit, f"{spec.name} ({t.tensor_type.name}): {error:.2e}, limit {limit}"
    passed = not missing and not unknown and worst <= 1.0
    detail = (f"{len(specs) - len(missing)}/{len(specs)} tensors read back; largest error relative to its type's "
              f"limit in {worst_name or 'none'}")
    if unknown:
        detail += f"; stored in a type ft-desk cannot check: {', '.join(unknown[:3])}"
    return {"passed": passed, "tensors": len(specs), "missing": missing, "worst_vs_limit": worst,
            "checks": [{"name": "readback", "ok": passed, "detail": detail}]}
