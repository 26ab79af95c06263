"""prepare_data: rendering, loss masking (assistant replies + turn end only), truncation, dedupe, split, prompts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from ft_desk.trainer.config import DataConfig
from ft_desk.trainer.data.prepare import (
    IGNORE,
    Example,
    Message,
    generation_prompt,
    load_examples,
    prepare_data,
    split_examples,
    write_examples_jsonl,
)
from ft_desk.trainer.data.render import example_renderer, text_split, text_split_counts, text_split_notes
from ft_desk.trainer.errors import DataError

# A Qwen2.5-like template: a default system prompt when the conversation has none (written for this test).
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma-like: renames the assistant role, trims content, ends turns with a plain-text marker.
TRIMMING_TEMPLATE = (
    "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (m['content'] | trim) + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Renders a conversation differently when asked for a generation prompt, so renders are not prefixes.
UNSTABLE_TEMPLATE = (
    "{% if add_generation_prompt %}{{ '<|im_start|>system\nthinking mode<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATION = (
    Message("user", "Where is my order CC-12345?"),
    Message("assistant", "Hi there! It left our Portland shop today."),
    Message("user", "Thanks. Can I return it later?"),
    Message("assistant", "Sure thing: you have 45 days.\n\nRide easy,\nMo"),
)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def trained_runs(tokenizer, input_ids, labels) -> list[str]:
    """The text of each contiguous run of tokens that carries loss."""
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def encode(tokenizer, example, **cfg):
    config = DataConfig(**cfg)
    renderer = example_renderer(tokenizer, config, [example])
    return renderer.tokenize(example, config.max_length)


def test_chatml_labels_are_exactly_the_replies_and_turn_end(tokenizer):
    example = Example(CONVERSATION, None, "x:1")
    tok = encode(tokenizer, example)
    assert tokenizer.decode(tok.input_ids).startswith("<|im_start|>user\nWhere is my order")
    assert trained_runs(tokenizer, tok.input_ids, tok.labels) == [
        CONVERSATION[1].content + "<|im_end|>",
        CONVERSATION[3].content + "<|im_end|>",
    ]
    assert not tok.truncated


def test_default_system_prompt_template_is_masked(tokenizer):
    tok_q = with_template(tokenizer, DEFAULT_SYSTEM_TEMPLATE)
    tok = encode(tok_q, Example(CONVERSATION, None, "x:1"))
    text = tok_q.decode(tok.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert trained_runs(tok_q, tok.input_ids, tok.labels) == [
        CONVERSATION[1].content + "<|im_end|>",
        CONVERSATION[3].content + "<|im_end|>",
    ]


def test_trimming_template_trains_what_it_renders(tokenizer):
    tok_g = with_template(tokenizer, TRIMMING_TEMPLATE)
    messages = (Message("user", "Hi"), Message("assistant", "  Hello there!  "))
    tok = encode(tok_g, Example(messages, None, "x:1"))
    assert trained_runs(tok_g, tok.input_ids, tok.labels) == ["Hello there!<end_of_turn>"]


def test_template_that_is_not_prefix_stable_falls_back_to_finding_replies(tokenizer):
    tok_u = with_template(tokenizer, UNSTABLE_TEMPLATE)
    tok = encode(tok_u, Example(CONVERSATION, None, "x:1"))
    assert trained_runs(tok_u, tok.input_ids, tok.labels) == [
        CONVERSATION[1].content + "<|im_end|>",
        CONVERSATION[3].content + "<|im_end|>",
    ]


def test_train_on_all_trains_every_token(tokenizer):
    tok = encode(tokenizer, Example(CONVERSATION, None, "x:1"), train_on="all")
    assert tok.labels == tok.input_ids


def test_plain_rendering_keeps_prompt_separator_and_appends_eos(tokenizer):
    example = Example((Message("user", "Q: capital of France?\nA:"), Message("assistant", " Paris")), None, "x:1")
    tok = encode(tokenizer, example, chat_template="none")
    assert tokenizer.decode(tok.input_ids) == "Q: capital of France?\nA: Paris" + tokenizer.eos_token
    assert trained_runs(tokenizer, tok.input_ids, tok.labels) == [" Paris" + tokenizer.eos_token]
    joined = encode(tokenizer, Example((Message("user", "Hi"), Message("assistant", "Hello")), None, "x:2"),
                    chat_template="none")
    assert tokenizer.decode(joined.input_ids) == "Hi\nHello" + tokenizer.eos_token


def test_text_rows_train_every_token_and_end_with_eos(tokenizer):
    tok = encode(tokenizer, Example(None, "The kettle whistled.", "x:1"))
    assert tok.labels == tok.input_ids
    assert tok.input_ids[-1] == tokenizer.eos_token_id


def test_text_rows_split_at_the_answer_label_of_their_last_line(tokenizer):
    # WikiSQL-style rows: the prompt ends at "A:", the expected answer is the query - not half a sentence.
    row = "table: 1-1\ncolumns: Player, No.\nQ: Who wears number 42?\nA: SELECT Player FROM t WHERE No. = '42'"
    cut, rule = text_split(row)
    assert (row[:cut], rule) == ("table: 1-1\ncolumns: Player, No.\nQ: Who wears number 42?\nA:", "label")
    renderer = example_renderer(tokenizer, DataConfig(), [Example(None, row, "x:1")])
    ids, reference = renderer.generation_prompt(Example(None, row, "x:1"), 256)
    assert reference == "SELECT Player FROM t WHERE No. = '42'"
    assert tokenizer.decode(ids).endswith("Q: Who wears number 42?\nA:")
    # No label on the last line: the last line is the answer. One line: the middle word, said as such.
    assert text_split("Once upon a time\nthe end came.") == (len("Once upon a time\n"), "line")
    assert text_split("This is a long sentence: it has a colon")[1] == "middle"
    assert text_split("Intro\nThis is a sentence that happens to have: a colon")[1] == "line"  # five words: no label


def test_text_split_notes_say_how_rows_were_cut():
    rows = [Example(None, "Q: a?\nA: b", "x:1"), Example(None, "Q: c?\nA: d", "x:2"), Example(None, "one two", "x:3"),
            Example((Message("user", "hi"), Message("assistant", "yo")), None, "x:4")]
    assert text_split_counts(rows) == {"label": 2, "middle": 1}
    (note,) = text_split_notes(rows)
    assert note.startswith("text rows have no separate prompt and answer")
    assert "2 cut up to the answer label" in note and "1 cut at the word nearest its middle" in note
    assert text_split_notes(rows[3:]) == []  # conversations have their own answer


def test_chat_template_modes_without_a_template(tokenizer):
    bare = with_template(tokenizer, None)
    single = Example((Message("user", "Hi"), Message("assistant", "Hello")), None, "f.jsonl:1")
    multi = Example(CONVERSATION, None, "f.jsonl:7")
    with pytest.raises(DataError, match="has no chat template"):
        example_renderer(bare, DataConfig(chat_template="model"), [single])
    with pytest.raises(DataError) as info:
        example_renderer(bare, DataConfig(chat_template="auto"), [single, multi])
    assert info.value.where == "f.jsonl:7" and "several turns" in info.value.reason
    assert not example_renderer(bare, DataConfig(chat_template="auto"), [single]).use_template
    assert example_renderer(bare, DataConfig(chat_template="none"), [multi]).use_template is False
    assert example_renderer(tokenizer, DataConfig(chat_template="none"), [single]).use_template is False


def test_template_that_rejects_a_conversation_is_a_row_error(tmp_path, tokenizer):
    tok_s = with_template(tokenizer, STRICT_TEMPLATE)
    rows = [
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A2"}]},
    ] + [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
         for i in range(4)]
    path = write_rows(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        prepare_data(DataConfig(train_file=str(path), val_fraction=0.0), tok_s)
    assert info.value.where == f"{path}:2" and "roles must alternate" in info.value.reason
    data = prepare_data(DataConfig(train_file=str(path), val_fraction=0.0, skip_bad_rows=True), tok_s)
    assert data.stats["train_rows"] == 5
    assert data.stats["skipped_rows"] == 1 and data.stats["skipped_by_reason"] == {"template": 1}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(n: int, reply_words: int = 3) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"Question number {i}?"},
                      {"role": "assistant", "content": " ".join(["answer"] * reply_words) + f" {i}."}]}
        for i in range(n)
    ]


def test_prepare_data_on_the_demo_sample(tokenizer):
    data = prepare_data(DataConfig(max_length=256), tokenizer)
    s = data.stats
    assert data.format == "messages" and s["rendering"] == "chat_template"
    assert s["train_rows"] + s["val_rows"] == 350 and s["val_rows"] == 35
    assert s["truncated"] == 0 and s["duplicates_dropped"] == 0 and s["skipped_rows"] == 0
    assert s["train_tokens"] == sum(len(t.input_ids) for t in data.train)
    assert len(data.val_examples) == len(data.val)
    assert [t.where for t in data.val] == [e.where for e in data.val_examples]
    for t in data.train[:20]:
        runs = trained_runs(tokenizer, t.input_ids, t.labels)
        assert runs and all(r.endswith("<|im_end|>") and "<|im_start|>" not in r for r in runs)
        assert runs[-1].endswith("Ride easy,\nMo @ Cog & Compass<|im_end|>")


def test_truncation_and_rows_with_nothing_to_learn_are_counted(tmp_path, tokenizer):
    rows = qa_rows(6)
    rows[2]["messages"][1]["content"] = "word " * 80 + "end."  # the reply runs past max_length
    rows[4]["messages"][0]["content"] = "long question " * 60  # the reply starts past max_length
    path = write_rows(tmp_path / "d.jsonl", rows)
    data = prepare_data(DataConfig(train_file=str(path), val_fraction=0.0, max_length=48), tokenizer)
    assert data.stats["truncated"] == 2
    assert data.stats["dropped_no_target"] == 1
    assert data.stats["train_rows"] == 5
    assert all(len(t.input_ids) <= 48 and len(t.labels) == len(t.input_ids) for t in data.train)
    assert [t.truncated for t in data.train].count(True) == 1


def test_exact_duplicates_are_dropped_and_counted(tmp_path, tokenizer):
    rows = qa_rows(5) + qa_rows(2)  # the first two rows appear twice
    path = write_rows(tmp_path / "d.jsonl", rows)
    data = prepare_data(DataConfig(train_file=str(path), val_fraction=0.0), tokenizer)
    assert data.stats["duplicates_dropped"] == 2 and data.stats["train_rows"] == 5
    kept = prepare_data(DataConfig(train_file=str(path), val_fraction=0.0, dedupe=False), tokenizer)
    assert kept.stats["duplicates_dropped"] == 0 and kept.stats["train_rows"] == 7


def test_split_is_deterministic_and_sized(tmp_path, tokenizer):
    examples = [Example(None, f"row {i}", f"f:{i}") for i in range(50)]
    a = split_examples(examples, 0.2, 200, seed=1)
    assert a == split_examples(examples, 0.2, 200, seed=1)
    assert a[1] != split_examples(examples, 0.2, 200, seed=2)[1]
    assert len(a[1]) == 10 and len(a[0]) == 40 and set(a[0]).isdisjoint(a[1])
    assert len(split_examples(examples, 0.2, 3, seed=1)[1]) == 3  # max_val_rows caps it
    assert len(split_examples(examples[:2], 0.01, 200, seed=1)[1]) == 1  # at least one when asked for some
    assert len(split_examples(examples[:1], 0.5, 200, seed=1)[1]) == 0  # never every row
    assert len(split_examples(examples, 0.0, 200, seed=1)[1]) == 0

    path = write_rows(tmp_path / "d.jsonl", qa_rows(30))
    cfg = DataConfig(train_file=str(path), val_fraction=0.1, seed=7)
    first, again = prepare_data(cfg, tokenizer), prepare_data(cfg, tokenizer)
    assert [t.where for t in first.val] == [t.where for t in again.val] and len(first.val) == 3
    assert [t.input_ids for t in first.train] == [t.input_ids for t in again.train]


def test_valid_file_is_used_and_overlap_removed_from_train(tmp_path, tokenizer):
    train = write_rows(tmp_path / "train.jsonl", qa_rows(10))
    valid = write_rows(tmp_path / "valid.jsonl", qa_rows(12)[8:])  # rows 8, 9 also in train; 10, 11 new
    data = prepare_data(DataConfig(train_file=str(train), valid_file=str(valid)), tokenizer)
    assert data.stats["val_rows"] == 4 and data.stats["train_rows"] == 8
    assert data.stats["duplicates_dropped"] == 2
    assert all(e.where.startswith(str(valid)) for e in data.val_examples)


def test_generation_prompt_matches_training_render(tokenizer):
    example = Example(CONVERSATION, None, "x:1")
    cfg = DataConfig()
    ids, reference = generation_prompt(example, tokenizer, cfg)
    assert reference == CONVERSATION[3].content
    expected = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in CONVERSATION[:3]], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids) == expected
    trained = encode(tokenizer, example)
    assert trained.input_ids[: len(ids)] == ids  # the prompt is exactly the head of the training row
    assert trained.labels[len(ids)] != IGNORE and trained.labels[len(ids) - 1] == IGNORE

    tok_q = with_template(tokenizer, DEFAULT_SYSTEM_TEMPLATE)
    ids, _ = generation_prompt(example, tok_q, cfg)
    assert tok_q.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert tok_q.decode(ids).endswith("<|im_start|>assistant\n")

    text = "The morning fog rolled in from the harbour and settled over the town."
    ids, reference = generation_prompt(Example(None, text, "x:2"), tokenizer, cfg)
    prompt = tokenizer.decode(ids)
    assert f"{prompt} {reference}" == text and 0.3 < len(prompt) / len(text) < 0.7  # cut at a space


def test_write_examples_jsonl_round_trips(tmp_path):
    examples = [Example(CONVERSATION, None, "a:1"), Example(None, "plain text", "a:2")]
    path = write_examples_jsonl(examples, tmp_path / "run" / "data" / "val.jsonl")
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[1]) == {"text": "plain text"}
    back, _, _ = load_examples(path, fmt="messages", skip_bad_rows=True)
    assert back[0].messages == CONVERSATION
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()][0]["messages"][0] == {
        "role": "user", "content": CONVERSATION[0].content}
