"""The one generate(): batched (left-padded) greedy output equals one prompt at a time and a plain greedy loop,
generation ends at a stop token, streaming sees every new token, and a tokenizer without a pad token still works."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from ft_desk.trainer.generation import Sampling, generate, pad_id_for

MAX_NEW = 10


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _prompts():
    rng = random.Random(7)
    return [[rng.randrange(10, 1000) for _ in range(n)] for n in (5, 13, 2, 9)]  # different lengths


def _plain_greedy(model, ids, steps):
    """Argmax of the full forward pass, token by token (no cache, no padding)."""
    import torch

    ids = list(ids)
    new = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            new.append(nxt)
    return new


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = _prompts()
    single = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, stop_ids=[], batch_size=1)
    batched = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, stop_ids=[], batch_size=3)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]
    for prompt, g in zip(prompts, single):  # in prompt order, and greedy
        assert list(g.token_ids) == _plain_greedy(model, prompt, MAX_NEW)
        assert g.tokens == MAX_NEW and not g.stopped
        assert g.text == tokenizer.decode(list(g.token_ids), skip_special_tokens=True).strip()


def test_generation_stops_at_a_stop_token(tiny):
    model, tokenizer = tiny
    prompts = _prompts()
    free = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, stop_ids=[])
    # A token first generated part-way through the longest prompt's answer becomes the stop token.
    row = list(free[1].token_ids)
    at = next(k for k in range(2, len(row)) if row[k] not in row[:k])
    for batch_size in (1, 4):
        out = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, stop_ids=[row[at]], batch_size=batch_size)
        assert list(out[1].token_ids) == row[: at + 1]
        assert out[1].stopped and out[1].tokens == at + 1
        for g, f in zip(out, free):  # every row ends at its first stop token, or runs to the limit without one
            full = list(f.token_ids)
            end = full.index(row[at]) + 1 if row[at] in full else len(full)
            assert list(g.token_ids) == full[:end]
            assert g.stopped == (row[at] in full)


def test_streaming_sees_each_new_token(tiny):
    model, tokenizer = tiny
    seen: list[int] = []
    (g,) = generate(model, tokenizer, [_prompts()[0]], max_new_tokens=MAX_NEW, stop_ids=[], on_token=seen.append)
    assert seen == list(g.token_ids)
    with pytest.raises(ValueError, match="exactly one prompt"):
        generate(model, tokenizer, _prompts(), max_new_tokens=2, stop_ids=[], on_token=seen.append)


def test_a_tokenizer_without_pad_token_pads_with_the_first_stop_id(tiny, monkeypatch):
    model, tokenizer = tiny
    prompts = _prompts()
    expected = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, stop_ids=[], batch_size=4)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    monkeypatch.setattr(tokenizer, "pad_token", None)
    assert tokenizer.pad_token_id is None
    assert pad_id_for(tokenizer, [stop]) == stop
    out = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, stop_ids=[stop], batch_size=4)
    for g, e in zip(out, expected):
        full = list(e.token_ids)
        assert list(g.token_ids) == (full[: full.index(stop) + 1] if stop in full else full)
    assert pad_id_for(SimpleNamespace(pad_token_id=None, eos_token_id=[5, 6]), []) == 5


def test_sampling_is_seeded(tiny):
    model, tokenizer = tiny
    prompts = _prompts()
    hot = Sampling(temperature=5.0, top_p=1.0, seed=3)
    a = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, stop_ids=[], batch_size=4, sampling=hot)
    b = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, stop_ids=[], batch_size=4, sampling=hot)
    greedy = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, stop_ids=[], batch_size=4)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in greedy]


# --- CPU speed: the 4-bit weights dequantized once per generate call, not per token -------------------------------

@pytest.fixture(scope="module")
def four_bit(tiny_model_dir):
    """The tiny model loaded as a qlora run loads it, with a LoRA adapter whose B is not zero (so it matters)."""
    import torch

    from ft_desk.trainer.presets import load_config
    from ft_desk.trainer.training.model import attach_lora, load_base

    cfg = load_config(["qlora"], [f"model.name={tiny_model_dir}", "train.device=cpu"])
    model, tokenizer, _ = load_base(cfg, "cpu")
    model = attach_lora(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model.eval(), tokenizer


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_the_dense_inference_copy_computes_what_the_4bit_layers_compute(four_bit, monkeypatch):
    import torch

    from ft_desk.trainer import generation
    from ft_desk.trainer.generation import inference_weights

    monkeypatch.setattr(generation, "DENSE_DTYPE", "compute")  # the training path's dtype, not bf16
    model, _ = four_bit
    ids = _prompts()[1]
    expected = _logits(model, ids)
    with model.disable_adapter():
        expected_base = _logits(model, ids)
    assert not torch.allclose(expected, expected_base, atol=1e-3)  # the adapter changes the output
    with inference_weights(model) as switched:
        assert switched == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down); lm_head stays 16-bit
        got = _logits(model, ids)
        with model.disable_adapter():  # chat's /base: the 4-bit base alone, dequantized on first use
            got_base = _logits(model, ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)  # the adapter merged: float rounding apart
    assert torch.equal(got_base, expected_base)  # the base: the training path's dequantization and matmul


def test_on_a_cpu_with_native_bf16_the_dense_copy_is_bf16_and_close(four_bit, monkeypatch):
    import torch

    from ft_desk.quant.policy import four_bit_layers
    from ft_desk.trainer import generation

    model, _ = four_bit
    ids = _prompts()[1]
    expected = _logits(model, ids)
    monkeypatch.setattr(generation, "_cpu_bf16", lambda: True)
    monkeypatch.setattr(generation, "DENSE_DTYPE", "auto")
    layers = [m for _, m in four_bit_layers(model)]
    assert generation.dense_bytes(model) == sum(m.in_features * m.out_features * 2 for m in layers)
    with generation.inference_weights(model):
        got = _logits(model, ids)
        assert {vars(m)["forward"].__class__.__name__ for m in layers} == {"_DenseForward"}
    assert not torch.equal(got, expected)  # bf16 weights really were used
    assert torch.allclose(got, expected, atol=0.05, rtol=0.02)
    monkeypatch.setattr(generation, "_cpu_bf16", lambda: False)
    assert generation.dense_bytes(model) == sum(m.in_features * m.out_features * 4 for m in layers)


def test_generation_with_the_dense_copy_writes_what_the_per_token_path_writes(four_bit, monkeypatch):
    from ft_desk.trainer import generation

    model, tokenizer = four_bit
    prompts = _prompts()
    monkeypatch.setattr(generation, "DENSE_DTYPE", "compute")  # fp32 like the per-token path (bf16: see below)
    fast = generation.generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, stop_ids=[], batch_size=2)
    monkeypatch.setattr(generation, "DENSE_RAM_SHARE", 0.0)  # no room for a dense copy: dequantize per token
    slow = generation.generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, stop_ids=[], batch_size=2)
    assert [g.token_ids for g in fast] == [g.token_ids for g in slow]


def test_the_dense_copy_is_dropped_after_the_block_and_skipped_without_room(four_bit):
    import torch

    from ft_desk.quant.policy import four_bit_layers
    from ft_desk.trainer.generation import dense_bytes, inference_weights

    model, _ = four_bit
    layers = [m for _, m in four_bit_layers(model)]
    need = dense_bytes(model)
    with inference_weights(model, available=need):  # the copy may use half of what is available: too big
        assert not any("forward" in vars(m) for m in layers)
    with inference_weights(model):
        with inference_weights(model) as inner:  # nested (chat keeps one open for the session): nothing twice
            assert inner == 0
        assert all("forward" in vars(m) for m in layers)
    assert not any("forward" in vars(m) for m in layers)  # training afterwards uses the 4-bit layers again
    model.train()
    out = model(input_ids=torch.tensor([_prompts()[0]]))
    assert out.logits.requires_grad
    model.eval()
