"""GGUF round trips through transformers' own GGUF loader, for a tiny model of each supported family."""

from __future__ import annotations

import pytest
import torch

from .runs import build_model

PROMPTS = ["<|im_start|>user\nWhere is my order?<|im_end|>\n<|im_start|>assistant\n", "Compass 42 ships today."]


def _write(model_dir, out, gguf_type="f16"):
    from ft_desk.trainer.export.gguf_writer import export_gguf

    out.mkdir()
    return export_gguf(model_dir, out, gguf_type, name="tiny")


def _logits(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)


def _round_trip(model_dir, out, gguf_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    facts = _write(model_dir, out, gguf_type)
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    gguf_tok = AutoTokenizer.from_pretrained(out, gguf_file=facts["file"])
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=facts["file"], dtype=torch.float32)
    kls = []
    for text in PROMPTS:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert gguf_tok(text, add_special_tokens=False)["input_ids"] == ids
        ref = _logits(hf, torch.tensor([ids]))
        got = _logits(loaded, torch.tensor([ids]))[:, : ref.shape[-1]]
        kls.append(float((ref.exp() * (ref - got)).sum(-1).mean()))
        assert torch.equal(ref.argmax(-1), got.argmax(-1)) or gguf_type != "f16"
    return facts, sum(kls) / len(kls)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("mistral", False), ("qwen2", False), ("qwen3", False),
                                       ("gemma2", True), ("gemma3_text", True)])
def test_round_trip_through_transformers_gguf_loader(tmp_path, arch, tied):
    # transformers' GGUF reader takes Qwen3's head_dim from its config default (128), not from the file, so the
    # tiny Qwen3 gets the real models' head_dim of 128.
    wide = dict(hidden_size=512, num_attention_heads=4) if arch == "qwen3" else {}
    model_dir = build_model(tmp_path / "model", architecture=arch, tie_word_embeddings=tied,
                            num_hidden_layers=1, **wide)
    facts, kl = _round_trip(model_dir, tmp_path / "gguf", "f16")
    # f16 storage of fp32 weights: only rounding remains (measured ~1e-8 on these models).
    assert kl < 1e-5, (arch, kl)
    assert facts["tokenizer_model"] == "gpt2"
    # transformers may rebuild a Qwen tokenizer with the Qwen split pattern, which llama.cpp calls qwen2; either
    # way the GGUF tokenizer reproduced the ids above.
    assert facts["pre_tokenizer"] in (("qwen2", "gpt-2") if arch.startswith("qwen") else ("gpt-2",))
    assert facts["tensor_types"]["f32"] >= 2  # norms stay f32, as llama.cpp stores them


@pytest.mark.parametrize("gguf_type,limit", [("q8_0", 1e-3), ("q4_0", 0.1)])
def test_quantized_gguf_types_stay_close(tmp_path, llama_dir, gguf_type, limit):
    facts, kl = _round_trip(llama_dir, tmp_path / "gguf", gguf_type)
    assert kl < limit
    assert gguf_type in facts["tensor_types"]
    if gguf_type == "q4_0":
        assert facts["tensor_types"]["q8_0"] == 2  # token embedding and output layer kept at 8 bits


@pytest.mark.parametrize("gguf_type", ["f16", "q4_0"])
def test_gemma_v1_writes_and_reads_back(tmp_path, gguf_type):
    """transformers cannot load gemma (v1) GGUF files; the file is checked tensor by tensor instead, each tensor
    against the error its storage type allows."""
    from ft_desk.trainer.export.gguf_writer import readback_check

    model_dir = build_model(tmp_path / "model", architecture="gemma", tie_word_embeddings=True,
                            num_hidden_layers=1)
    facts = _write(model_dir, tmp_path / "gguf", gguf_type)
    assert facts["architecture"] == "gemma" and not facts["transformers_can_load"]
    report = readback_check(tmp_path / "gguf" / facts["file"], model_dir)
    assert report["passed"] and not report["missing"] and report["tensors"] == 11
    assert 0.05 < report["worst_vs_limit"] <= 1.0, report  # the limits are neither loose nor exceeded


def test_gguf_metadata_names_the_turn_end_token_and_template(tmp_path, llama_dir):
    import gguf

    facts = _write(llama_dir, tmp_path / "gguf")
    reader = gguf.GGUFReader(tmp_path / "gguf" / facts["file"])

    def field(key):
        f = reader.fields[key]
        return f.contents()

    tokens = field("tokenizer.ggml.tokens")
    assert tokens[field("tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert "<|im_start|>" in field("tokenizer.chat_template")
    assert field("llama.block_count") == 2 and field("general.architecture") == "llama"


def test_unsupported_architecture_is_refused_with_the_supported_list(tmp_path):
    from ft_desk.trainer.errors import UserError

    model_dir = build_model(tmp_path / "model", architecture="phi3", num_hidden_layers=1)
    with pytest.raises(UserError, match=r"does not support model type 'phi3'.*Qwen3.*Gemma"):
        _write(model_dir, tmp_path / "gguf")
