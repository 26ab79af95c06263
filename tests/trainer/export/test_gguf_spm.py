"""Sentencepiece-style tokenizers (Llama 2, Mistral: BPE with byte fallback, "▁" for spaces) in GGUF.

The GGUF stores them as tokenizer model `llama`: the vocabulary, a score per token that reproduces the BPE merge
order, token types (control, byte, normal), add_space_prefix and the BOS/EOS flags. transformers' GGUF loader
rebuilds a tokenizer from that; it must encode and decode like the model's own tokenizer.json.
"""

from __future__ import annotations

import pytest
import torch

from .runs import build_spm_model

# Spaces (leading, doubled, tripled), newlines, a tab, digits, punctuation, accented letters that are in the
# vocabulary, an emoji and CJK text that are not (byte fallback), the literal text of special tokens, and empty
# or whitespace-only input.
TEXTS = [
    "Where is my order 1182?",
    " leading space",
    "two  spaces and   three",
    "line one\nline two\n\n  indented end\n",
    "tab\tseparated",
    "Total: $42.50 (incl. 20% VAT) - paid on 2024-05-01!",
    "Wait... what?! [yes] {no} <maybe> @home #1 ~/path_to/file.txt",
    "café crème brûlée, naïve über déjà vu",
    "emoji 😀 needs byte fallback",
    "日本語",
    "<s>[INST]Hi[/INST] Hello</s>",
    "an <unk> token spelled out",
    "x",
    "",
    "   ",
    "\n",
]
MESSAGES = [{"role": "user", "content": "Where is order 1182?"},
            {"role": "assistant", "content": "It left today, café 😀 included."},
            {"role": "user", "content": "Thanks!\nAnything else?"}]


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """(model folder, GGUF folder, export facts) for a tiny Mistral with a sentencepiece-style tokenizer."""
    from ft_desk.trainer.export.gguf_writer import export_gguf

    model_dir = build_spm_model(tmp_path_factory.mktemp("spm-model"))
    out = tmp_path_factory.mktemp("spm-gguf")
    return model_dir, out, export_gguf(model_dir, out, "f16", name="spm")


def test_gguf_tokenizer_encodes_and_decodes_like_the_original(spm_gguf):
    """transformers' GGUF tokenizer gives the original's ids and text, special tokens and byte fallback included."""
    import gguf
    from transformers import AutoTokenizer

    model_dir, out, facts = spm_gguf
    assert facts["tokenizer_model"] == "llama"
    original = AutoTokenizer.from_pretrained(model_dir)
    loaded = AutoTokenizer.from_pretrained(out, gguf_file=facts["file"])
    # The cases below exercise what they claim to.
    assert "<0xF0>" in original.convert_ids_to_tokens(original("😀")["input_ids"])
    assert "é" in original.convert_ids_to_tokens(original("é")["input_ids"])
    for text in TEXTS:
        for special in (True, False):
            ids = original(text, add_special_tokens=special)["input_ids"]
            assert loaded(text, add_special_tokens=special)["input_ids"] == ids, (text, special)
        ids = original(text)["input_ids"]
        for skip in (True, False):
            assert loaded.decode(ids, skip_special_tokens=skip) == original.decode(ids, skip_special_tokens=skip)
    chat = original.apply_chat_template(MESSAGES, tokenize=False)
    assert loaded.apply_chat_template(MESSAGES, tokenize=False) == chat
    chat_ids = original(chat, add_special_tokens=False)["input_ids"]
    assert loaded(chat, add_special_tokens=False)["input_ids"] == chat_ids
    assert {original.convert_tokens_to_ids(t) for t in ("<s>", "[INST]", "[/INST]", "</s>")} <= set(chat_ids)

    reader = gguf.GGUFReader(out / facts["file"])
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[3:259] == [int(gguf.TokenType.BYTE)] * 256
    assert types[1] == types[1022] == int(gguf.TokenType.CONTROL)  # <s> and [INST]
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True


def test_gguf_model_matches_the_original_logits(spm_gguf):
    """The weights round trip too: f16 storage of fp32 weights leaves only rounding (measured: KL 1.4e-9, largest
    logit difference 2.8e-4 on logits up to 0.63)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out, facts = spm_gguf
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=facts["file"], dtype=torch.float32)
    ids = torch.tensor([tokenizer.apply_chat_template(MESSAGES, tokenize=True)["input_ids"]])
    with torch.no_grad():
        ref = original(input_ids=ids).logits[0].double()
        got = loaded(input_ids=ids).logits[0].double()
    ref_lp, got_lp = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = float((ref_lp.exp() * (ref_lp - got_lp)).sum(-1).mean())
    assert kl < 1e-6, kl
    assert float((ref - got).abs().max()) < 1e-2 * float(ref.abs().max())
    assert torch.equal(ref.argmax(-1), got.argmax(-1))


def test_scores_alone_reproduce_the_merge_order(spm_gguf, tmp_path, monkeypatch):
    """llama.cpp's sentencepiece tokenizer ignores merges and merges by score; so does transformers when a file
    has no merges (llama.cpp's own converter writes none for these vocabularies). Without the merges list, the
    written scores must still tokenize like the original."""
    from transformers import AutoTokenizer

    from ft_desk.trainer.export import gguf_writer

    model_dir, _, _ = spm_gguf
    full = gguf_writer.tokenizer_metadata
    monkeypatch.setattr(gguf_writer, "tokenizer_metadata", lambda *a: {**full(*a), "merges": []})
    facts = gguf_writer.export_gguf(model_dir, tmp_path, "f16", name="no-merges")
    original = AutoTokenizer.from_pretrained(model_dir)
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=facts["file"])
    rows = [m["content"] for m in MESSAGES] + TEXTS + _demo_replies(200)
    for text in rows:
        assert loaded(text)["input_ids"] == original(text)["input_ids"], text


def _demo_replies(n: int) -> list[str]:
    import json

    from ft_desk.trainer.demo import demo_data_path

    lines = demo_data_path().read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line)["messages"][-1]["content"] for line in lines if line.strip()]


def test_llama_cpp_reads_the_same_vocabulary_and_weights(spm_gguf):
    """llama.cpp (when llama-cpp-python is installed) tokenizes plain text like the original and computes the same
    logits. Where its sentencepiece rules differ from Hugging Face's Metaspace (see gguf_writer's docstring), the
    difference is exactly the documented one: an extra "▁" before text that follows a special token or that starts
    with a space. No GGUF key changes this, so the test pins it."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out, facts = spm_gguf
    original = AutoTokenizer.from_pretrained(model_dir)
    llm = llama_cpp.Llama(model_path=str(out / facts["file"]), n_ctx=256, logits_all=True, verbose=False)

    def llama_ids(text):
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    plain = [t for t in TEXTS + _demo_replies(200) if t and not t[0].isspace() and "<" not in t and "[" not in t]
    assert len(plain) > 200
    for text in plain:
        assert llama_ids(text) == original(text)["input_ids"], text
    space = original.convert_tokens_to_ids("▁")
    assert llama_ids(" leading space") == [1, space] + original(" leading space")["input_ids"][1:]
    after_special = "[INST] Hi [/INST]"
    ids = original(after_special)["input_ids"]
    assert llama_ids(after_special) == ids[:2] + [space] + ids[2:]  # "[INST]", "▁", "▁Hi", "▁", "[/INST]"

    chat = original.apply_chat_template(MESSAGES, tokenize=True)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(input_ids=torch.tensor([chat])).logits[0].double(), -1)
    llm.eval(chat)
    got = torch.log_softmax(torch.tensor(llm.scores[: len(chat)], dtype=torch.float64), -1)
    llm.close()
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert kl < 1e-5, kl
