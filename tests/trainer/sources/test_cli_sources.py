"""The commands a user types for GGUF and Ollama models: `ft-desk models ollama`, `models info`, `models import`
(human and --json, a failure as data), and `ft-desk plan` of a GGUF that is not imported yet."""

from __future__ import annotations

import json

from ft_desk.trainer.cli.main import main
from ft_desk.trainer.hub.gguf_import import imports_dir
from tests.trainer.sources.conftest import add_ollama_model


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_models_ollama_lists_the_store_with_quant_type_and_fit(ollama_store, tiny_gguf_q8, fresh_home, capsys):
    add_ollama_model(ollama_store, tiny_gguf_q8, "tiny", "q8")
    assert main(["models", "ollama", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["models"]
    assert (row["name"], row["file_type"], row["imported"]) == ("tiny:q8", "Q8_0", False)
    assert row["fit"]["verdict"] in ("fits", "tight")
    assert main(["models", "ollama", "--no-fit"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["MODEL", "PARAMS", "SIZE", "QUANT", "ARCH", "FIT"]
    assert out.splitlines()[1].split()[0] == "tiny:q8" and "Q8_0" in out.splitlines()[1]


def test_an_empty_store_says_where_it_looked(ollama_store, capsys):
    assert main(["models", "ollama", "--no-fit"]) == 0
    assert capsys.readouterr().out.strip() == f"no Ollama models in {ollama_store}"


def test_models_info_and_import_of_a_gguf(tiny_gguf_q8, fresh_home, capsys):
    assert main(["models", "info", str(tiny_gguf_q8), "--no-fit"]) == 0
    info = capsys.readouterr().out
    assert "quant type" in info and "Q8_0" in info and "not yet" in info
    assert main(["models", "import", str(tiny_gguf_q8), "--json"]) == 0
    events = _json_lines(capsys.readouterr().out)
    assert {e["type"] for e in events} == {"model_import"} and events[-1]["phase"] == "done"
    assert main(["models", "import", str(tiny_gguf_q8)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == events[-1]["folder"] and "imported before" in captured.err
    assert main(["models", "info", str(tiny_gguf_q8), "--no-fit"]) == 0
    assert events[-1]["folder"] in capsys.readouterr().out


def test_a_failed_import_is_one_sentence_on_screen_and_data_in_json(tmp_path, fresh_home, capsys):
    bad = tmp_path / "notes.gguf"
    bad.write_text("not weights")
    assert main(["models", "import", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"ft-desk: {bad} is not a GGUF file (it does not start with the GGUF signature)"
    assert main(["models", "import", str(bad), "--json"]) == 2
    (failed,) = _json_lines(capsys.readouterr().out)
    assert failed["type"] == "command_failed" and "is not a GGUF file" in failed["error"]
    assert not imports_dir().exists() or not any(p.is_dir() for p in imports_dir().iterdir())


def test_plan_of_a_gguf_says_it_will_be_dequantized(tiny_gguf_q8, fresh_home, capsys):
    assert main(["plan", str(tiny_gguf_q8), "--preset", "qlora", "--device", "cpu", "--memory", "16GB"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "a Q8_0 GGUF: imported once on first use" in out
    assert "dequantized from the GGUF's Q8_0 to bfloat16" in out
    assert not imports_dir().exists()  # planning converts nothing


def test_data_check_of_a_gguf_base_reads_its_tokenizer_without_importing(tiny_gguf_q8, tiny_model_dir, fresh_home,
                                                                         tmp_path, capsys):
    from transformers import AutoTokenizer

    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"Question {i}: what is {i} + {i}?", "completion": f"It is {2 * i}."} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["data", "check", str(data), "--model", str(tiny_gguf_q8), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["model"] == str(tiny_gguf_q8)
    assert not imports_dir().exists()  # nothing converted for a data check
    # The tokens counted are the ones the original tokenizer makes.
    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    from ft_desk.trainer.hub.gguf_import import load_gguf_tokenizer

    text = rows[3]["prompt"] + " " + rows[3]["completion"]
    assert load_gguf_tokenizer(tiny_gguf_q8)(text)["input_ids"] == original(text)["input_ids"]
