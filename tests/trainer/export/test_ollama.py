"""Modelfile content: the template family is recognised from the model's own chat template, the stops are right,
and the TEMPLATE, executed the way Ollama executes it (tests/trainer/export/gotemplate.py), renders every chat
exactly as the model's own template does with add_generation_prompt=True (BOS aside: llama.cpp adds it from the
GGUF)."""

from __future__ import annotations

import pytest
from jinja2.exceptions import TemplateError as JinjaError

from ft_desk.trainer.demo import CHATML_TEMPLATE
from ft_desk.trainer.export.ollama import FAMILIES, match_family, modelfile_text, template_notes

from .gotemplate import (
    TemplateError,
    build_go_renderer,
    go_render,
    go_toolchain,
    ollama_render,
    ollama_values,
    parse_modelfile,
    render,
)

# Jinja chat templates written for these tests, each rendering like a family's published template.
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
          "m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# As Meta's Llama 3 Instruct: BOS opens the first message, every message is trimmed.
LLAMA3_META = ("{% for m in messages %}{% set turn = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
               "m['content'] | trim + '<|eot_id|>' %}{% if loop.first %}{{ bos_token + turn }}{% else %}{{ turn }}"
               "{% endif %}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# As Gemma 3: a system prompt opens the first user turn.
GEMMA = ("{{ bos_token }}{% set sys = '' %}{% if messages[0]['role'] == 'system' %}"
         "{% set sys = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}{% endif %}"
         "{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' + "
         "(sys if loop.first else '') + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# As Gemma 1 and 2: no system role, roles alternate, messages trimmed.
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
          "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' + m['content'] | trim + "
          "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# Mistral's v1 [INST] format with its documented system convention: the prompt opens the first user message.
MISTRAL = ("{{ bos_token }}{% set sys = '' %}{% if messages[0]['role'] == 'system' %}"
           "{% set sys = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}{% endif %}"
           "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + (sys if loop.first else '') + "
           "m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
# As Mistral 7B Instruct v0.1 shipped: user and assistant only, alternating.
MISTRAL_V01 = ("{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate') }}{% endif %}{% if m['role'] == 'user' %}"
               "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
               "{{ m['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles are "
               "supported!') }}{% endif %}{% endfor %}")
# As Phi-3 / Phi-3.5 mini: an empty system prompt is skipped; a chat that asks for no reply ends with EOS.
PHI3 = ("{% for m in messages %}{% if m['role'] == 'system' and m['content'] %}"
        "{{ '<|system|>\n' + m['content'] + '<|end|>\n' }}{% elif m['role'] == 'user' %}"
        "{{ '<|user|>\n' + m['content'] + '<|end|>\n' }}{% elif m['role'] == 'assistant' %}"
        "{{ '<|assistant|>\n' + m['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
CHATML_NO_NEWLINE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}"
                     "{% endfor %}")

# (template, family, refuses a system message)
REFERENCES = [(CHATML_TEMPLATE, "chatml", False), (LLAMA3, "llama3", False), (LLAMA3_META, "llama3", False),
              (GEMMA, "gemma", False), (GEMMA2, "gemma", True), (MISTRAL, "mistral", False),
              (MISTRAL_V01, "mistral", True), (PHI3, "phi3", False)]
REFERENCE_IDS = ["chatml", "llama3", "llama3-meta", "gemma3", "gemma2", "mistral", "mistral-v0.1", "phi3"]
# Where a family's template refuses a system message, the TEMPLATE does what these (later) templates do.
SYSTEM_FOLDED = {"gemma": GEMMA, "mistral": MISTRAL}

SYSTEM = {"role": "system", "content": "You are the Cog & Compass help desk."}
ASK = {"role": "user", "content": "Can I return a compass after thirty days?"}
ANSWER = {"role": "assistant", "content": "Yes, within sixty days with the receipt."}
ASK_AGAIN = {"role": "user", "content": "Do you ship to Norway?"}
CHATS = {"user": [ASK], "system-user": [SYSTEM, ASK], "system-user-assistant-user": [SYSTEM, ASK, ANSWER, ASK_AGAIN],
         "user-assistant-user": [ASK, ANSWER, ASK_AGAIN]}


@pytest.fixture
def tokenizer(llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>", "[INST]",
        "[/INST]", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    return tok


def family(name: str):
    return next(f for f in FAMILIES if f.name == name)


def jinja_prompt(tokenizer, template: str, chat: list[dict[str, str]]) -> str:
    """The model's own prompt for a reply, without the BOS that llama.cpp adds itself."""
    text = tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=True)
    return text.removeprefix(tokenizer.bos_token)


# ----------------------------------------------------------------------------------------- the Go template renderer

# Hand-computed Go text/template results (each also checked against Go itself, see the test at the end).
GO_CASES = [
    ('a  \n {{- "b" -}} \n\t c', {}, "abc"),  # trim markers eat every space, tab and newline beside them
    ('a {{ "b" }} c', {}, "a b c"),
    ("x\n{{- if true }}\ny{{ end }}", {}, "x\ny"),
    ("{{- range .L }}\n{{ . }}\n{{- end }}", {"L": ["a", "b"]}, "\na\nb"),
    ("x {{-3}} y", {}, "x -3 y"),  # no space after the dash: the number -3, nothing trimmed
    ("a{{ 3 -}}\n\n b", {}, "a3b"),
    ('{{ if eq .R "user" }}U{{ else if eq .R "assistant" }}A{{ else }}O{{ end }}', {"R": "assistant"}, "A"),
    ('{{ if eq .R "user" }}U{{ else if eq .R "assistant" }}A{{ else }}O{{ end }}', {"R": "tool"}, "O"),
    ('{{ eq .R "a" "b" "c" }} {{ ne .R "a" }}', {"R": "c"}, "true true"),
    ('{{ and "x" "" }}|{{ or "" "y" }}|{{ and "q" "z" }}|{{ not "" }}|{{ len "héllo" }}', {}, "|y|z|true|6"),
    ("{{ range $i, $m := .L }}{{ $i }}{{ $m }}{{ . }}{{ end }}", {"L": ["a", "b"]}, "0aa1bb"),
    ("{{ range $m := .L }}{{ $m }}{{ end }}", {"L": ["a", "b"]}, "ab"),
    ("{{ range $i, $_ := .L }}{{ $last := eq (len (slice $.L $i)) 1 }}{{ . }}{{ if $last }}<end>{{ end }}{{ end }}",
     {"L": ["a", "b"]}, "ab<end>"),
    ('{{ $s := "S" }}{{ range .L }}{{ if $s }}[{{ $s }}]{{ $s = "" }}{{ end }}{{ . }}{{ end }}', {"L": ["a", "b"]},
     "[S]ab"),  # `=` sets the outer variable, and it stays set in later iterations
    ('{{ $x := "a" }}{{ range .L }}{{ $x := . }}{{ end }}{{ $x }}', {"L": ["b"]}, "a"),  # `:=` in a range shadows
    ("{{ .Missing }}|{{ if .Missing }}y{{ else }}n{{ end }}", {}, "<no value>|n"),
    ("{{ range .L }}x{{ else }}empty{{ end }}", {"L": []}, "empty"),
    ("{{ if .E }}y{{ else }}n{{ end }}", {"E": ""}, "n"),
    ("{{ if .E }}y{{ else }}n{{ end }}", {"E": []}, "n"),
    ("{{ if .E }}y{{ else }}n{{ end }}", {"E": [""]}, "y"),
    ("{{ if .E }}y{{ else }}n{{ end }}", {"E": False}, "n"),
    ('{{ if and .A (eq .B "x") }}y{{ end }}', {"A": "", "B": "z"}, ""),
    ('{{ if or .A (eq .B "x") }}y{{ end }}', {"A": "", "B": "x"}, "y"),
    ('{{ "a\\tb\\n" }}{{ `raw\\n` }}{{ "}}" }}', {}, "a\tb\nraw\\n}}"),
]
# Invalid Go: Go refuses these too.
GO_ERRORS = [
    ('{{ "x"-}}', {}), ("{{ if true }}", {}), ("{{ end }}", {}), ("{{ else }}", {}), ("{{ if }}x{{ end }}", {}),
    ("{{ if true }}a{{ else }}b{{ else }}c{{ end }}", {}), ('{{ if true }}{{ $x := "1" }}{{ end }}{{ $x }}', {}),
    ('{{ eq "1" 1 }}', {}), ("{{ slice .L 3 }}", {"L": ["a"]}),
]
# Valid Go outside the subset: must be refused, never rendered approximately.
UNSUPPORTED = ["{{ with .X }}{{ end }}", "{{ .A | len }}", "{{/* note */}}", 'a {{- /* note */ -}} b',
               '{{ printf "%s" .A }}', "{{ range .L }}{{ break }}{{ end }}", "{{ template \"x\" }}", "{{ 1.5 }}"]


@pytest.mark.parametrize("source,data,expected", GO_CASES)
def test_go_renderer_matches_hand_computed_go_output(source, data, expected):
    assert render(source, data) == expected


@pytest.mark.parametrize("source,data", GO_ERRORS)
def test_go_renderer_refuses_what_go_refuses(source, data):
    with pytest.raises(TemplateError):
        render(source, data)


@pytest.mark.parametrize("source", UNSUPPORTED)
def test_go_renderer_refuses_syntax_outside_its_subset(source):
    with pytest.raises(TemplateError):
        render(source, {"X": "a", "A": "a", "L": ["a"]})


def test_a_message_is_a_struct_so_a_misspelt_field_is_an_error():
    with pytest.raises(TemplateError, match="can't evaluate field role"):
        ollama_render("{{ range .Messages }}{{ .role }}{{ end }}", [ASK])


def test_ollama_values_collate_system_messages_both_ways():
    chat = [SYSTEM, ASK, {"role": "user", "content": "Hello?"}, {"role": "system", "content": "Be brief."}]
    now = ollama_values(chat)
    assert now["System"] == "You are the Cog & Compass help desk.\n\nBe brief."
    assert [(m["Role"], m["Content"]) for m in now["Messages"]] == [
        ("system", SYSTEM["content"]), ("user", ASK["content"] + "\n\nHello?"), ("system", "Be brief.")]
    before = ollama_values(chat, keep_system_in_messages=False)
    assert before["System"] == now["System"] and [m["Role"] for m in before["Messages"]] == ["user"]
    assert ollama_values([ASK], system_default="Be kind.")["System"] == "Be kind."
    assert ollama_values([SYSTEM, ASK], system_default="Be kind.")["System"] == SYSTEM["content"]


# ----------------------------------------------------------------------------------------------- family recognition

def test_chatml_model_gets_chatml_template_and_im_end_stop(tokenizer):
    tokenizer.chat_template = CHATML_TEMPLATE
    chatml = match_family(tokenizer)
    assert chatml is not None and chatml.name == "chatml"
    text = modelfile_text("tiny-q8_0.gguf", chatml, ["<|im_end|>", "<|im_start|>"], 1024)
    assert "FROM ./tiny-q8_0.gguf" in text
    assert 'TEMPLATE """{{- if .System }}<|im_start|>system' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER num_ctx 1024" in text


@pytest.mark.parametrize("template,name,refuses_system", REFERENCES, ids=REFERENCE_IDS)
def test_each_family_is_recognised(tokenizer, template, name, refuses_system):
    tokenizer.chat_template = template
    found = match_family(tokenizer)
    assert found is not None and found.name == name


def test_a_template_that_only_looks_similar_gets_no_template_line(tokenizer):
    tokenizer.chat_template = CHATML_NO_NEWLINE
    assert match_family(tokenizer) is None
    assert "TEMPLATE" not in modelfile_text("x.gguf", None, ["<|im_end|>"], 512)


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_ollama_reads_back_the_template_and_stops_the_modelfile_holds(name):
    stops = [*family(name).stops, 'say "stop"']
    commands = parse_modelfile(modelfile_text("m.gguf", family(name), stops, 2048))
    assert dict(commands)["template"] == family(name).go_template
    assert [value for command, value in commands if command == "stop"] == stops
    assert dict(commands)["from"] == "./m.gguf" and dict(commands)["num_ctx"] == "2048"


# ------------------------------------------------------------------------------------ TEMPLATE == the model's prompt

@pytest.mark.parametrize("template,name,refuses_system", REFERENCES, ids=REFERENCE_IDS)
@pytest.mark.parametrize("keep_system", [True, False], ids=["ollama-now", "ollama-before"])
def test_ollama_prompt_equals_the_models_own_prompt(tokenizer, template, name, refuses_system, keep_system):
    go_template = family(name).go_template
    for label, chat in CHATS.items():
        reference = template
        if refuses_system and chat[0]["role"] == "system":
            with pytest.raises(JinjaError):
                jinja_prompt(tokenizer, template, chat)
            reference = SYSTEM_FOLDED[name]
        expected = jinja_prompt(tokenizer, reference, chat)
        assert ollama_render(go_template, chat, keep_system_in_messages=keep_system) == expected, label


@pytest.mark.parametrize("template,name,refuses_system", REFERENCES, ids=REFERENCE_IDS)
@pytest.mark.parametrize("keep_system", [True, False], ids=["ollama-now", "ollama-before"])
def test_modelfile_system_acts_as_the_chats_system_message(tokenizer, template, name, refuses_system, keep_system):
    reference = SYSTEM_FOLDED[name] if refuses_system else template
    go_template = family(name).go_template
    default = ollama_render(go_template, [ASK], system_default=SYSTEM["content"], keep_system_in_messages=keep_system)
    assert default == jinja_prompt(tokenizer, reference, [SYSTEM, ASK])
    own = {"role": "system", "content": "Answer in Norwegian."}
    overridden = ollama_render(go_template, [own, ASK, ANSWER, ASK_AGAIN], system_default=SYSTEM["content"],
                               keep_system_in_messages=keep_system)
    assert overridden == jinja_prompt(tokenizer, reference, [own, ASK, ANSWER, ASK_AGAIN])


def test_system_prompt_is_written_once_in_ollama_today():
    """The regression: with system messages kept in .Messages (current Ollama), a TEMPLATE that also looped over
    them printed the system prompt twice (ChatML, Llama 3, Phi-3), as a user turn (Gemma) or as a reply (Mistral)."""
    for f in FAMILIES:
        prompt = ollama_render(f.go_template, CHATS["system-user-assistant-user"])
        assert prompt.count(SYSTEM["content"]) == 1, f.name


def test_notes_say_where_ollama_cannot_follow_the_models_template(tokenizer):
    tokenizer.chat_template = CHATML_TEMPLATE
    assert template_notes(tokenizer, family("chatml")) == []
    tokenizer.chat_template = GEMMA2
    notes = template_notes(tokenizer, family("gemma"))
    assert "refuses system messages; in Ollama a system prompt is put at the start of the first user turn" in notes[0]
    # This tokenizer adds no BOS to what it encodes, so llama.cpp would not prepend the <s> the template writes.
    assert "writes <s> but the tokenizer does not add it" in notes[1]


# ---------------------------------------------------------------------------------------------------------- end to end

def test_ollama_export_writes_a_modelfile_whose_template_renders_the_trained_format(qlora_run, out_dir):
    from transformers import AutoTokenizer

    from ft_desk.trainer.events import ListSink
    from ft_desk.trainer.export.pipeline import ExportRequest, export_run

    event = export_run(ExportRequest(run_dir=qlora_run.run_dir, format="ollama", out=out_dir, verify=False,
                                     name="Support Desk"), ListSink())
    modelfile = (out_dir / "Modelfile").read_text()
    gguf_name = event["facts"]["file"]
    assert gguf_name.endswith("-q8_0.gguf") and (out_dir / gguf_name).is_file()
    assert f"FROM ./{gguf_name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert event["command"] == f"ollama create support-desk -f {out_dir / 'Modelfile'}"
    assert event["facts"]["template_family"] == "chatml"
    template = dict(parse_modelfile(modelfile))["template"]
    trained = AutoTokenizer.from_pretrained(qlora_run.model_dir)
    chat = CHATS["system-user-assistant-user"]
    assert ollama_render(template, chat) == trained.apply_chat_template(chat, tokenize=False,
                                                                         add_generation_prompt=True)


# --------------------------------------------------------------------------------- against Go, where Go is installed

@pytest.mark.skipif(go_toolchain() is None, reason="no Go toolchain installed (optional)")
def test_the_renderer_agrees_with_go_text_template(tmp_path):
    exe = build_go_renderer(tmp_path)
    jobs = [(source, data) for source, data, _ in GO_CASES]
    for f in FAMILIES:
        for chat in CHATS.values():
            for keep in (True, False):
                jobs.append((f.go_template, ollama_values(chat, keep_system_in_messages=keep)))
    results = go_render(exe, jobs + GO_ERRORS)
    for (source, data), result in zip(jobs, results):
        assert result == {"out": render(source, data)}, source
    for (source, _), result in zip(GO_ERRORS, results[len(jobs):]):
        assert "error" in result, source
