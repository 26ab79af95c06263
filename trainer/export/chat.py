"""What an exported model needs to know about its chat format: the token that ends an assistant turn (so
generation stops there), and how validation rows become the token ids both models are compared on.

The turn-end token is read off the chat template itself: a probe conversation is rendered and the first token
after the assistant's text is taken when it is a special token (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`,
`</s>`...). No per-family table to fall out of date.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_PROBE_USER = "Probe question 7431?"
_PROBE_ANSWER = "Probe answer 9265."


def render_probe(tokenizer, system: bool = False) -> str | None:
    """The chat template applied to a fixed user/assistant exchange, or None without a usable template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]
    if system:
        messages.insert(0, {"role": "system", "content": "Probe system 5120."})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template may reject a role order; the caller falls back
        return None


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    return ids


def turn_end_tokens(tokenizer) -> list[str]:
    """The special token(s) the chat template writes right after an assistant message."""
    rendered = render_probe(tokenizer)
    if rendered is None or _PROBE_ANSWER not in rendered:
        return []
    tail = rendered.split(_PROBE_ANSWER, 1)[1]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    specials = _special_ids(tokenizer)
    found = []
    for tid in ids[:2]:
        if tid in specials:
            found.append(tokenizer.convert_ids_to_tokens(tid))
            break
        if tokenizer.decode([tid]).strip():
            break  # plain text follows the answer: this template has no turn-end token
    return found


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the template's turn-end token(s), without duplicates."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for tid in ([eos] if isinstance(eos, int) else list(eos or [])):
        if tid not in ids:
            ids.append(tid)
    for text in turn_end_tokens(tokenizer):
        tid = tokenizer.convert_tokens_to_ids(text)
        if isinstance(tid, int) and tid >= 0 and tid not in ids:
            ids.append(tid)
    return ids


@dataclass(frozen=True)
class VerifyExample:
    """One validation row as token ids (scored), and optionally a prompt to generate from."""

    input_ids: list[int]
    prompt_ids: list[int] | None
    text: str
    add_special_tokens: bool


def _messages(row: dict[str, Any]) -> list[dict[str, str]] | None:
    for key in ("messages", "conversations"):
        value = row.get(key)
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            out = []
            for m in value:
                role = m.get("role", m.get("from"))
                content = m.get("content", m.get("value"))
                if isinstance(role, str) and isinstance(content, str):
                    role = {"human": "user", "gpt": "assistant"}.get(role, role)
                    out.append({"role": role, "content": content})
            return out or None
    return None


def row_text(row: dict[str, Any], tokenizer) -> tuple[str, str | None]:
    """(full text, generation prompt or None) for one validation row."""
    messages = _messages(row)
    if messages is not None and getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = None
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last:
            prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        return full, prompt
    if messages is not None:
        return "\n".join(m["content"] for m in messages), None
    if isinstance(row.get("text"), str):
        return row["text"], None
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return row["prompt"] + row["completion"], row["prompt"]
    strings = [v for v in row.values() if isinstance(v, str)]
    return "\n".join(strings), None


def encode(tokenizer, text: str, templated: bool) -> list[int]:
    # A rendered chat template already holds its BOS and other specials; plain text gets the tokenizer's own.
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


def verify_examples(rows: list[dict[str, Any]], tokenizer, max_tokens_per_row: int) -> list[VerifyExample]:
    templated = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for row in rows:
        full, prompt = row_text(row, tokenizer)
        is_chat = templated and _messages(row) is not None
        ids = encode(tokenizer, full, is_chat)[:max_tokens_per_row]
        if len(ids) < 2:
            continue
        prompt_ids = encode(tokenizer, prompt, is_chat) if prompt else None
        out.append(VerifyExample(input_ids=ids, prompt_ids=prompt_ids, text=full, add_special_tokens=not is_chat))
    return out
