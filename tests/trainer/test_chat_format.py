"""Turn-end and stop tokens read off a chat template: what training, chat, eval and export stop generating on."""

from __future__ import annotations

import sys

import pytest

from ft_desk.trainer.chat_format import render_probe, stop_token_ids, turn_end_tokens


@pytest.fixture()
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)  # ChatML; EOS <|im_end|>, pad <|endoftext|>


def test_chatml_turn_end_is_read_off_the_template(tokenizer):
    assert "Probe answer 9265.<|im_end|>" in render_probe(tokenizer)
    assert turn_end_tokens(tokenizer) == ["<|im_end|>"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tokenizer) == [im_end]  # EOS and turn end are the same token: listed once


def test_generation_also_stops_on_known_turn_end_tokens_in_the_vocabulary(tokenizer):
    ids = stop_token_ids(tokenizer, vocabulary_fallback=True)
    assert ids == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]


def test_a_template_with_plain_text_after_the_answer_has_no_turn_end(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    assert turn_end_tokens(tokenizer) == []
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


def test_without_a_template_only_eos_stops(tokenizer):
    tokenizer.chat_template = None
    assert render_probe(tokenizer) is None and turn_end_tokens(tokenizer) == []
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


def test_a_template_that_refuses_a_system_message_renders_none(tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}<|im_end|>"
                               "{% endfor %}")
    assert render_probe(tokenizer, system=True) is None
    assert turn_end_tokens(tokenizer) == ["<|im_end|>"]


def test_importing_it_loads_no_torch():
    import subprocess

    code = "import sys, ft_desk.trainer.chat_format, ft_desk.trainer.generation; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
