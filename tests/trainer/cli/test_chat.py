"""`ft-desk chat RUN --events jsonl` as the TUI's chat playground drives it: the streamed pieces add up to the
reply, the base model answers with the adapter off, and a bad request gets an error without ending the session.
The run it talks to is a short real one, so training's before/after samples are checked on the way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ft_desk.trainer.events import ListSink, parse_line

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def short_run(tiny_model_dir, tmp_path_factory):
    import torch

    from ft_desk.trainer.presets import load_config
    from ft_desk.trainer.training.run import train

    runs = tmp_path_factory.mktemp("chat-runs")
    cfg = load_config(["demo"], [f"model.name={tiny_model_dir}", "train.max_steps=2", "eval.sample_prompts=2",
                                 "eval.max_new_tokens=6", f"output.runs_dir={runs}", "output.run_name=chat",
                                 "train.threads=1"])
    sink = ListSink()
    threads = torch.get_num_threads()
    try:
        code, run_dir = train(cfg, sink)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, (run_dir / "run.log").read_text()[-2000:]
    return run_dir, sink


def test_training_writes_samples_before_and_after(short_run):
    _, sink = short_run
    samples = sink.of_type("sample")
    assert [(s["phase"], s["index"]) for s in samples] == [("before", 0), ("before", 1), ("after", 0), ("after", 1)]
    assert all(isinstance(s["output"], str) and s["prompt"] and s["reference"] for s in samples)


def test_chat_streams_replies_and_survives_a_bad_request(short_run, session_home):
    run_dir, _ = short_run
    requests = [
        {"messages": [{"role": "user", "content": "My order has not arrived."}], "max_new_tokens": 8},
        {"messages": [{"role": "assistant", "content": "hello"}]},  # does not end with a user message
        {"messages": [{"role": "user", "content": "Can I get a refund?"}], "base": True, "max_new_tokens": 8},
    ]
    env = dict(os.environ, FT_DESK_HOME=str(session_home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "ft_desk.trainer.cli.main", "chat", str(run_dir), "--events",
                           "jsonl"], input="".join(json.dumps(r) + "\n" for r in requests), env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [e for e in (parse_line(line) for line in proc.stdout.splitlines()) if e]
    assert events[0]["type"] == "chat_ready" and events[0]["base_available"] is True
    replies, pieces = [], []
    for event in events[1:]:
        if event["type"] == "chat_token":
            pieces.append(event["text"])
        elif event["type"] in ("chat_done", "chat_error"):
            replies.append((event, "".join(pieces)))
            pieces = []
    assert [e["type"] for e, _ in replies] == ["chat_done", "chat_error", "chat_done"]
    for done, streamed in (replies[0], replies[2]):
        assert streamed.strip() == done["text"]  # what was shown as it came is the reply
        assert 1 <= done["tokens"] <= 8 and isinstance(done["stopped"], bool)
        assert done["stopped"] or done["tokens"] == 8
    assert "must end with a user message" in replies[1][0]["error"]


def test_sampling_and_a_system_prompt_are_taken_and_bad_values_are_one_error(short_run, session_home):
    run_dir, _ = short_run
    question = [{"role": "user", "content": "Where is my order?"}]
    requests = [
        {"messages": question, "max_new_tokens": 6, "system": "Be brief.", "temperature": 0.8, "top_p": 0.9},
        {"messages": question, "max_new_tokens": 6, "top_p": 2},
        {"messages": question, "max_new_tokens": 6, "temperature": -1},
    ]
    env = dict(os.environ, FT_DESK_HOME=str(session_home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "ft_desk.trainer.cli.main", "chat", str(run_dir), "--events",
                           "jsonl"], input="".join(json.dumps(r) + "\n" for r in requests), env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [e for e in (parse_line(line) for line in proc.stdout.splitlines()) if e]
    assert events[0]["type"] == "chat_ready" and events[0]["format"] != "text"  # the demo trains on conversations
    ends = [e for e in events if e["type"] in ("chat_done", "chat_error")]
    assert [e["type"] for e in ends] == ["chat_done", "chat_error", "chat_error"]
    assert "top_p must be in (0, 1]" in ends[1]["error"] and "temperature must be 0" in ends[2]["error"]


def test_a_raw_text_run_is_chatted_with_as_plain_text(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from ft_desk.trainer.cli.chat import _prompt_ids, run_data_format
    from ft_desk.trainer.presets import load_config

    run_dir = tmp_path / "text-run"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "events.jsonl").write_text(json.dumps({"v": 1, "type": "data_ready", "time": 0, "format": "text"})
                                          + "\n", encoding="utf-8")
    assert run_data_format(run_dir) == "text"
    (run_dir / "events.jsonl").unlink()
    (run_dir / "data" / "val.jsonl").write_text('{"text": "Q: hi\\nA: yo"}\n', encoding="utf-8")
    assert run_data_format(run_dir) == "text"  # from the validation rows when the events are gone

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = load_config(["demo"], [f"model.name={tiny_model_dir}"])
    messages = [{"role": "user", "content": "table: t\nQ: who?\nA:"}]
    plain = tokenizer.decode(_prompt_ids(messages, tokenizer, cfg, raw_text=True, system="SQL only."),
                             skip_special_tokens=True)
    assert plain == "SQL only.\ntable: t\nQ: who?\nA:"  # what the model was trained to continue, no template
    templated = tokenizer.decode(_prompt_ids(messages, tokenizer, cfg), skip_special_tokens=False)
    assert "<|im_start|>" in templated  # a conversation run keeps its chat template
