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


def _round_trip(model_dir, out, gguf_type, facts=None):
    """(facts, mean KL of transformers' GGUF-loaded model against the original) on PROMPTS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    facts = facts or _write(model_dir, out, gguf_type)
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


# model_type -> (tied embeddings, shape). transformers' GGUF reader takes Qwen3's head_dim and Gemma 2/3's
# query_pre_attn_scalar from its config defaults (128; 256) rather than from the file, and llama.cpp scales Gemma
# attention by 1/sqrt(head_dim): so these tiny models get the real models' head sizes (128; 256).
FAMILIES = {
    "llama": (False, {}),
    "mistral": (False, {}),
    "qwen2": (False, {}),
    "qwen3": (False, dict(hidden_size=512, num_attention_heads=4)),
    "gemma": (True, {}),
    "gemma2": (True, dict(hidden_size=512, num_attention_heads=2)),
    "gemma3_text": (True, dict(hidden_size=512, num_attention_heads=2)),
}


@pytest.fixture(scope="module")
def family_gguf(tmp_path_factory):
    """model_type -> (model folder, GGUF folder, export facts): one tiny model per family, built on first use."""
    built = {}

    def get(arch):
        if arch not in built:
            tied, shape = FAMILIES[arch]
            root = tmp_path_factory.mktemp(arch)
            model_dir = build_model(root / "model", architecture=arch, tie_word_embeddings=tied,
                                    num_hidden_layers=1, **shape)
            built[arch] = (model_dir, root / "gguf", _write(model_dir, root / "gguf"))
        return built[arch]

    return get


@pytest.mark.parametrize("arch", [a for a in FAMILIES if a != "gemma"])  # transformers does not read gemma v1
def test_round_trip_through_transformers_gguf_loader(family_gguf, arch):
    model_dir, out, facts = family_gguf(arch)
    facts, kl = _round_trip(model_dir, out, "f16", facts)
    # f16 storage of fp32 weights: only rounding remains (measured ~1e-8 on these models).
    assert kl < 1e-5, (arch, kl)
    assert facts["tokenizer_model"] == "gpt2"
    # transformers may rebuild a Qwen tokenizer with the Qwen split pattern, which llama.cpp calls qwen2; either
    # way the GGUF tokenizer reproduced the ids above.
    assert facts["pre_tokenizer"] in (("qwen2", "gpt-2") if arch.startswith("qwen") else ("gpt-2",))
    assert facts["tensor_types"]["f32"] >= 2  # norms stay f32, as llama.cpp stores them


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_llama_cpp_runs_each_family_like_transformers(family_gguf, arch):
    """llama.cpp itself (when llama-cpp-python is installed) tokenizes and scores each family's file like the
    original model (measured: KL 2e-9..7e-8)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out, facts = family_gguf(arch)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    llm = llama_cpp.Llama(model_path=str(out / facts["file"]), n_ctx=128, logits_all=True, verbose=False)
    for text in PROMPTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        got = torch.log_softmax(torch.tensor(llm.scores[: len(ids)], dtype=torch.float32), dim=-1)
        ref = _logits(hf, torch.tensor([ids]))
        kl = float((ref.exp() * (ref - got)).sum(-1).mean())
        assert kl < 1e-5, (arch, text, kl)
    llm.close()


def test_gemma_that_llama_cpp_would_run_differently_is_refused(tmp_path):
    """llama.cpp hard-codes Gemma 3's attention scale as 1/sqrt(head_dim); a model built otherwise is refused
    rather than written as a file that runs differently there."""
    from ft_desk.trainer.errors import UserError

    model_dir = build_model(tmp_path / "model", architecture="gemma3_text", tie_word_embeddings=True,
                            num_hidden_layers=1)  # head_dim 16, query_pre_attn_scalar 256 (the config default)
    with pytest.raises(UserError, match=r"query_pre_attn_scalar=256\) where llama.cpp uses 1/sqrt\(16\)") as err:
        _write(model_dir, tmp_path / "gguf")
    assert "--format merged" in err.value.hint


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
