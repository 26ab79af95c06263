"""Ollama export: a Modelfile beside the GGUF, so `ollama create NAME -f Modelfile` gives a model that formats
chats the way it was trained and stops at its turn-end token.

The TEMPLATE is a Go text/template, executed the way Ollama executes it: before rendering, Ollama joins the
contents of all system messages into .System, keeps those messages in .Messages as well (versions before that
dropped them), merges consecutive messages of one role, and makes a Modelfile SYSTEM the system message of a chat
that opens without one. So each TEMPLATE writes the system prompt from .System only, skips system messages in its
loop over .Messages, and ends with the assistant's generation prompt; it renders the same under either behaviour.

Which family a model gets is decided by rendering its own (Jinja) chat template on a probe conversation and
matching the result against each family's rendering (ChatML, Llama 3, Gemma, Mistral's [INST] as spaced by
Mistral 7B Instruct v0.1's template, Phi-3), so a template that merely looks similar is not taken for one that
formats differently. A template that matches none gets no TEMPLATE line (Ollama then reads the chat template stored
in the GGUF) and the report says so.
PARAMETER stop lists the turn-end and EOS tokens.

Verified without Ollama (tests/trainer/export/test_ollama.py): each TEMPLATE, run by a Go text/template renderer written
for the tests (checked against Go's own text/template where a Go toolchain is installed) after Ollama's message
handling, in both its current and its older form, equals the family's Jinja templates rendered with
add_generation_prompt=True, BOS left out (llama.cpp prepends it from the GGUF's add_bos_token flag), for a user
turn alone, a system prompt (from the chat or the Modelfile) and a user turn, and multi-turn chats with and without
a system prompt. What a Go template cannot do the same way: Llama 3 and Gemma templates trim each message, Go
templates cannot; a system message in the middle of a chat is moved to the top and several are joined into one;
where the model's own template refuses a system message (Gemma 1/2, Mistral v0.1) the TEMPLATE puts it where the
family's later templates do, and the export says so (`template_notes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft_desk.trainer.chat_format import PROBE_ANSWER, PROBE_SYSTEM, PROBE_USER, render_probe, turn_end_tokens
from ft_desk.trainer.run_folder import slug

MODELFILE = "Modelfile"


@dataclass(frozen=True)
class TemplateFamily:
    name: str
    go_template: str
    """Ollama TEMPLATE body."""
    expected: str
    """How the family renders the probe conversation (see `_probe`), with {S}/{U}/{A} for the three texts."""
    expected_no_system: str
    stops: tuple[str, ...]
    system_prompt: str
    """What the TEMPLATE does with a system prompt, for the note shown when the model's own template refuses one."""


_S, _U, _A = PROBE_SYSTEM, PROBE_USER, PROBE_ANSWER

FAMILIES = (
    TemplateFamily(
        name="chatml",
        go_template=(
            "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
            "{{- range .Messages }}{{ if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
            "{{ end }}{{ end }}<|im_start|>assistant\n"
        ),
        expected="<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n{U}<|im_end|>\n<|im_start|>assistant\n{A}"
                 "<|im_end|>\n",
        expected_no_system="<|im_start|>user\n{U}<|im_end|>\n<|im_start|>assistant\n{A}<|im_end|>\n",
        stops=("<|im_end|>", "<|im_start|>"),
        system_prompt="a system prompt becomes a system turn",
    ),
    TemplateFamily(
        name="llama3",
        go_template=(
            "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
            "{{- range .Messages }}{{ if ne .Role \"system\" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
            "{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        expected="<|start_header_id|>system<|end_header_id|>\n\n{S}<|eot_id|><|start_header_id|>user"
                 "<|end_header_id|>\n\n{U}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{A}<|eot_id|>",
        expected_no_system="<|start_header_id|>user<|end_header_id|>\n\n{U}<|eot_id|><|start_header_id|>assistant"
                           "<|end_header_id|>\n\n{A}<|eot_id|>",
        stops=("<|eot_id|>", "<|start_header_id|>"),
        system_prompt="a system prompt becomes a system turn",
    ),
    TemplateFamily(
        name="gemma",
        # The system prompt opens the first user turn (Gemma 3's template does this; Gemma 1/2 refuse a system role).
        go_template=(
            "{{- $system := .System }}{{ range .Messages }}{{ if eq .Role \"user\" }}<start_of_turn>user\n"
            "{{ if $system }}{{ $system }}\n\n{{ $system = \"\" }}{{ end }}{{ .Content }}<end_of_turn>\n"
            "{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}"
            "<start_of_turn>model\n"
        ),
        expected="<start_of_turn>user\n{S}\n\n{U}<end_of_turn>\n<start_of_turn>model\n{A}<end_of_turn>\n",
        expected_no_system="<start_of_turn>user\n{U}<end_of_turn>\n<start_of_turn>model\n{A}<end_of_turn>\n",
        stops=("<end_of_turn>", "<start_of_turn>"),
        system_prompt="a system prompt is put at the start of the first user turn",
    ),
    TemplateFamily(
        name="mistral",
        # Mistral's convention for its v1 tokenizer: the system prompt opens the first user message.
        go_template=(
            "{{- $system := .System }}{{ range .Messages }}{{ if eq .Role \"user\" }}[INST] "
            "{{ if $system }}{{ $system }}\n\n{{ $system = \"\" }}{{ end }}{{ .Content }} [/INST]"
            "{{ else if eq .Role \"assistant\" }}{{ .Content }}</s>{{ end }}{{ end }}"
        ),
        expected="[INST] {S}\n\n{U} [/INST]{A}</s>",
        expected_no_system="[INST] {U} [/INST]{A}</s>",
        stops=("[INST]", "</s>"),
        system_prompt="a system prompt is put at the start of the first user message",
    ),
    TemplateFamily(
        name="phi3",
        go_template=(
            "{{- if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
            "{{- range .Messages }}{{ if eq .Role \"user\" }}<|user|>\n{{ .Content }}<|end|>\n"
            "{{ else if eq .Role \"assistant\" }}<|assistant|>\n{{ .Content }}<|end|>\n{{ end }}{{ end }}"
            "<|assistant|>\n"
        ),
        expected="<|system|>\n{S}<|end|>\n<|user|>\n{U}<|end|>\n<|assistant|>\n{A}<|end|>\n",
        expected_no_system="<|user|>\n{U}<|end|>\n<|assistant|>\n{A}<|end|>\n",
        stops=("<|end|>", "<|user|>"),
        system_prompt="a system prompt becomes a system turn",
    ),
)


def _strip_bos(text: str, tokenizer) -> str:
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos):] if bos and text.startswith(bos) else text


def _renders_as(rendered: str | None, expected: str, tokenizer) -> bool:
    """Whether a probe rendering is the family's. BOS is left out (llama.cpp adds it from the GGUF's add_bos flag);
    an EOS after the conversation is allowed: Phi-3's template ends a chat that asks for no reply with one, and
    Ollama always asks for a reply."""
    if rendered is None:
        return False
    text = _strip_bos(rendered, tokenizer)
    eos = getattr(tokenizer, "eos_token", None)
    return text == expected or bool(eos) and text == expected + eos


def match_family(tokenizer) -> TemplateFamily | None:
    """The family whose rendering equals the model's own template's rendering of the probe conversation."""
    with_system = render_probe(tokenizer, system=True)
    without = render_probe(tokenizer, system=False)
    for family in FAMILIES:
        ok_plain = _renders_as(without, family.expected_no_system.format(U=_U, A=_A), tokenizer)
        ok_system = with_system is None or _renders_as(with_system, family.expected.format(S=_S, U=_U, A=_A),
                                                       tokenizer)
        if ok_plain and ok_system:
            return family
    return None


def template_notes(tokenizer, family: TemplateFamily) -> list[str]:
    """Where Ollama's prompt cannot equal the model's own template: a refused system role, a BOS mismatch."""
    notes = []
    if render_probe(tokenizer, system=True) is None:
        notes.append(f"the model's chat template refuses system messages; in Ollama {family.system_prompt}")
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if bos and bos_id is not None:
        writes_bos = (render_probe(tokenizer) or "").startswith(bos)
        # The same test the GGUF writer uses for add_bos_token, which is what makes llama.cpp prepend BOS.
        adds_bos = tokenizer("a")["input_ids"][:1] == [bos_id]
        if writes_bos != adds_bos:
            notes.append(f"the chat template {'writes' if writes_bos else 'does not write'} {bos} but the tokenizer "
                         f"{'does not add' if writes_bos else 'adds'} it, so Ollama's prompts "
                         f"{'lack' if writes_bos else 'gain'} that token at the start")
    return notes


def _quote(text: str) -> str:
    # Ollama's Modelfile parser strips the quotes and reads no escapes; text holding a quote needs triple quotes.
    return f'"""{text}"""' if '"' in text else f'"{text}"'


def modelfile_text(gguf_file: str, family: TemplateFamily | None, stops: list[str], num_ctx: int) -> str:
    lines = [
        "# Made by ft-desk. Create the model with:  ollama create NAME -f Modelfile",
        f"FROM ./{gguf_file}",
    ]
    if family is not None:
        lines.append(f'TEMPLATE """{family.go_template}"""')
    for stop in stops:
        lines.append(f"PARAMETER stop {_quote(stop)}")
    lines += [
        "PARAMETER temperature 0.7",
        "PARAMETER top_p 0.9",
        "PARAMETER repeat_penalty 1.1",
        f"PARAMETER num_ctx {num_ctx}",
    ]
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, gguf_facts: dict[str, Any], tokenizer, source, name: str | None) -> dict[str, Any]:
    """Write folder/Modelfile; returns the command to run and what was chosen."""
    from transformers import AutoConfig

    family = match_family(tokenizer)
    stops: list[str] = []
    for text in [*turn_end_tokens(tokenizer), *(family.stops if family else ()), tokenizer.eos_token]:
        if text and text not in stops and text in tokenizer.get_vocab():
            stops.append(text)
    config = AutoConfig.from_pretrained(source.base_dir)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    # Note: Ollama's default context (2048 in older versions) truncates silently; 4096 fits most chats and is
    # capped by what the model supports.
    num_ctx = min(4096, int(getattr(text_config, "max_position_embeddings", 4096) or 4096))
    (folder / MODELFILE).write_text(modelfile_text(gguf_facts["file"], family, stops, num_ctx), encoding="utf-8")
    model_name = name or slug(source.run_name)  # --name was checked as an Ollama name (limits.check_ollama_name)
    notes = template_notes(tokenizer, family) if family is not None else []
    if family is None:
        notes.append("the chat template matches none of ChatML, Llama 3, Gemma, Mistral, Phi-3: the Modelfile has no "
                     "TEMPLATE, so Ollama uses the chat template stored in the GGUF")
    return {"modelfile": MODELFILE, "template_family": family.name if family else None, "stops": stops,
            "ollama_name": model_name, "notes": notes}
