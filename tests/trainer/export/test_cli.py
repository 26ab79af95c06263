"""`ft-desk export` as the TUI and a person use it: JSON-lines events, readable report, readable errors."""

from __future__ import annotations

import json

from ft_desk.trainer.cli.main import main


def test_json_mode_streams_events_ending_with_the_result(qlora_run, out_dir, capsys):
    code = main(["export", str(qlora_run.run_dir), "--format", "merged", "--out", str(out_dir), "--no-verify",
                 "--json"])
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert events[0]["type"] == "export_started" and events[-1]["type"] == "export_finished"
    assert any(e["type"] == "export_progress" and e["phase"] == "merge" for e in events)
    result = events[-1]
    assert result["status"] == "unverified" and result["out_dir"] == str(out_dir)
    assert "model.safetensors" in result["files"] and result["bytes"] > 0


def test_human_report_and_exit_code(qlora_run, out_dir, capsys):
    code = main(["export", str(qlora_run.run_dir), "--format", "adapter", "--out", str(out_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert "fidelity: PASS" in out and "adapter reloaded with peft vs trained: PASS" in out
    assert "greedy replies stop at the turn end on" in out
    fidelity = json.loads((out_dir / "fidelity.json").read_text())
    comparison = fidelity["comparisons"]["adapter_vs_trained"]
    # The adapter holds the exact trained weights: only float summation order differs (see verify.THRESHOLDS).
    assert fidelity["passed"] and comparison["mean_kl"] < 1e-5 and comparison["top1_agreement"] == 1.0


def test_bad_checkpoint_is_one_readable_line(qlora_run, out_dir, capsys):
    code = main(["export", str(qlora_run.run_dir), "--format", "adapter", "--checkpoint", "7", "--out",
                 str(out_dir), "--json"])
    captured = capsys.readouterr()
    assert code == 2
    assert "no checkpoint at step 7" in captured.err and "Traceback" not in captured.err
    assert json.loads(captured.out.splitlines()[-1])["status"] == "failed"
    assert not out_dir.exists()


def test_a_failed_check_does_not_suggest_ollama_create():
    from ft_desk.trainer.cli.export import report_lines

    event = {"format": "ollama", "out_dir": "/x", "bytes": 10, "files": ["a"], "elapsed_s": 1.0, "fidelity": None,
             "notes": [], "command": "ollama create run -f /x/Modelfile", "passed": False}
    lines = report_lines(event)
    assert not any("ollama create" in line for line in lines)
    assert any(line.startswith("next: the export failed its own check") for line in lines)
    assert report_lines({**event, "passed": True})[-1] == "next: ollama create run -f /x/Modelfile"


def test_export_takes_a_run_by_its_name(qlora_run, out_dir, capsys, monkeypatch):
    from ft_desk.trainer import run_folder

    monkeypatch.setattr(run_folder, "runs_home", lambda: qlora_run.run_dir.parent)
    code = main(["export", qlora_run.run_dir.name, "--format", "adapter", "--out", str(out_dir), "--no-verify"])
    assert code == 0
    assert (out_dir / "adapter_model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file()
    assert main(["export", "no-such-run", "--format", "adapter", "--out", str(out_dir / "b"), "--no-verify"]) == 2
    assert "no run folder or run named 'no-such-run'" in capsys.readouterr().err
