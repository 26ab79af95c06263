"""The headless CLI as the TUI uses it: real child processes, JSON-lines events, run folders, and a run
killed with SIGKILL that resumes to exactly the result of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ft_desk.trainer.events import parse_line, read_events

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "ft_desk.trainer.cli.main"]


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, FT_DESK_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _run(args, home, **kw):
    return subprocess.run(CLI + args, env=_env(home), capture_output=True, text=True, timeout=600, **kw)


def test_demo_runs_end_to_end_offline_and_val_loss_falls(tmp_path):
    proc = _run(["demo", "--events", "jsonl"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout holds events and nothing else
    assert all(e["v"] == 1 for e in events)
    types = [e["type"] for e in events]
    assert types[0] == "run_started" and types[-1] == "run_finished"
    for needed in ("data_ready", "model_loaded", "step", "eval", "sample", "checkpoint"):
        assert needed in types
    evals = [e for e in events if e["type"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] * 0.85
    finished = events[-1]
    assert finished["status"] == "completed" and finished["exit_code"] == 0
    run_dir = Path(finished["run_dir"])
    on_disk = list(read_events(run_dir / "events.jsonl"))
    assert [e["type"] for e in on_disk] == types
    assert json.loads((run_dir / "config.json").read_text())["model"]["name"] == "demo"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    samples = [e for e in events if e["type"] == "sample"]
    assert {e["phase"] for e in samples} == {"before", "after"}
    # The work before step 1 is said before it is done, not minutes of silence.
    first_step = types.index("step")
    said = [e["message"] for e in events[:first_step] if e["type"] == "log"]
    assert any(m.startswith("before step 1: the model answers") for m in said), said
    assert any(m.startswith("before step 1: measuring the starting validation loss") for m in said), said
    assert types.index("sample") > next(i for i, e in enumerate(events) if e["type"] == "log"
                                        and "answers" in e["message"])
    listed = json.loads(_run(["runs", "--json"], tmp_path).stdout)["runs"]
    assert listed[0]["run_dir"] == str(run_dir) and listed[0]["status"] == "completed"
    assert listed[0]["best_val_loss"] == pytest.approx(min(e["val_loss"] for e in evals))


def _resume_args(model_dir, name):
    return ["train", "--events", "jsonl", "--set", f"model.name={model_dir}", "--set", "train.max_steps=8",
            "--set", "output.save_every=2", "--set", "eval.every_steps=0", "--set", "eval.sample_prompts=0",
            "--set", "lora.dropout=0.1", "--set", "train.micro_batch_size=2", "--set", "train.grad_accum=2",
            "--set", "data.max_length=128", "--set", f"output.run_name={name}"]


def _step_losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    for e in read_events(run_dir / "events.jsonl"):
        if e["type"] == "step":
            losses[e["step"]] = e["loss"]  # a resumed run repeats steps after the checkpoint: keep the last
    return losses


def test_sigkill_then_resume_matches_an_uninterrupted_run_bit_for_bit(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    straight = _run(_resume_args(tiny_model_dir, "straight"), tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]

    child = subprocess.Popen(CLI + _resume_args(tiny_model_dir, "killed"), env=_env(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in child.stdout:
            event = parse_line(line)
            if event and event["type"] == "step" and event["step"] == 5:  # checkpoint 4 exists, step 5 is done
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    killed_dir = tmp_path / "runs" / "killed"
    assert json.loads((killed_dir / "state.json").read_text())["status"] == "running"  # it never said goodbye
    listed = json.loads(_run(["runs", "--json"], tmp_path).stdout)["runs"]
    assert {r["run_name"]: r["status"] for r in listed}["killed"] == "crashed"

    resumed = _run(["train", "--resume", str(killed_dir), "--events", "jsonl"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    started = [parse_line(x) for x in resumed.stdout.splitlines()]
    assert started[0]["type"] == "run_started" and started[0]["resumed_from_step"] == 4

    straight_dir = tmp_path / "runs" / "straight"
    assert _step_losses(killed_dir) == _step_losses(straight_dir)
    assert sorted(_step_losses(killed_dir)) == list(range(1, 9))
    a = load_file(str(straight_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_sigterm_saves_a_checkpoint_and_exits_with_the_stopped_code(tmp_path, tiny_model_dir):
    args = _resume_args(tiny_model_dir, "stopped")
    args[args.index("train.max_steps=8")] = "train.max_steps=200"
    child = subprocess.Popen(CLI + args, env=_env(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    events = []
    for line in child.stdout:
        event = parse_line(line)
        events.append(event)
        if event and event["type"] == "step" and event["step"] == 3:
            child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=120) == 3
    finished = events[-1]
    assert finished["type"] == "run_finished" and finished["status"] == "stopped"
    stopped_at = finished["final_step"]
    assert (tmp_path / "runs" / "stopped" / "checkpoints" / f"step-{stopped_at:06d}").is_dir()


def test_bad_data_fails_with_one_readable_line_and_no_traceback(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"\n', encoding="utf-8")
    proc = _run(["train", "--events", "jsonl", "--set", f"model.name={tiny_model_dir}", "--data", str(bad)],
                tmp_path)
    assert proc.returncode == 2
    finished = [parse_line(x) for x in proc.stdout.splitlines()][-1]
    assert finished["status"] == "failed" and f"{bad}:2" in finished["error"]
    assert "Traceback" not in proc.stderr


def test_bad_config_is_refused_before_any_run_folder_exists(tmp_path):
    proc = _run(["train", "--set", "lora.r=-3"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("ft-desk: lora.r must be an int from 1 to 4096, got -3\n"
                                   "  fix: change lora.r in the preset or with --set lora.r=VALUE (the default is 16)")
    assert not (tmp_path / "runs").exists()


def test_a_finished_run_ends_with_the_commands_to_try_next(tmp_path, monkeypatch):
    from ft_desk.trainer.cli import train as train_cli

    home = tmp_path / "runs"
    run = home / "20260101-demo-qlora"
    run.mkdir(parents=True)
    monkeypatch.setattr(train_cli, "runs_home", lambda: home)
    lines = "\n".join(train_cli.next_steps(run, "completed"))
    for command in ("ft-desk eval 20260101-demo-qlora", "ft-desk chat 20260101-demo-qlora",
                    "ft-desk export 20260101-demo-qlora --format gguf"):
        assert command in lines
    elsewhere = tmp_path / "mine" / "run-1"
    assert f"ft-desk eval {elsewhere}" in "\n".join(train_cli.next_steps(elsewhere, "completed"))  # not in runs/
    assert train_cli.next_steps(run, "stopped") == [f"resume it with: ft-desk train --resume {run}"]
    assert train_cli.next_steps(run, "failed") == []
