"""Ollama export: a Modelfile beside the GGUF, so `ollama create NAME -f Modelfile` gives a model that formats
chats the way it was trained and stops at its turn-end token.

The TEMPLATE is Ollama's Go-template form of the model's chat template. Which one is decided by rendering the
model's own (Jinja) chat template on a probe conversation and matching the result against each family's known
rendering (ChatML, Llama 3, Gemma, Mistral [INST], Phi-3), so a template that merely looks similar is not taken
for one that formats differently. A template that matches none gets no TEMPLATE line (Ollama then reads the chat
template stored in the GGUF) and the report says so. PARAMETER stop lists the turn-end and EOS tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


_S, _U, _A = "Probe system 5120.", "Probe question 7431?", "Probe answer 9265."

FAMILIES = (
    TemplateFamily(
        name="chatml",
        go_template=(
            "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
            "<|im_start|>assistant\n"
        ),
        expected="<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n{U}<|im_end|>\n<|im_start|>assistant\n{A}"
                 "<|im_end|>\n",
        expected_no_system="<|im_start|>user\n{U}<|im_end|>\n<|im_start|>assistant\n{A}<|im_end|>\n",
        stops=("<|im_end|>", "<|im_start|>"),
    ),
    TemplateFamily(
        name="llama3",
        go_template=(
            "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
            "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
            "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        expected="<|start_header_id|>system<|end_header_id|>\n\n{S}<|eot_id|><|start_header_id|>user"
                 "<|end_header_id|>\n\n{U}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{A}<|eot_id|>",
        expected_no_system="<|start_header_id|>user<|end_header_id|>\n\n{U}<|eot_id|><|start_header_id|>assistant"
                           "<|end_header_id|>\n\n{A}<|eot_id|>",
        stops=("<|eot_id|>", "<|start_header_id|>"),
    ),
    TemplateFamily(
        name="gemma",
        go_template=(
            "{{- range $i, $m := .Messages }}<start_of_turn>{{ if eq $m.Role \"assistant\" }}model"
            "{{ else }}user{{ end }}\n{{ if and (eq $i 0) $.System }}{{ $.System }}\n\n{{ end }}"
            "{{ $m.Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"
        ),
        expected="<start_of_turn>user\n{S}\n\n{U}<end_of_turn>\n<start_of_turn>model\n{A}<end_of_turn>\n",
        expected_no_system="<start_of_turn>user\n{U}<end_of_turn>\n<start_of_turn>model\n{A}<end_of_turn>\n",
        stops=("<end_of_turn>", "<start_of_turn>"),
    ),
    TemplateFamily(
        name="mistral",
        go_template=(
            "{{- range $i, $m := .Messages }}{{ if eq $m.Role \"user\" }}[INST] "
            "{{ if and (eq $i 0) $.System }}{{ $.System }}\n\n{{ end }}{{ $m.Content }} [/INST]"
            "{{ else }}{{ $m.Content }}</s>{{ end }}{{ end }}"
        ),
        expected="[INST] {S}\n\n{U} [/INST]{A}</s>",
        expected_no_system="[INST] {U} [/INST]{A}</s>",
        stops=("[INST]", "</s>"),
    ),
    TemplateFamily(
        name="phi3",
        go_template=(
            "{{- if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
            "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"
        ),
        expected="<|system|>\n{S}<|end|>\n<|user|>\n{U}<|end|>\n<|assistant|>\n{A}<|end|>\n",
        expected_no_system="<|user|>\n{U}<|end|>\n<|assistant|>\n{A}<|end|>\n",
        stops=("<|end|>", "<|user|>"),
    ),
)


def _strip_bos(text: str, tokenizer) -> str:
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos):] if bos and text.startswith(bos) else text


def match_family(tokenizer) -> TemplateFamily | None:
    """The family whose rendering equals the model's own template's rendering of the probe conversation."""
    from .chat import render_probe

    with_system = render_probe(tokenizer, system=True)
    without = render_probe(tokenizer, system=False)
    for family in FAMILIES:
        ok_plain = without is not None and _strip_bos(without, tokenizer) == family.expected_no_system.format(
            U=_U, A=_A)
        ok_system = with_system is None or _strip_bos(with_system, tokenizer) == family.expected.format(
            S=_S, U=_U, A=_A)
        if ok_plain and ok_system:
            return family
    return None


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


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

    from ..run import slug
    from .chat import turn_end_tokens

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
    model_name = slug(name or source.run_name)
    notes = []
    if family is None:
        notes.append("the chat template matches none of ChatML, Llama 3, Gemma, Mistral, Phi-3: the Modelfile has no "
                     "TEMPLATE, so Ollama uses the chat template stored in the GGUF")
    return {"modelfile": MODELFILE, "template_family": family.name if family else None, "stops": stops,
            "ollama_name": model_name, "notes": notes}
