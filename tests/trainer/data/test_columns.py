"""Column names: common aliases assumed with a note, explicit mappings, conflicts, preference pairs, rows missing
a mapped column (file:line), and the message that lists the columns and the --columns line that maps them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ft_desk.trainer.columns import ColumnsError, parse_columns
from ft_desk.trainer.config import ConfigError
from ft_desk.trainer.data.formats import ColumnsMismatch, load_examples
from ft_desk.trainer.data.prepare import Message
from ft_desk.trainer.presets import load_config


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def user_assistant(example) -> tuple[str, str]:
    turns = {m.role: m.content for m in example.messages}
    return turns["user"], turns["assistant"]


ALIASES = [
    ({"instruction": "Greet.", "response": "Hello!"}, "alpaca", "instruction=instruction,output=response",
     ("Greet.", "Hello!")),
    ({"question": "2+2?", "answer": "4"}, "prompt_completion", "prompt=question,completion=answer", ("2+2?", "4")),
    ({"input": "ping", "output": "pong"}, "prompt_completion", "prompt=input,completion=output", ("ping", "pong")),
    ({"query": "Capital?", "response": "Paris"}, "prompt_completion", "prompt=query,completion=response",
     ("Capital?", "Paris")),
    ({"prompt": "Say hi", "response": "hi"}, "prompt_completion", "prompt=prompt,completion=response",
     ("Say hi", "hi")),
    ({"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"},
     "alpaca", "instruction=instruction,input=context,output=response", ("Summarise.\n\nA long text.", "Short.")),
    ({"Human": "Hi there", "Assistant": "Hello"}, "prompt_completion", "prompt=Human,completion=Assistant",
     ("Hi there", "Hello")),
]


@pytest.mark.parametrize("row,fmt,assumed,pair", ALIASES, ids=[a[2] for a in ALIASES])
def test_each_alias_shape_is_read_and_says_what_it_assumed(tmp_path, row, fmt, assumed, pair):
    path = write_jsonl(tmp_path / "d.jsonl", [row, row])
    examples, detected, counts = load_examples(path)
    assert detected == fmt and len(examples) == 2
    assert user_assistant(examples[0]) == pair
    assert counts["columns"] == assumed
    assert f"assumed --columns {assumed}" in counts["columns_note"]


def test_an_instruction_response_csv_export_trains_without_any_setting(tmp_path):
    path = tmp_path / "export.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "response"])
        writer.writerows([[f"Question {i}?", f"Answer {i}."] for i in range(30)])
    examples, fmt, counts = load_examples(path)
    assert (fmt, len(examples), counts["skipped_rows"]) == ("alpaca", 30, 0)


def test_a_system_prompt_column_is_picked_up_with_the_alias(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"system_prompt": "Be brief.", "question": "Hi?", "answer": "Hi."}])
    examples, _, counts = load_examples(path)
    assert examples[0].messages[0] == Message("system", "Be brief.")
    assert "system=system_prompt" in counts["columns"]


def test_an_explicit_mapping_reads_any_names_including_system_and_turn_lists(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "Where?", "a": "Here.", "persona": "You are terse."}])
    examples, fmt, counts = load_examples(path, columns="prompt=q,completion=a,system=persona")
    assert fmt == "prompt_completion" and counts["columns_note"] == ""
    assert examples[0].messages == (Message("system", "You are terse."), Message("user", "Where?"),
                                    Message("assistant", "Here."))
    turns = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"dialog": turns, "sys": "S"}])
    examples, fmt, _ = load_examples(path, columns={"messages": "dialog", "system": "sys"})
    assert fmt == "messages" and [m.role for m in examples[0].messages] == ["system", "user", "assistant"]


def test_a_mapping_can_swap_columns_that_carry_role_names(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the reply", "completion": "the question"}])
    examples, _, _ = load_examples(path, columns="prompt=completion,completion=prompt")
    assert user_assistant(examples[0]) == ("the question", "the reply")


@pytest.mark.parametrize("value,says", [
    ("prompt=q,prompt=question", "maps prompt twice, to 'q' and to 'question'"),
    ("prompt=text,completion=text", "maps the column 'text' to both prompt and completion"),
    ("prompt=q,output=a", "mixes the roles of two formats"),
    ("question=prompt", "names the role first: prompt=question"),
    ("answer=a", "'answer' in 'answer=a' is not a role"),
    ("q", "takes role=column pairs"),
])
def test_conflicting_or_malformed_mappings_are_one_readable_config_error(value, says):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.columns={value}"])
    assert says in str(err.value) and str(err.value).startswith("data.columns")
    with pytest.raises(ColumnsError):
        parse_columns(value)


def test_the_config_keeps_a_mapping_and_accepts_one_from_yaml(tmp_path):
    cfg = load_config(None, ["data.columns=prompt=question, completion=answer"])
    assert cfg.data.columns == ("prompt=question", "completion=answer")
    preset = tmp_path / "mine.yaml"
    preset.write_text("data:\n  columns: {prompt: question, completion: answer}\n", encoding="utf-8")
    assert load_config([str(preset)]).data.columns == ("prompt=question", "completion=answer")


def test_a_mapping_that_disagrees_with_data_format_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(Exception, match="data.format is alpaca but data.columns maps roles of the "
                                         "prompt_completion format"):
        load_examples(path, "alpaca", columns="prompt=q,completion=a")


def test_rows_missing_a_mapped_column_are_named_by_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "1", "a": "one"}, {"q": "2"}, {"q": "3", "a": None}])
    with pytest.raises(Exception) as err:
        load_examples(path, columns="prompt=q,completion=a")
    assert str(err.value) == f"{path}:2: the row has no 'a' column, which fills the completion role"
    examples, _, counts = load_examples(path, skip_bad_rows=True, columns="prompt=q,completion=a")
    assert len(examples) == 1 and counts["skipped_by_reason"] == {"missing_column": 2}


def test_a_mapped_column_no_row_has_is_said_once_with_the_columns_found(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "1", "a": "one"}] * 3)
    with pytest.raises(ColumnsMismatch) as err:
        load_examples(path, columns="prompt=q,completion=answer")
    assert "no row has the column 'answer' that fills the completion role (the rows' keys: 'q', 'a')" in str(err.value)
    assert "--columns prompt=q,completion=a" in err.value.hint


def test_unknown_columns_list_the_keys_and_the_exact_columns_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "ask": "Why?", "reply": "Because."}] * 3)
    with pytest.raises(ColumnsMismatch) as err:
        load_examples(path)
    assert str(err.value).startswith(f"{path}:1: the rows' columns ('id', 'ask', 'reply') fill no format's roles")
    assert err.value.hint.startswith("map them with --columns prompt=ask,completion=reply ")
    assert [c["name"] for c in err.value.columns] == ["id", "ask", "reply"]
    assert err.value.columns[1]["sample"] == "Why?"
    examples, _, _ = load_examples(path, columns="prompt=ask,completion=reply")  # the suggested line works
    assert len(examples) == 3


def test_preference_pairs_are_refused_for_sft_unless_the_chosen_side_is_mapped(tmp_path):
    rows = [{"prompt": "Tell a joke.", "chosen": "A good one.", "rejected": "A bad one."}] * 2
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(ColumnsMismatch) as err:
        load_examples(path)
    assert "preference pairs (chosen and rejected replies)" in str(err.value) and "not supervised" in str(err.value)
    assert "--columns prompt=prompt,completion=chosen" in err.value.hint
    examples, fmt, counts = load_examples(path, columns="prompt=prompt,completion=chosen")
    assert user_assistant(examples[0]) == ("Tell a joke.", "A good one.")
    assert "rejected replies are left out" in counts["columns_note"]
    turns = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "good"}]
    path = write_jsonl(tmp_path / "chat_prefs.jsonl", [{"chosen": turns, "rejected": turns[:1]}])
    with pytest.raises(ColumnsMismatch) as err:
        load_examples(path)
    assert "--columns messages=chosen" in err.value.hint
    assert load_examples(path, columns="messages=chosen")[0][0].messages[-1].content == "good"


def test_a_given_format_uses_its_own_aliases_and_says_which_columns_it_lacks(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Greet.", "response": "Hello!"}])
    examples, fmt, _ = load_examples(path, "alpaca")
    assert fmt == "alpaca" and user_assistant(examples[0]) == ("Greet.", "Hello!")
    with pytest.raises(ColumnsMismatch) as err:
        load_examples(path, "prompt_completion")
    assert "read as prompt_completion (data.format), but its rows have no 'prompt' or 'completion' column" in str(
        err.value)
    assert "--columns prompt=instruction,completion=response" in err.value.hint
    assert len(load_examples(path, "prompt_completion", columns="prompt=instruction,completion=response")[0]) == 1


def test_a_run_reads_the_mapped_file_and_its_validation_file_and_says_what_it_assumed(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from ft_desk.trainer.config import DataConfig
    from ft_desk.trainer.data.prepare import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(6)])
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"question": "V?", "answer": "W."}])
    data = prepare_data(DataConfig(train_file=str(train), valid_file=str(valid)), tokenizer)
    assert (data.format, len(data.train), len(data.val)) == ("prompt_completion", 6, 1)
    assert data.stats["columns"] == "prompt=question,completion=answer"
    assert data.stats["columns_note"].startswith("assumed --columns prompt=question,completion=answer")
    mapped = write_jsonl(tmp_path / "mapped.jsonl", [{"ask": f"Q{i}?", "say": f"A{i}."} for i in range(6)])
    data = prepare_data(DataConfig(train_file=str(mapped), columns=("prompt=ask", "completion=say")), tokenizer)
    assert data.format == "prompt_completion" and data.stats["columns_note"] == ""
