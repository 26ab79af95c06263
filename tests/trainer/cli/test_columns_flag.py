"""`--columns` on `data check`, `train` and `eval`: the same mapping as data.columns, passed through as given."""

from __future__ import annotations

import json

from ft_desk.trainer.cli import eval as eval_cli
from ft_desk.trainer.cli.main import main


def qa_csv(folder):
    path = folder / "qa.csv"
    path.write_text("q,a\nHow do I reset it?,Hold the button.\nIs it waterproof?,Only splash-proof.\n",
                    encoding="utf-8")
    return path


def test_data_check_lists_the_columns_and_the_line_then_reads_the_file_with_it(tmp_path, tiny_model_dir, capsys):
    path = qa_csv(tmp_path)
    code = main(["data", "check", str(path), "--model", str(tiny_model_dir), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and not out["ok"]
    assert "fill no format's roles" in out["error"] and out["suggested_columns"] == "prompt=q,completion=a"
    assert [c["name"] for c in out["columns"]] == ["q", "a"] and out["columns"][0]["sample"] == "How do I reset it?"
    code = main(["data", "check", str(path), "--model", str(tiny_model_dir), "--columns", out["suggested_columns"]])
    text = capsys.readouterr().out
    assert code == 0 and "prompt_completion format, 2 rows, 2 usable" in text


def test_data_check_says_what_it_assumed(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "export.csv"
    path.write_text("instruction,response\nSay hi.,Hi!\n", encoding="utf-8")
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir)]) == 0
    text = capsys.readouterr().out
    assert "columns: assumed --columns instruction=instruction,output=response from the column names" in text


def test_a_conflicting_columns_flag_is_one_sentence_and_exit_2(tmp_path, tiny_model_dir, capsys):
    code = main(["data", "check", str(qa_csv(tmp_path)), "--model", str(tiny_model_dir),
                 "--columns", "prompt=q,completion=q"])
    err = capsys.readouterr().err
    assert code == 2 and "data.columns maps the column 'q' to both prompt and completion" in err
    assert "Traceback" not in err


def test_train_passes_columns_into_the_config(tmp_path, capsys):
    code = main(["train", "--data", str(qa_csv(tmp_path)), "--columns", "prompt=q,completion=a", "--print-config"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["data"]["columns"] == ["prompt=q", "completion=a"]


def test_eval_passes_columns_to_its_options():
    import argparse

    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    args = parser.parse_args(["RUN", "--data", "qa.csv", "--columns", "prompt=q,completion=a"])
    assert eval_cli.options_from(args).columns == ("prompt=q", "completion=a")
    assert eval_cli.options_from(parser.parse_args(["RUN"])).columns == ()
