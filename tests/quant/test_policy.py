"""4-bit policy: BitsAndBytesConfig contents, 4-bit storage arithmetic, and the CPU repack guard on a real model."""

from __future__ import annotations

import pytest

from ft_desk.quant import policy


def test_bnb_config_carries_every_setting():
    import torch

    cfg = policy.bnb_config("nf4", True, "bfloat16", ("lm_head",))
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert cfg.bnb_4bit_quant_type == "nf4"
    assert cfg.bnb_4bit_use_double_quant is True
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert cfg.llm_int8_skip_modules == ["lm_head"]
    fp4 = policy.bnb_config("fp4", False, "float32", ())
    assert fp4.bnb_4bit_quant_type == "fp4" and fp4.bnb_4bit_use_double_quant is False
    assert fp4.bnb_4bit_compute_dtype == torch.float32
    assert not fp4.llm_int8_skip_modules


def test_bad_quant_type_and_dtype_name_the_valid_values():
    with pytest.raises(ValueError, match="nf4, fp4"):
        policy.bnb_config("int4", True, "float32", ())
    with pytest.raises(ValueError, match="bfloat16, float16, float32"):
        policy.bnb_config("nf4", True, "auto", ())


def test_four_bit_bytes_match_the_qlora_paper_bits_per_weight():
    n = 6_476_005_376  # Llama-2-7B's decoder linears
    bits_dq = policy.four_bit_bytes(n, double_quant=True) * 8 / n
    bits = policy.four_bit_bytes(n, double_quant=False) * 8 / n
    # QLoRA paper, section 3: 32/64 = 0.5 bits of constants per weight, 8/64 + 32/(64*256) = 0.127 with DQ.
    assert bits == pytest.approx(4.5, abs=1e-3)
    assert bits_dq == pytest.approx(4.127, abs=1e-3)


def test_four_bit_bytes_follow_the_blocksize_constant(monkeypatch):
    base = policy.four_bit_bytes(1 << 20, double_quant=False)
    monkeypatch.setattr(policy, "BLOCKSIZE", 128)
    assert policy.four_bit_bytes(1 << 20, double_quant=False) == base - (1 << 20) // 64 * 4 + (1 << 20) // 128 * 4


@pytest.fixture(scope="module")
def misaligned_model_dir(tmp_path_factory):
    """A real tiny Llama whose MLP is 72 wide: gate_proj/up_proj out_features are not multiples of 32."""
    from ft_desk.trainer.demo import TinyShape, build_tiny_model

    shape = TinyShape(vocab_size=256, hidden_size=64, intermediate_size=72, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    return build_tiny_model(tmp_path_factory.mktemp("misaligned"), shape, texts=["hello world, hello desk"] * 20)


def _load_4bit(folder):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=policy.bnb_config("nf4", True, "float32", ["lm_head"]),
        dtype=torch.float32, device_map={"": "cpu"},
    )


def test_cpu_repack_guard_keeps_eval_working_on_misaligned_layers(misaligned_model_dir):
    pytest.importorskip("bitsandbytes")
    import torch

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model = _load_4bit(misaligned_model_dir)
    # bitsandbytes' CPU repack works on blocks of 32 output features: these two layers would trip its assertion.
    misaligned = [name for name, m in policy.four_bit_layers(model) if m.out_features % 32]
    assert misaligned == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    repacks = any(m.support_avx512bf16_for_cpu for _, m in policy.four_bit_layers(model))
    model.train()
    with torch.no_grad():
        training_path = model(ids).logits  # train mode: dequantize-then-matmul, any width works
    if repacks:
        # Without the guard, eval + no_grad switches to the repacked layout, which asserts on these widths.
        model.eval()
        with pytest.raises(AssertionError, match="divisible"), torch.no_grad():
            model(ids)
        model = _load_4bit(misaligned_model_dir)  # the failed attempt left some layers repacked

    changed = policy.disable_cpu_repack(model)
    assert changed == (len(policy.four_bit_layers(model)) if repacks else 0)
    model.eval()
    with torch.no_grad():
        eval_path = model(ids).logits
    # Same path as training, so the same numbers: evaluation measures what was trained.
    assert torch.allclose(eval_path, training_path, atol=1e-5)
