"""Reading data files: every file type, format detection, and one readable error (file:line, reason) per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ft_desk.trainer.data.prepare import Example, Message, load_examples, resolve_data_path
from ft_desk.trainer.errors import DataError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(*pairs: tuple[str, str]) -> tuple[Message, ...]:
    return tuple(Message(role, content) for role, content in pairs)


ROWS = {
    "text": ({"text": "The tide came in."}, None),
    "prompt_completion": (
        {"prompt": "Capital of France?", "completion": " Paris."},
        chat(("user", "Capital of France?"), ("assistant", " Paris.")),
    ),
    "alpaca": (
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        chat(("user", "Translate to French.\n\nGood morning"), ("assistant", "Bonjour")),
    ),
    "sharegpt": (
        {"system": "Be brief.",
         "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")),
    ),
    "messages": (
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                      {"role": "assistant", "content": [{"type": "text", "text": "A2"}]}]},
        chat(("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"), ("assistant", "A2")),
    ),
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_is_detected_and_converted(tmp_path, fmt):
    row, expected = ROWS[fmt]
    path = write_jsonl(tmp_path / "d.jsonl", [row, row])
    examples, detected, counts = load_examples(path)
    assert detected == fmt
    assert counts["rows"] == 2 and counts["skipped_rows"] == 0
    first = examples[0]
    assert first.where == f"{path}:1"
    if fmt == "text":
        assert first.text == "The tide came in." and first.messages is None
    else:
        assert first.messages == expected and first.text is None


def test_alpaca_without_input_and_sharegpt_user_assistant_names(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "Hi!"}])
    (example,), _, _ = load_examples(path)
    assert example.messages == chat(("user", "Say hi."), ("assistant", "Hi!"))
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]}])
    (example,), fmt, _ = load_examples(path)
    assert fmt == "sharegpt" and example.messages == chat(("user", "Q"), ("assistant", "A"))


def test_json_list_and_single_key_object(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    plain = tmp_path / "list.json"
    plain.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 3, "data": rows}), encoding="utf-8")
    for path in (plain, wrapped):
        examples, fmt, _ = load_examples(path)
        assert fmt == "prompt_completion"
        assert [e.where for e in examples] == [f"{path}:#0", f"{path}:#1"]
        assert examples[1].messages == chat(("user", "c"), ("assistant", "d"))


def test_json_extension_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", [{"text": "one"}, {"text": "two"}])
    examples, fmt, _ = load_examples(path)
    assert fmt == "text" and [e.where for e in examples] == [f"{path}:1", f"{path}:2"]


def test_csv_columns_multiline_cells_and_physical_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        'instruction,input,output\n'
        '"Write two lines.",,"first\nsecond"\n'
        'Name a colour.,,Blue\n'
        'Broken row,,x,extra\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as info:
        load_examples(path)
    # Header is line 1, the two-line quoted cell is lines 2-3, so the bad row starts on physical line 5.
    assert info.value.where == f"{path}:5"
    assert "4 fields but the header has 3" in info.value.reason
    examples, fmt, counts = load_examples(path, skip_bad_rows=True)
    assert fmt == "alpaca" and counts["skipped_rows"] == 1
    assert [e.where for e in examples] == [f"{path}:2", f"{path}:4"]
    assert examples[0].messages[1].content == "first\nsecond"


def test_csv_chat_column_holding_json(tmp_path):
    path = tmp_path / "chat.csv"
    cell = json.dumps([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]).replace('"', '""')
    path.write_text(f'messages\n"{cell}"\n', encoding="utf-8")
    (example,), fmt, _ = load_examples(path)
    assert fmt == "messages" and example.messages == chat(("user", "Q"), ("assistant", "A"))


def test_parquet_with_nested_messages_and_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    messages = [[{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}] for i in range(3)]
    pq.write_table(pa.table({"messages": messages, "id": [1, 2, 3]}), path)
    examples, fmt, _ = load_examples(path)
    assert fmt == "messages" and len(examples) == 3
    assert examples[2].where == f"{path}:#2" and examples[2].messages[1] == Message("assistant", "A2")

    text_path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["alpha beta", "gamma delta"]}), text_path)
    examples, fmt, _ = load_examples(text_path)
    assert fmt == "text" and examples[1].text == "gamma delta"


def test_explicit_format_and_demo_path():
    examples, fmt, counts = load_examples(resolve_data_path("demo"), fmt="messages")
    assert fmt == "messages" and counts["rows"] == len(examples) >= 300
    assert all(isinstance(e, Example) and e.assistant_turns >= 1 for e in examples)
    assert any(e.is_multi_turn for e in examples)


# ------------------------------------------------------------------------------------------------ bad input

GOOD = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
BAD_ROWS = [
    ("broken_json", '{"messages": [{"role": "user"', "broken JSON"),
    ("wrong_type", {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "A"}]},
     "message 1 is a number, expected text"),
    ("wrong_type", {"messages": "hello"}, "'messages' is text, expected a list"),
    ("wrong_type", [1, 2], "the row is a list, expected a JSON object"),
    ("missing_field", {"messages": [{"role": "user"}, {"role": "assistant", "content": "A"}]},
     "message 1 has no content"),
    ("missing_field", {"id": 7}, "missing field 'messages'"),
    ("empty_assistant", {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]},
     "message 2 is an empty assistant turn"),
    ("unknown_role", {"messages": [{"role": "bot", "content": "Q"}, {"role": "assistant", "content": "A"}]},
     "unknown role 'bot'"),
    ("tool_role", {"messages": [{"role": "user", "content": "Q"}, {"role": "tool", "content": "{}"},
                                {"role": "assistant", "content": "A"}]}, "tool calls and results"),
    ("no_assistant", {"messages": [{"role": "user", "content": "Q"}]}, "no assistant turn"),
    ("bad_order", {"messages": [{"role": "user", "content": "Q"}, {"role": "system", "content": "S"},
                                {"role": "assistant", "content": "A"}]}, "not the first"),
    ("format_mismatch", {"prompt": "p", "completion": "c"}, "prompt_completion format but the file is in messages"),
]


@pytest.mark.parametrize("kind,row,reason", BAD_ROWS, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD_ROWS)])
def test_bad_row_names_file_line_and_reason(tmp_path, kind, row, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, row, GOOD])
    with pytest.raises(DataError) as info:
        load_examples(path)
    err = info.value
    assert err.where == f"{path}:3"
    assert reason in err.reason
    assert err.kind == kind
    assert str(err).startswith(f"{path}:3: ")
    assert err.hint  # every row problem says what to do


def test_sharegpt_unknown_speaker_and_alpaca_empty_output(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "narrator", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    ])
    with pytest.raises(DataError, match=r"s\.jsonl:2: turn 1 has unknown role 'narrator'"):
        load_examples(path)
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Do it", "input": "", "output": ""}])
    with pytest.raises(DataError, match=r"a\.jsonl:1: 'output' is empty"):
        load_examples(path)


def test_skip_bad_rows_counts_by_reason(tmp_path):
    rows = [GOOD] + [row for _, row, _ in BAD_ROWS] + [GOOD]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, fmt, counts = load_examples(path, skip_bad_rows=True)
    assert fmt == "messages" and len(examples) == 2
    assert counts["skipped_rows"] == len(BAD_ROWS)
    expected: dict[str, int] = {}
    for kind, _, _ in BAD_ROWS:
        expected[kind] = expected.get(kind, 0) + 1
    assert counts["skipped_by_reason"] == expected


@pytest.mark.parametrize(
    "name,content,where_suffix,reason",
    [
        ("empty.jsonl", b"", "", "the file is empty"),
        ("blank.jsonl", b"\n  \n", "", "the file is empty"),
        ("empty.json", b"[]", "", "holds no rows"),
        ("latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2", "not UTF-8"),
        ("broken.json", b'[\n {"text": "a"},\n {"text": }\n]', ":3", "broken JSON"),
        ("rows.txt", b"hello\n", "", "unsupported file type '.txt'"),
        ("many.json", b'{"a": [], "b": []}', "", "one key holding that list"),
        ("header.csv", b"prompt,completion\n", "", "the file is empty"),
        ("junk.parquet", b"not parquet at all", "", "not a readable Parquet file"),
    ],
)
def test_file_level_problems(tmp_path, name, content, where_suffix, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_examples(path, skip_bad_rows=True)  # no row of such a file can be read: skipping does not help
    assert info.value.where == f"{path}{where_suffix}"
    assert reason in info.value.reason


def test_wrong_encoding_says_how_to_convert(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert "iconv" in info.value.hint and "UTF-8" in info.value.hint


def test_windows_line_endings(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"text": "one"}\r\n{"text": "two"}\r\n')
    examples, _, _ = load_examples(path)
    assert [e.text for e in examples] == ["one", "two"]
    csv_path = tmp_path / "crlf.csv"
    csv_path.write_bytes(b"prompt,completion\r\nQ1,A1\r\nQ2,\r\n")
    with pytest.raises(DataError, match=r"crlf\.csv:3: 'completion' is empty"):
        load_examples(csv_path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "hello"}).encode() + b"\n")
    (example,), _, _ = load_examples(path)
    assert example.text == "hello"


def test_missing_file_and_no_usable_rows(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        resolve_data_path(str(tmp_path / "nope.jsonl"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": " "}])
    with pytest.raises(DataError, match="'text' is empty"):
        load_examples(path)
    with pytest.raises(DataError, match="no usable rows"):
        load_examples(path, skip_bad_rows=True)
