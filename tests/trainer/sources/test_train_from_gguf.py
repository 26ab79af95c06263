"""`ft-desk train --model x.gguf` and `--model <ollama name>` end to end as a user runs them: real child
processes, the import reported as events (with the GGUF's type said plainly), a finished run, the second run
reusing the import, and its Ollama export named after the Ollama model it was tuned from, keeping its SYSTEM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.sources.conftest import add_ollama_model

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "ft_desk.trainer.cli.main"]


def _env(home: Path, store: Path) -> dict[str, str]:
    return dict(os.environ, FT_DESK_HOME=str(home), HF_HUB_OFFLINE="1", OLLAMA_MODELS=str(store),
                PYTHONUNBUFFERED="1")


def _train(model: str, home: Path, store: Path, name: str, mode: str = "jsonl") -> subprocess.CompletedProcess:
    env = _env(home, store)
    args = ["train", "--preset", "demo", "--model", model, "--data", "demo", "--events", mode,
            "--set", "train.max_steps=2", "--set", "train.micro_batch_size=2", "--set", "data.max_length=64",
            "--set", "eval.every_steps=0", "--set", "eval.sample_prompts=0", "--set", "train.threads=1",
            "--set", "output.save_every=0", "--set", f"output.run_name={name}"]
    return subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=600)


def test_train_from_a_gguf_path_and_from_an_ollama_name(tiny_gguf_q8, tmp_path):
    store = tmp_path / "ollama"
    add_ollama_model(store, tiny_gguf_q8, "tiny", "q8", system="Answer as the Support Desk.")

    first = _train(str(tiny_gguf_q8), tmp_path, store, "from-gguf")
    assert first.returncode == 0, first.stderr[-2000:]
    events = [json.loads(line) for line in first.stdout.splitlines()]
    imports = [e for e in events if e["type"] == "model_import"]
    assert [e["phase"] for e in imports][-1] == "done"
    assert "dequantized from the GGUF's Q8_0 to bfloat16" in imports[-1]["message"]
    assert events[-1]["type"] == "run_finished" and events[-1]["status"] == "completed"
    run_dir = Path(events[-1]["run_dir"])
    state = json.loads((run_dir / "state.json").read_text())
    folder = Path(imports[-1]["folder"])
    assert state["model_dir"] == str(folder) and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "Converting and de-quantizing" not in first.stderr  # transformers' bar stays off the screen

    # The same weights by their Ollama name: the import is reused, and a person at a terminal is told so.
    second = _train("tiny:q8", tmp_path, store, "from-ollama", mode="pretty")
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"using tiny:q8, imported before: {folder}" in second.stderr
    assert "dequantized from the GGUF's Q8_0" in second.stderr
    config = json.loads((tmp_path / "runs" / "from-ollama" / "config.json").read_text())
    assert config["model"]["name"] == "tiny:q8"

    out = tmp_path / "exported"
    export = subprocess.run(CLI + ["export", str(tmp_path / "runs" / "from-ollama"), "--format", "ollama",
                                   "--no-verify", "--out", str(out), "--json"],
                            env=_env(tmp_path, store), capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-2000:]
    result = json.loads(export.stdout.splitlines()[-1])
    assert result["command"] == f"ollama create tiny:ft-from-ollama -f {out / 'Modelfile'}"
    assert 'SYSTEM """Answer as the Support Desk."""' in (out / "Modelfile").read_text()
    assert any("SYSTEM prompt of tiny:q8" in note for note in result["notes"])

    adapter_out = tmp_path / "adapter-export"
    adapter = subprocess.run(CLI + ["export", str(tmp_path / "runs" / "from-ollama"), "--format", "adapter",
                                    "--no-verify", "--out", str(adapter_out), "--json"],
                             env=_env(tmp_path, store), capture_output=True, text=True, timeout=600)
    assert adapter.returncode == 0, adapter.stderr[-2000:]
    # peft loads the adapter onto its base: the imported folder, not the Ollama name it cannot resolve.
    assert json.loads((adapter_out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder)
