"""What training, chat, eval and export share about a tokenizer's chat template: where an assistant turn ends.

The turn-end token is read off the template itself: a probe conversation is rendered and the first token after
the assistant's text is taken when it is a special token (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`...).
No per-family table to fall out of date. `stop_token_ids` is EOS plus that token - what exported models declare.
Generation can also stop on the common turn-end tokens present in the vocabulary (`vocabulary_fallback=True`):
a base model that was never tuned on its template may still write them.

Works on any Hugging Face tokenizer; imports nothing heavy.
"""

from __future__ import annotations

PROBE_USER = "Probe question 7431?"
PROBE_ANSWER = "Probe answer 9265."
PROBE_SYSTEM = "Probe system 5120."

# Turn-end tokens of the common chat formats (ChatML, Llama 3, Gemma, Phi, Llama 2 / Mistral, GPT-style).
KNOWN_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")


def unsafe_template_error(exc: BaseException):
    """A UserError when `exc` is the Jinja sandbox refusing a chat template that reaches for Python internals
    (`''.__class__`, `cycler.__init__`...), else None. transformers renders templates in a sandbox; ft-desk says
    what happened instead of showing the sandbox's traceback."""
    if type(exc).__name__ != "SecurityError" or "jinja2" not in type(exc).__module__:
        return None
    from ft_desk.trainer.errors import ModelError

    return ModelError(f"the model's chat template tries to reach Python internals ({str(exc)[:120]}); the template "
                      "sandbox refused to run it",
                      hint="use a model whose chat template is plain Jinja, or set data.chat_template=none; "
                           "do not trust this model's files")


def apply_template(tokenizer, messages, **kwargs):
    """tokenizer.apply_chat_template, with a sandbox refusal as one sentence (unsafe_template_error)."""
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as exc:  # noqa: BLE001 - only the sandbox's refusal is translated; anything else propagates
        error = unsafe_template_error(exc)
        if error is not None:
            raise error from None
        raise


def render_probe(tokenizer, system: bool = False) -> str | None:
    """The chat template applied to a fixed user/assistant exchange, or None without a usable template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_ANSWER}]
    if system:
        messages.insert(0, {"role": "system", "content": PROBE_SYSTEM})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template may reject a role order (any error type); the caller falls back
        error = unsafe_template_error(exc)
        if error is not None:
            raise error from None
        return None


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    return ids


def turn_end_tokens(tokenizer) -> list[str]:
    """The special token(s) the chat template writes right after an assistant message."""
    rendered = render_probe(tokenizer)
    if rendered is None or PROBE_ANSWER not in rendered:
        return []
    tail = rendered.split(PROBE_ANSWER, 1)[1]
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


def stop_token_ids(tokenizer, *, vocabulary_fallback: bool = False) -> list[int]:
    """EOS plus the template's turn-end token(s), without duplicates, in that order.

    vocabulary_fallback=True adds the known turn-end tokens the vocabulary has (for generation); exports leave it
    off so a model declares only what its template writes.
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for tid in ([eos] if isinstance(eos, int) else list(eos or [])):
        if tid not in ids:
            ids.append(tid)
    for text in turn_end_tokens(tokenizer):
        tid = tokenizer.convert_tokens_to_ids(text)
        if isinstance(tid, int) and tid >= 0 and tid not in ids:
            ids.append(tid)
    if vocabulary_fallback:
        for text in KNOWN_TURN_END_TOKENS:
            tid = tokenizer.convert_tokens_to_ids(text)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0 and tid not in ids:
                ids.append(tid)
    return ids
