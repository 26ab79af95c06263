"""The real pretrained SmolLM2-135M-Instruct (a Q4_1 GGUF from the package index) through what a user does:
train on their GGUF at the qlora defaults, evaluate, export merged and GGUF - and what they would check: the
tuned model's exact match is clearly above the base's on held-out rows, it ends its replies with its turn-end
token, and the merged and GGUF exports reproduce its greedy outputs.

One module-scoped run serves every check (a few minutes on 2 cores); the task is tests/real_task.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.real_task import write_task

pytestmark = [pytest.mark.real, pytest.mark.slow]


def ft_desk(*args: str, home: Path, timeout: int = 1800) -> list[dict]:
    """Run `ft-desk ARGS` as a user would; return its JSON lines (events); fail with its stderr otherwise."""
    env = {**os.environ, "FT_DESK_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "ft_desk.trainer.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"ft-desk {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def tuned(real_gguf, tmp_path_factory):
    """(run folder, FT_DESK_HOME, events) of a QLoRA run on the real GGUF at the preset's defaults."""
    home = tmp_path_factory.mktemp("real-home")
    train, valid = write_task(home / "task")
    events = ft_desk("train", "--preset", "qlora", "--model", str(real_gguf), "--data", str(train),
                     "--set", f"data.valid_file={valid}", "--set", "train.epochs=1", "--set", "train.threads=2",
                     "--set", "eval.sample_prompts=2", "--set", "eval.every_steps=0", "--events", "jsonl", home=home)
    finished = events[-1]
    assert finished["type"] == "run_finished" and finished["status"] == "completed", finished
    return Path(finished["run_dir"]), home, events


def metric(result: dict, name: str) -> dict:
    return next(m for m in result["metrics"] if m["name"] == name)


def test_the_run_sizes_itself_and_learns(tuned):
    run_dir, _, events = tuned
    recipe = [e["message"] for e in events if e["type"] == "log" and e["message"].startswith("recipe: ")]
    assert recipe and "sized from the data" in recipe[0]
    evals = [e for e in events if e["type"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] * 0.6, [e["val_loss"] for e in evals]


def test_tuned_exact_match_is_clearly_above_the_base_and_it_stops(tuned):
    run_dir, home, _ = tuned
    result = ft_desk("eval", str(run_dir), "--json", "--metrics", "exact,stop", "--max-new-tokens", "24",
                     "--threads", "2", home=home)[-1]
    assert result["type"] == "eval_finished" and result["status"] == "completed", result
    exact = metric(result, "normalized_exact_match")
    assert exact["base"] <= 0.25 and exact["tuned"] >= exact["base"] + 0.5, exact
    assert metric(result, "stop_rate")["tuned"] >= 0.9


@pytest.mark.parametrize("fmt", ["merged", "gguf"])
def test_exports_reproduce_the_tuned_models_greedy_outputs(tuned, fmt, tmp_path):
    run_dir, home, _ = tuned
    extra = ["--gguf-type", "q8_0"] if fmt == "gguf" else []
    result = ft_desk("export", str(run_dir), "--format", fmt, "--out", str(tmp_path / fmt), "--json", *extra,
                     home=home)[-1]
    assert result["type"] == "export_finished", result
    comparisons = {k: c for k, c in result["fidelity"]["comparisons"].items() if not c.get("informational")}
    assert comparisons and result["passed"] is True, json.dumps(comparisons, indent=1)[:3000]
    for name, report in comparisons.items():
        trained = result["fidelity"]["reference"]["generations"]
        assert [g["text"] for g in report["generations"]] == [g["text"] for g in trained], name
        assert all(g["stopped"] for g in report["generations"]), name
