"""The lint report and `ft-desk data check`: what a user sees before training on a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ft_desk.trainer.cli.main import main
from ft_desk.trainer.config import DataConfig
from ft_desk.trainer.data.lint import lint_file


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def turn(user: str, reply: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system is not None else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def messy_file(folder: Path) -> Path:
    rows = [
        json.dumps(turn("Where is my order?", "On its way!")),
        json.dumps(turn("How long is the return window?", "45 days from delivery.")),
        json.dumps(turn("Where is my order?", "On its way!")),  # duplicate of line 1
        json.dumps(turn("", "You sent an empty message.", system="")),  # empty user and system turns
        json.dumps(turn("Tell me everything. " * 40, "Sure.")),  # far past max_length
        '{"messages": [}',  # broken JSON
        json.dumps({"messages": [{"role": "user", "content": "Q"}]}),  # no assistant turn
    ]
    path = folder / "messy.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def good_file(folder: Path) -> Path:
    path = folder / "good.jsonl"
    rows = [turn(f"Question {i}?", f"Answer {i}.") for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_lint_report_finds_what_is_wrong(tmp_path, tokenizer):
    path = messy_file(tmp_path)
    report = lint_file(path, tokenizer, DataConfig(max_length=64))
    assert report.format == "messages" and report.rows == 7 and report.usable_rows == 5
    assert report.broken_count == 2
    assert report.broken_by_reason == {"broken_json": 1, "no_assistant": 1}
    assert [r["where"] for r in report.broken_rows] == [f"{path}:6", f"{path}:7"]
    assert "no assistant turn" in report.broken_rows[1]["reason"]
    assert report.duplicates == 1 and report.duplicates_where == [{"where": f"{path}:3", "same_as": f"{path}:1"}]
    assert report.empty_turns == 1 and report.empty_turns_where == [f"{path}:4"]
    assert report.truncated == 1 and report.truncated_where == [f"{path}:5"]
    assert report.no_target == 1  # its reply starts beyond 64 tokens
    assert report.rendering == "chat_template"
    assert sum(b["count"] for b in report.histogram) == 5
    assert report.histogram[-1] == {"lo": 65, "hi": None, "count": 1}
    assert report.token_stats["max"] > 64 >= report.token_stats["min"]
    assert report.usable and not report.ok(skip_bad_rows=False) and report.ok(skip_bad_rows=True)
    # Samples to browse: the first row, then the extremes; the long row is longest, truncated and has no target,
    # and is shown once under its first label.
    samples = {s["label"]: s for s in report.samples}
    assert list(samples) == ["first row", "longest"]  # the first row is also the shortest
    assert samples["first row"]["where"] == f"{path}:1"
    assert samples["first row"]["tokens"] == report.token_stats["min"]
    assert samples["longest"]["where"] == f"{path}:5" and samples["longest"]["truncated"]
    assert samples["longest"]["tokens"] == 64 and samples["longest"]["trained_tokens"] == 0


def test_lint_samples_show_the_extremes_of_the_file(tmp_path, tokenizer):
    path = tmp_path / "varied.jsonl"
    replies = ["A medium length reply here.", "Ok.", "A much longer reply that goes on and on for a while."]
    path.write_text("".join(json.dumps(turn("Hi?", r)) + "\n" for r in replies), encoding="utf-8")
    report = lint_file(path, tokenizer, DataConfig(max_length=512))
    assert [(s["label"], s["where"]) for s in report.samples] == [
        ("first row", f"{path}:1"), ("longest", f"{path}:3"), ("shortest", f"{path}:2")]
    assert [s["tokens"] for s in report.samples][1:] == [report.token_stats["max"], report.token_stats["min"]]
    assert not any(s["truncated"] for s in report.samples)


def test_lint_sample_marks_exactly_the_trained_text(tmp_path, tokenizer):
    report = lint_file(good_file(tmp_path), tokenizer, DataConfig())
    segments = report.samples[0]["segments"]
    assert "".join(text for text, _ in segments) == tokenizer.apply_chat_template(
        turn("Question 0?", "Answer 0.")["messages"], tokenize=False)
    assert [text for text, trained in segments if trained] == ["Answer 0.<|im_end|>"]
    assert report.ok(skip_bad_rows=False)
    assert json.loads(json.dumps(report.to_dict()))["usable"] is True


def test_lint_without_tokenizer_and_with_multi_turn_but_no_template(tmp_path, tokenizer):
    import copy

    path = tmp_path / "multi.jsonl"
    row = {"messages": turn("A?", "a.")["messages"] + turn("B?", "b.")["messages"]}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    report = lint_file(path, bare, DataConfig())
    assert not report.usable and "several turns" in report.error and "chat_template=none" in report.error_hint
    report = lint_file(path, None, DataConfig())
    assert report.usable and report.token_stats == {} and report.samples == []


def test_cli_check_json_on_good_and_messy_files(tmp_path, tiny_model_dir, capsys):
    code = main(["data", "check", str(good_file(tmp_path)), "--model", str(tiny_model_dir), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["ok"] and out["format"] == "messages" and out["usable_rows"] == 6

    messy = str(messy_file(tmp_path))
    code = main(["data", "check", messy, "--model", str(tiny_model_dir), "--max-length", "64", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and not out["ok"] and out["broken_count"] == 2 and out["truncated"] == 1
    code = main(["data", "check", messy, "--model", str(tiny_model_dir), "--json", "--skip-bad-rows"])
    assert code == 0 and json.loads(capsys.readouterr().out)["ok"]

    code = main(["data", "check", str(tmp_path / "missing.jsonl"), "--model", str(tiny_model_dir), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and out == {"ok": False, "error": f"{tmp_path / 'missing.jsonl'}: no such file",
                                 "where": str(tmp_path / "missing.jsonl"), "hint": out["hint"], "exit_code": 2}


def test_cli_check_human_report_as_a_subprocess(tmp_path, tiny_model_dir):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    good = subprocess.run(
        [sys.executable, "-m", "ft_desk.trainer.cli.main", "data", "check", str(good_file(tmp_path)),
         "--model", str(tiny_model_dir)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert good.returncode == 0, good.stderr
    assert "messages format, 6 rows, 6 usable" in good.stdout
    assert "[[Answer 0.<|im_end|>]]" in good.stdout and "usable: ready to train" in good.stdout

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    bad = subprocess.run(
        [sys.executable, "-m", "ft_desk.trainer.cli.main", "data", "check", str(latin), "--model", str(tiny_model_dir)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert bad.returncode == 2
    assert f"{latin}:2: the file is not UTF-8 text" in bad.stderr and "iconv" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cli_human_report_lists_broken_rows(tmp_path, tiny_model_dir, capsys):
    messy = messy_file(tmp_path)
    code = main(["data", "check", str(messy), "--model", str(tiny_model_dir), "--max-length", "64"])
    out = capsys.readouterr().out
    assert code == 2
    assert f"{messy}:6: broken JSON" in out and f"{messy}:7: the conversation has no assistant turn" in out
    assert "duplicates: 1 (dropped in training; at 3 (= 1))" in out and "empty turns: 1 (at 4)" in out
    assert ">64 |" in out and "truncated rows: 1" in out
    assert "not usable as is" in out
    assert f"sample: first row, {messy}:1" in out and f"other samples: longest ({messy}:5)" in out
    main(["data", "check", str(messy), "--model", str(tiny_model_dir), "--max-length", "64", "--samples"])
    out = capsys.readouterr().out
    assert f"sample: longest, {messy}:5 (64 tokens, 0 trained, shown inside [[ ]], cut at max length)" in out
    assert "other samples" not in out
