"""End to end: a real `ft-desk train --preset demo` run (4 steps) exported as GGUF and verified."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_real_demo_run_exports_to_gguf_that_matches_the_trained_model(session_home, tmp_path, capsys):
    from ft_desk.trainer.cli.main import main

    train = subprocess.run(
        [sys.executable, "-m", "ft_desk.trainer.cli.main", "train", "--preset", "demo", "--set", "train.max_steps=4",
         "--set", "eval.every_steps=0", "--set", "eval.sample_prompts=0", "--set", "data.max_length=128",
         "--set", f"output.runs_dir={tmp_path}", "--set", "output.run_name=e2e"],
        capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-2000:]
    run_dir = tmp_path / "e2e"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    out = tmp_path / "gguf"
    code = main(["export", str(run_dir), "--format", "gguf", "--gguf-type", "q8_0", "--out", str(out), "--json"])
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == 0 and result["passed"], json.dumps(result["fidelity"], indent=1)[:3000]
    comps = result["fidelity"]["comparisons"]
    assert comps["merged_vs_trained"]["mean_kl"] < 1e-4
    assert comps["gguf_vs_merged"]["mean_kl"] < 2e-3
    checks = {c["name"]: c for c in comps["gguf_vs_trained"]["checks"]}
    assert checks["tokenizer"]["ok"] and checks["stop_tokens"]["ok"]
    # The fidelity loss counts every token of a few validation rows: its label must not pass for the run's val loss.
    assert checks["loss_delta"]["detail"].startswith("loss on ") and "every token" in checks["loss_delta"]["detail"]
    assert (out / result["facts"]["file"]).is_file() and (out / "fidelity.json").is_file()
