"""Modelfile content: the template family is recognised from the model's own chat template, stops are right."""

from __future__ import annotations

import pytest

from ft_desk.trainer.export.ollama import match_family, modelfile_text

# Minimal Jinja templates that render like each family (written for these tests).
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
          "m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% set sys = '' %}{% if messages[0]['role'] == 'system' %}"
         "{% set sys = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}{% endif %}"
         "{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' + "
         "(sys if loop.first else '') + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% set sys = '' %}{% if messages[0]['role'] == 'system' %}"
           "{% set sys = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}{% endif %}"
           "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + (sys if loop.first else '') + "
           "m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
CHATML_NO_NEWLINE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}"
                     "{% endfor %}")


@pytest.fixture
def tokenizer(llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    tok.add_special_tokens({"additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]})
    return tok


def test_chatml_model_gets_chatml_template_and_im_end_stop(tokenizer):
    family = match_family(tokenizer)
    assert family is not None and family.name == "chatml"
    text = modelfile_text("tiny-q8_0.gguf", family, ["<|im_end|>", "<|im_start|>"], 1024)
    assert "FROM ./tiny-q8_0.gguf" in text
    assert 'TEMPLATE """{{- if .System }}<|im_start|>system' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER num_ctx 1024" in text


@pytest.mark.parametrize("template,name", [(LLAMA3, "llama3"), (GEMMA, "gemma")])
def test_other_families_are_recognised(tokenizer, template, name):
    tokenizer.chat_template = template
    assert match_family(tokenizer).name == name


def test_mistral_family_is_recognised(tokenizer):
    tokenizer.add_special_tokens({"eos_token": "</s>"})
    tokenizer.chat_template = MISTRAL
    assert match_family(tokenizer).name == "mistral"


def test_a_template_that_only_looks_similar_gets_no_template_line(tokenizer):
    tokenizer.chat_template = CHATML_NO_NEWLINE
    assert match_family(tokenizer) is None
    assert "TEMPLATE" not in modelfile_text("x.gguf", None, ["<|im_end|>"], 512)


def test_ollama_export_writes_modelfile_and_prints_the_create_command(qlora_run, out_dir):
    from ft_desk.trainer.events import ListSink
    from ft_desk.trainer.export.pipeline import ExportRequest, export_run

    event = export_run(ExportRequest(run_dir=qlora_run.run_dir, format="ollama", out=out_dir, verify=False,
                                     name="Support Desk"), ListSink())
    modelfile = (out_dir / "Modelfile").read_text()
    gguf_name = event["facts"]["file"]
    assert gguf_name.endswith("-q8_0.gguf") and (out_dir / gguf_name).is_file()
    assert f"FROM ./{gguf_name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert event["command"] == f"ollama create support-desk -f {out_dir / 'Modelfile'}"
