"""The real SmolLM2-135M-Instruct (Q4_1 GGUF) as a user brings it: through a fake Ollama store built around the
file, imported once into a working model (it still answers like SmolLM), and trained by its Ollama name with
`ft-desk train` end to end. Short on purpose: every real test together has a few minutes of CI on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ft_desk.trainer.config import ModelConfig
from ft_desk.trainer.hub.gguf_import import PROVENANCE
from ft_desk.trainer.hub.resolve import resolve_model_dir
from tests.trainer.sources.conftest import add_ollama_model

pytestmark = [pytest.mark.real, pytest.mark.slow]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def real_store(real_gguf, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("ollama-store")
    add_ollama_model(store, real_gguf, "smollm2", "135m", system=SYSTEM,
                     params={"stop": ["<|im_start|>", "<|im_end|>"]})
    return store


def test_the_real_gguf_from_an_ollama_store_imports_into_a_model_that_still_answers(real_store, session_home,
                                                                                      monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("OLLAMA_MODELS", str(real_store))
    folder = resolve_model_dir(ModelConfig(name="smollm2:135m"))
    provenance = json.loads((folder / PROVENANCE).read_text())
    assert provenance["file_type"] == "Q4_1" and provenance["stored_dtype"] == "bfloat16"
    assert provenance["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert provenance["params"] == 134_515_008 and provenance["ollama"]["smollm2:135m"]["system"] == SYSTEM
    assert resolve_model_dir(ModelConfig(name="ollama:smollm2:135m")) == folder  # reused, not converted again

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")  # the GGUF's chat template came along
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_ft_desk_trains_the_real_model_by_its_ollama_name(real_store, session_home, tmp_path):
    data = tmp_path / "capitals.jsonl"
    rows = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Peru", "Lima"),
            ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Egypt", "Cairo"), ("Greece", "Athens"),
            ("Norway", "Oslo")]
    data.write_text("".join(json.dumps({"prompt": f"Capital of {c}?", "completion": city}) + "\n"
                            for c, city in rows))
    env = dict(os.environ, FT_DESK_HOME=str(session_home), HF_HUB_OFFLINE="1", OLLAMA_MODELS=str(real_store),
               PYTHONUNBUFFERED="1")
    args = ["train", "--model", "smollm2:135m", "--data", str(data), "--events", "jsonl",
            "--set", "train.max_steps=2", "--set", "train.micro_batch_size=2", "--set", "train.grad_accum=1",
            "--set", "data.max_length=64", "--set", "eval.every_steps=0", "--set", "eval.sample_prompts=0",
            "--set", "output.save_every=0", "--set", "train.threads=1", "--set", "output.run_name=real-ollama"]
    proc = subprocess.run([sys.executable, "-m", "ft_desk.trainer.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    imports = [e for e in events if e["type"] == "model_import"]
    assert imports and "dequantized from the GGUF's Q4_1 to bfloat16" in imports[-1]["message"]
    finished = events[-1]
    assert finished["type"] == "run_finished" and finished["status"] == "completed"
    steps = [e for e in events if e["type"] == "step"]
    assert len(steps) == 2 and all(0 < e["loss"] < 10 for e in steps)  # a pretrained model, not a random one
    assert (Path(finished["run_dir"]) / "adapter" / "adapter_model.safetensors").is_file()
