"""From `Example` to token ids and labels: rendering, loss masking, truncation, generation prompts.

Conversations are rendered with the model's chat template (`tokenizer.apply_chat_template`) or, when there is
none or `data.chat_template=none`, plainly: the turns' texts joined by a newline (no newline is added where one
side already has whitespace at the join, so prompt/completion data keeps its own separator) with the tokenizer's
EOS token after every assistant turn. Raw text rows are the text plus EOS, every token trained.

Loss masking works on characters, then maps to tokens: for assistant turn i the template renders
messages[:i] with the generation prompt and messages[:i+1] without it; the characters in between (minus trailing
whitespace) are the reply and its turn-end marker (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`...), so the model
learns to stop. This holds for templates that inject a default system prompt (Qwen2.5) and ones that reshape the
header. Where a template does not render conversations as prefixes of each other, the reply text is searched for
instead and the token right after it (the turn end) is trained too. Characters map to tokens through the fast
tokenizer's offset mapping: a token carries loss when it overlaps a trained character span. Labels are aligned
with input_ids (not shifted); -100 marks tokens without loss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ft_desk.trainer.chat_format import unsafe_template_error
from ft_desk.trainer.data.formats import Example, Message, RowError
from ft_desk.trainer.errors import DataError
from ft_desk.trainer.recipe_sizing import token_limit

IGNORE = -100


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE (-100) where no loss
    where: str
    truncated: bool


@dataclass(frozen=True)
class Span:
    """Characters [start, end) carry loss; `plus_next` also trains the first token after `end` (the turn end)."""

    start: int
    end: int
    plus_next: bool = False


@dataclass(frozen=True)
class Rendering:
    text: str
    spans: tuple[Span, ...]  # trained characters (train_on=assistant); ignored for train_on=all
    prompt_end: int  # text[:prompt_end] is the generation prompt for the last reply
    reference: str  # the last reply (or, for a text row, what follows its cut: see text_split)
    add_special_tokens: bool  # plain renderings get the tokenizer's BOS; templates write their own


@dataclass
class Encoded:
    """An example's full (untruncated) token ids, labels and character offsets."""

    input_ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]]
    text: str


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _eos_text(tokenizer, source: str) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise DataError(
            source,
            "the tokenizer has no end-of-sequence token, so the model could not learn where a reply ends",
            "use a model whose tokenizer defines eos_token",
        )
    return eos


# A text row's last line that opens with a short label ("A:", "Answer:", "### Response:", "SQL:"): the label is
# the prompt's end, what follows it the answer. Up to four words before the colon, so a sentence is not a label.
_ANSWER_LABEL = re.compile(r"[ \t]*(?:#{1,4}[ \t]*)?[^\s:][^:\n]{0,30}?:(?=[ \t]*\S)")
TEXT_SPLITS = {
    "label": "up to the answer label of its last line (such as 'A:'); the expected answer is the rest",
    "line": "up to its last line; the expected answer is that line",
    "middle": "at the word nearest its middle (one line, nothing marks an answer); the expected answer is the rest",
}
"""How a raw-text row is cut into a prompt and an expected answer (eval, training samples): the rule's name and
how reports say it."""


def text_split(text: str) -> tuple[int, str]:
    """Where a raw-text row is cut into prompt and reference, and which TEXT_SPLITS rule cut it.

    A row of several lines is cut before its last line - after that line's label when it opens with one
    ("...\nQ: question\nA: answer" gives the prompt up to "A:" and the answer after it). A one-line row has no
    answer to find: it is cut at a word boundary near the middle."""
    body = text.rstrip()
    start = body.rfind("\n") + 1
    if start > 0 and body[:start].strip():
        label = _ANSWER_LABEL.match(body, start)
        if label is not None and len(label.group(0).split()) <= 4:
            return label.end(), "label"
        return start, "line"
    middle = len(text) // 2
    for distance in range(0, middle):
        for i in (middle - distance, middle + distance):
            if 0 < i < len(text) and text[i].isspace():
                return i, "middle"
    return middle, "middle"


def text_split_counts(examples) -> dict[str, int]:
    """How many raw-text examples each text_split rule cut (conversations are not counted)."""
    counts: dict[str, int] = {}
    for example in examples:
        if example.messages is None and example.text is not None:
            rule = text_split(example.text)[1]
            counts[rule] = counts.get(rule, 0) + 1
    return counts


def text_split_notes(examples) -> list[str]:
    """The report's note on how raw-text rows became prompt and reference (none for conversations)."""
    counts = text_split_counts(examples)
    if not counts:
        return []
    parts = [f"{n} cut {TEXT_SPLITS[rule]}" for rule, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return [f"text rows have no separate prompt and answer, so each row was split: {'; '.join(parts)}"]


class Renderer:
    """Renders and tokenizes examples for one tokenizer and data config (chat_template, train_on)."""

    def __init__(self, tokenizer, use_template: bool, train_on: str, source: str = "data") -> None:
        self.tokenizer = tokenizer
        self.use_template = use_template
        self.train_on = train_on
        self.source = source
        self.eos = _eos_text(tokenizer, source)

    @classmethod
    def for_data(cls, tokenizer, mode: str, train_on: str, examples: list[Example], source: str) -> "Renderer":
        """Choose how conversations are rendered (data.chat_template auto|model|none) and check the data fits."""
        template = has_chat_template(tokenizer)
        if mode == "model" and not template:
            raise DataError(
                source,
                "data.chat_template is `model` but the model's tokenizer has no chat template",
                "use an instruct/chat model, or set data.chat_template=none for plain rendering",
            )
        if mode == "auto" and not template:
            multi = next((e for e in examples if e.is_multi_turn), None)
            if multi is not None:
                raise DataError(
                    multi.where,
                    "this conversation has several turns but the model has no chat template to render them with",
                    "use an instruct/chat model, or set data.chat_template=none to join turns as plain text",
                )
        return cls(tokenizer, template and mode != "none", train_on, source)

    # ------------------------------------------------------------ rendering

    def _apply(self, messages: tuple[Message, ...], generation_prompt: bool) -> str:
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        return self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _render_template(self, example: Example) -> Rendering:
        messages = example.messages
        try:
            full = self._apply(messages, False)
        except Exception as exc:  # jinja raise_exception / TemplateError: the template refuses this conversation
            unsafe = unsafe_template_error(exc)
            if unsafe is not None:  # not this row's fault: the template itself is refused
                raise unsafe from None
            raise RowError(
                example.where, f"the model's chat template rejected this conversation ({exc})", "template",
                "check the order of roles (many templates need user and assistant to alternate)",
            ) from None
        spans: list[Span] = []
        cursor = 0
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            span = self._prefix_span(messages, i, full, cursor) or self._search_span(example, message, full, cursor)
            spans.append(span)
            cursor = span.end
        last = [m for m in messages if m.role == "assistant"][-1]
        return Rendering(full, tuple(spans), spans[-1].start, last.content, False)

    def _prefix_span(self, messages, i: int, full: str, cursor: int) -> Span | None:
        """The reply's characters from incremental renders, or None when the template is not prefix-stable."""
        if i == 0:
            return None  # a reply with nothing before it: templates may still prepend a default system prompt
        try:
            before = self._apply(messages[:i], True)
            upto = self._apply(messages[: i + 1], False)
        except Exception:
            return None
        end = len(upto.rstrip())
        if not (upto.startswith(before) and full.startswith(upto) and cursor <= len(before) < end):
            return None
        return Span(len(before), end)

    def _search_span(self, example: Example, message: Message, full: str, cursor: int) -> Span:
        start = full.find(message.content, cursor)
        if start < 0:
            stripped = message.content.strip()
            start = full.find(stripped, cursor)
            if start < 0:
                raise RowError(
                    example.where,
                    "the model's chat template rewrites this assistant turn, so its tokens cannot be located",
                    "template",
                    "set data.train_on=all, or data.chat_template=none for plain rendering",
                )
            return Span(start, start + len(stripped), plus_next=True)
        return Span(start, start + len(message.content), plus_next=True)

    def _render_plain(self, example: Example) -> Rendering:
        text = ""
        spans: list[Span] = []
        for message in example.messages:
            if text and not (text[-1].isspace() or message.content[:1].isspace()):
                text += "\n"
            start = len(text)
            text += message.content
            if message.role == "assistant":
                text += self.eos
                spans.append(Span(start, len(text)))
        last = [m for m in example.messages if m.role == "assistant"][-1]
        return Rendering(text, tuple(spans), spans[-1].start, last.content, True)

    def render(self, example: Example) -> Rendering:
        if example.messages is None:
            text = example.text + self.eos
            cut, _rule = text_split(example.text)
            return Rendering(text, (Span(0, len(text)),), cut, example.text[cut:].strip(), True)
        if self.use_template:
            return self._render_template(example)
        return self._render_plain(example)

    # ------------------------------------------------------------ tokens

    def _tokenize(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        raise DataError(
            self.source,
            "the model's tokenizer is a slow (Python) tokenizer; ft-desk needs a fast tokenizer to mask the loss",
            "use a model that ships tokenizer.json",
        )

    def encode(self, example: Example) -> Encoded:
        """Full token ids and labels of an example (not truncated)."""
        rendering = self.render(example)
        ids, offsets = self._tokenize(rendering.text, rendering.add_special_tokens)
        if self.train_on == "all" or example.messages is None:
            labels = list(ids)
        else:
            labels = _mask(ids, offsets, rendering.spans)
        return Encoded(ids, labels, offsets, rendering.text)

    def tokenize(self, example: Example, max_length: int | str) -> TokenizedExample:
        max_length = token_limit(max_length)  # auto (not sized yet): the cap
        enc = self.encode(example)
        truncated = len(enc.input_ids) > max_length
        return TokenizedExample(enc.input_ids[:max_length], enc.labels[:max_length], example.where, truncated)

    def generation_prompt(self, example: Example, max_length: int | str) -> tuple[list[int], str]:
        """Token ids of everything before the last reply (as rendered in training) and the reply itself."""
        max_length = token_limit(max_length)
        rendering = self.render(example)
        # With a prefix-stable template this is exactly messages[:last reply] rendered with the generation prompt.
        prompt = rendering.text[: rendering.prompt_end]
        ids, _ = self._tokenize(prompt, rendering.add_special_tokens)
        return ids[-max_length:], rendering.reference

    def segments(self, example: Example, max_length: int | str) -> list[tuple[str, bool]]:
        """The rendered example cut to max_length tokens as (text, trained) pieces, for showing what is learned."""
        max_length = token_limit(max_length)
        enc = self.encode(example)
        out: list[tuple[str, bool]] = []
        cursor = 0
        for token, label, (start, end) in list(zip(enc.input_ids, enc.labels, enc.offsets))[:max_length]:
            if start > cursor:
                _append(out, enc.text[cursor:start], False)
            if end > start:
                piece = enc.text[max(start, cursor) : end]
                cursor = max(cursor, end)
            else:
                piece = self.tokenizer.decode([token])
            _append(out, piece, label != IGNORE)
        return out


def _append(out: list[tuple[str, bool]], text: str, trained: bool) -> None:
    if not text:
        return
    if out and out[-1][1] == trained:
        out[-1] = (out[-1][0] + text, trained)
    else:
        out.append((text, trained))


def _mask(ids: list[int], offsets: list[tuple[int, int]], spans: tuple[Span, ...]) -> list[int]:
    """Labels: the token id where the token overlaps a trained span, IGNORE elsewhere."""
    labels = [IGNORE] * len(ids)
    k = 0
    for j, (start, end) in enumerate(offsets):
        if end <= start:
            continue  # a special token the tokenizer added (BOS): not part of any reply
        while k < len(spans) and spans[k].end <= start:
            k += 1
        if k < len(spans) and spans[k].start < end:
            labels[j] = ids[j]
    for span in spans:
        if span.plus_next:
            nxt = next((j for j, (s, e) in enumerate(offsets) if s >= span.end and e > s), None)
            if nxt is not None:
                labels[nxt] = ids[nxt]
    return labels


def example_renderer(tokenizer, cfg: Any, examples: list[Example], source: str = "data") -> Renderer:
    """A Renderer for these examples under a DataConfig (`chat_template`, `train_on`)."""
    return Renderer.for_data(tokenizer, cfg.chat_template, cfg.train_on, examples, source)
