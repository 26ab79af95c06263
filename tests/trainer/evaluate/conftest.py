"""A run that memorised eight JSON answers: trained once per session on the tiny model, evaluated by the tests.

The tiny model's output head is random and frozen, which caps how confident LoRA on the inner layers can make it;
targeting lm_head as well lets the adapter memorise the set (about 100 steps at lr 1e-2, no dropout). Training that
hard on eight rows is also a deliberately over-trained run for the retention check.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

QUESTIONS = [
    ("What colour is the sky?", "blue"), ("How many wheels does a bike have?", "two"),
    ("What do cows drink?", "water"), ("Which season is coldest?", "winter"),
    ("What is frozen water called?", "ice"), ("What do bees make?", "honey"),
    ("Which animal barks?", "dog"), ("What shape is a ball?", "round"),
]
HELD_OUT = [("Where do fish live?", "sea"), ("What do you wear on your feet?", "shoes")]
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
                 "additionalProperties": False}
ANSWER_REGEX = r'^\{"answer": "[a-z]+"\}$'
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"


def write_chat_rows(path: Path, pairs) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for question, answer in pairs:
            row = {"messages": [{"role": "user", "content": question},
                                {"role": "assistant", "content": json.dumps({"answer": answer})}]}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def eval_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("eval-data")
    probe = folder / "probe.txt"
    from ft_desk.trainer.demo import retention_probe_path

    probe.write_text("\n".join(retention_probe_path().read_text(encoding="utf-8").splitlines()[:16]) + "\n",
                     encoding="utf-8")
    schema = folder / "schema.json"
    schema.write_text(json.dumps(ANSWER_SCHEMA), encoding="utf-8")
    return {"train": write_chat_rows(folder / "answers.jsonl", QUESTIONS),
            "valid": write_chat_rows(folder / "held_out.jsonl", HELD_OUT), "probe": probe, "schema": schema}


@pytest.fixture(scope="session")
def memorized_run(tiny_model_dir, eval_files, tmp_path_factory) -> Path:
    import torch

    from ft_desk.trainer.events import ListSink
    from ft_desk.trainer.presets import load_config
    from ft_desk.trainer.training.run import train

    runs = tmp_path_factory.mktemp("eval-runs")
    cfg = load_config(["demo"], [
        f"model.name={tiny_model_dir}", f"data.train_file={eval_files['train']}",
        f"data.valid_file={eval_files['valid']}", "train.max_steps=100", "optim.lr=1e-2", "optim.warmup_ratio=0",
        "lora.dropout=0", f"lora.target_modules={TARGETS}", "train.micro_batch_size=8", "train.grad_accum=1",
        "eval.every_steps=0", "eval.sample_prompts=0", "output.save_every=0", f"output.runs_dir={runs}",
        "output.run_name=memorized", "train.threads=1",  # one thread: far faster on a busy 2-core machine
    ])
    threads = torch.get_num_threads()
    try:
        code, run_dir = train(cfg, ListSink())
    finally:
        torch.set_num_threads(threads)  # training sets it for the process; leave other tests as they were
    assert code == 0, (run_dir / "run.log").read_text()[-2000:]
    return run_dir


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_dir, tmp_path_factory) -> Path:
    """A random 1-layer BERT with the tiny tokenizer: not meaningful, but a real encoder to pool."""
    import shutil

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-encoder")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, out / name)
    vocab = len(AutoTokenizer.from_pretrained(out))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(out)
    return out


@pytest.fixture
def no_embedding_model(monkeypatch):
    """No sentence-embedding model anywhere: no env var, no package, nothing in the Hub cache."""
    from ft_desk.trainer.evaluate import embed as eval_embed

    monkeypatch.delenv(eval_embed.ENV_VAR, raising=False)
    monkeypatch.setattr(eval_embed, "PACKAGES", ("ft_desk_no_such_embedding_package",))
    monkeypatch.setattr(eval_embed, "_cached_hub_folder", lambda: None)
