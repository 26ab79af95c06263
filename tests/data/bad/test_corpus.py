"""The bad-input corpus (manifest.yaml): every case answers with its exit code and one readable sentence, and no
traceback ever reaches stdout or stderr.

The cases run in-process through `ft_desk.trainer.cli.main.main(argv)` - the function `ft-desk` and the TUI's
child processes run - so the whole corpus costs seconds, not a Python start-up per case. A few behaviours only a
real process shows (a closed pipe, Ctrl-C, garbage on chat's stdin) run as child processes at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ft_desk.trainer.events import parse_line

HERE = Path(__file__).parent
FILES = HERE / "files"
CASES = yaml.safe_load((HERE / "manifest.yaml").read_text(encoding="utf-8"))
# Built here, never stored: a string shaped like a Hugging Face user token.
TOKEN = "hf_" + "Zx9" * 11 + "Q"
CLI = [sys.executable, "-m", "ft_desk.trainer.cli.main"]


# ---------------------------------------------------------------- setups: each prepares a case's {tmp} folder

def _fifo(tmp: Path, ctx) -> None:
    os.mkfifo(tmp / "pipe.jsonl")


def _long_line(tmp: Path, ctx) -> None:
    row = '{"text": "' + "a" * (17 * 1024 * 1024) + '"}\n'
    (tmp / "long.jsonl").write_text('{"text": "short"}\n' + row, encoding="utf-8")


def _a_file(tmp: Path, ctx) -> None:
    (tmp / "file").write_text("I am a file, not a folder\n", encoding="utf-8")


def _model_empty(tmp: Path, ctx) -> None:
    (tmp / "model").mkdir()


def _model_garbage_config(tmp: Path, ctx) -> None:
    shutil.copytree(ctx["model"], tmp / "model")
    (tmp / "model" / "config.json").write_text("{not json", encoding="utf-8")


def _model_no_weights(tmp: Path, ctx) -> None:
    shutil.copytree(ctx["model"], tmp / "model")
    (tmp / "model" / "model.safetensors").unlink()


def _model_evil_template(tmp: Path, ctx) -> None:
    shutil.copytree(ctx["model"], tmp / "model")
    (tmp / "model" / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'].__class__.__mro__[1].__subclasses__() }}{% endfor %}",
        encoding="utf-8")


def _copy_run(tmp: Path, ctx) -> Path:
    return Path(shutil.copytree(ctx["run"], tmp / "run", ignore=shutil.ignore_patterns("exports")))


def _garbage_config_run(tmp: Path, ctx) -> None:
    (_copy_run(tmp, ctx) / "config.json").write_text('{"model": {"name": "x"', encoding="utf-8")


def _list_config_run(tmp: Path, ctx) -> None:
    (_copy_run(tmp, ctx) / "config.json").write_text("[1, 2, 3]", encoding="utf-8")


def _no_weights_run(tmp: Path, ctx) -> None:
    run = _copy_run(tmp, ctx)
    for name in ("adapter", "checkpoints", "model"):
        shutil.rmtree(run / name, ignore_errors=True)


def _nonempty_out(tmp: Path, ctx) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine\n", encoding="utf-8")


SETUPS = {"fifo": _fifo, "long_line": _long_line, "a_file": _a_file, "model_empty": _model_empty,
          "model_garbage_config": _model_garbage_config, "model_no_weights": _model_no_weights,
          "model_evil_template": _model_evil_template, "garbage_config_run": _garbage_config_run,
          "list_config_run": _list_config_run, "no_weights_run": _no_weights_run, "nonempty_out": _nonempty_out}


def _raiser(kind: str):
    import errno

    errors = {"disk_full": OSError(errno.ENOSPC, "No space left on device", "/data/ft-desk/state.json"),
              "read_only": OSError(errno.EROFS, "Read-only file system", "/data/ft-desk/cache"),
              "bug": RuntimeError("an ft-desk bug, injected by the corpus")}

    def fail(*args, **kwargs):
        raise errors[kind]

    return fail


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def good_run(tmp_path_factory, tiny_model_dir):
    """A finished LoRA run of the tiny model, in the layout `ft-desk train` writes."""
    from tests.trainer.export.runs import make_run

    return make_run(tmp_path_factory.mktemp("bad-runs"), tiny_model_dir, "lora").run_dir


def _fill(value: str, ctx: dict) -> str:
    for key, replacement in ctx.items():
        value = value.replace("{" + key + "}", str(replacement))
    return value


def run_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) as `ft-desk` runs it, with what it printed; global state it may touch is put back."""
    from ft_desk.trainer.cli.main import main

    saved_stdout, saved_handlers = sys.stdout, logging.getLogger().handlers[:]
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = main(argv)
    finally:
        sys.stdout = saved_stdout  # jsonl mode points sys.stdout at stderr
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)
        for handler in logging.getLogger().handlers[:]:
            if handler not in saved_handlers:
                logging.getLogger().removeHandler(handler)
    out, err = capsys.readouterr()
    return code, out, err


def assert_no_traceback(*streams: str) -> None:
    for text in streams:
        assert "Traceback (most recent call last)" not in text, text[-3000:]
        assert 'File "' not in text, text[-3000:]


# ---------------------------------------------------------------- the corpus

def test_the_corpus_is_big_and_every_case_is_well_formed():
    ids = [case["id"] for case in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    assert {case["exit"] for case in CASES} == {1, 2}
    for case in CASES:
        assert case.get("setup") is None or case["setup"] in SETUPS, case["id"]
        assert case["message"], case["id"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_gets_one_sentence_and_its_exit_code(case, tmp_path, capsys, monkeypatch, tiny_model_dir,
                                                       good_run):
    ctx = {"files": FILES, "tmp": tmp_path, "model": tiny_model_dir, "run": good_run, "token": TOKEN}
    if case.get("setup"):
        SETUPS[case["setup"]](tmp_path, ctx)
    for key, value in (case.get("env") or {}).items():
        monkeypatch.setenv(key, _fill(value, ctx))
    argv = [_fill(str(a), ctx) for a in case["argv"]]
    if case.get("fault"):
        target, kind = case["fault"]
        monkeypatch.setattr(target, _raiser(kind))

    code, out, err = run_in_process(argv, capsys)

    assert_no_traceback(out, err)
    message = _fill(case["message"], ctx)
    if case.get("report"):  # `data check` answers with its report: the problem with file:line, then the verdict
        text = out + err
        assert message in text, text
        if case.get("json"):
            answer = json.loads(out)
            assert answer["ok"] is False and message in json.dumps(answer), answer
            assert answer["hint"] or answer["broken_count"]
        # either the report's verdict ("not usable...: fix ...") or, for a file it cannot read at all, the sentence
        elif not any(line.startswith("not usable") for line in text.splitlines()):
            assert "\n  fix: " in err, text
    elif case.get("json"):
        # the last line: a final event (streaming commands), or the one-object answer {"ok": false, ...}
        final = json.loads(out.strip().splitlines()[-1])
        assert final.get("ok", False) is False and final["exit_code"] == case["exit"], final
        assert message in final["error"], final
        assert final.get("hint"), f"no fix in {final}"  # every failure says what to do
        if case.get("hint"):
            assert case["hint"] in final["hint"]
    else:
        assert message in err, err
        assert "\n  fix: " in err, f"no fix line in {err!r}"  # the sentence comes with what to do
    assert code == case["exit"], (code, out, err)
    if case.get("absent"):
        absent = _fill(case["absent"], ctx)
        assert absent not in out and absent not in err
        for path in tmp_path.rglob("*"):
            if path.is_file() and path.stat().st_size < 10_000_000:
                assert absent not in path.read_text(encoding="utf-8", errors="replace"), path


# ---------------------------------------------------------------- the few that need a real process

def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "FT_DESK_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`ft-desk runs | head -1` with many runs: no BrokenPipeError, no 'Exception ignored' at exit."""
    runs = tmp_path / "home" / "runs"
    for i in range(1500):  # more than a pipe buffer (64 KiB) of lines, so the writer must meet the closed pipe
        run = runs / f"run-{i:04d}"
        run.mkdir(parents=True)
        (run / "state.json").write_text(json.dumps({"status": "completed", "created": f"2026-01-01T00:{i % 60:02d}",
                                                    "model_name": "m" * 60}), encoding="utf-8")
    proc = subprocess.Popen(CLI + ["runs"], env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=60)
    assert err == ""
    assert code == 141  # as a tool killed by SIGPIPE; a shell pipeline shows no message


def test_garbage_on_chats_stdin_gets_one_error_event_per_line_and_the_chat_goes_on(tmp_path, good_run):
    requests = ["not json at all", "[1, 2]", '{"messages": "hi"}', '{"messages": [{"role": "user"}], "base": "yes"}',
                '{"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": -5}',
                '{"messages": [7]}',
                '{"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 2}']
    proc = subprocess.run(CLI + ["chat", str(good_run), "--events", "jsonl"], env=_env(tmp_path),
                          input="\n".join(requests) + "\n", capture_output=True, text=True, timeout=300)
    assert_no_traceback(proc.stdout, proc.stderr)
    events = [e for e in map(parse_line, proc.stdout.splitlines()) if e]
    kinds = [e["type"] for e in events if e["type"] != "chat_token"]
    assert kinds == ["chat_ready"] + ["chat_error"] * 6 + ["chat_done"], kinds
    errors = [e["error"] for e in events if e["type"] == "chat_error"]
    assert errors[0].startswith("bad request: not JSON") and "expected a JSON object, got list" in errors[1]
    assert "must be an int from 1 to 32768, got -5" in errors[4]
    assert all(e["hint"] for e in events if e["type"] == "chat_error")
    assert proc.returncode == 0


def test_ctrl_c_during_training_says_at_once_that_it_stops_after_the_step(tmp_path, tiny_model_dir):
    """The first Ctrl-C is answered right away (not when the step ends); the run then stops with a checkpoint."""
    args = ["train", "--model", str(tiny_model_dir), "--events", "jsonl", "--set", "train.max_steps=400",
            "--set", "eval.every_steps=0", "--set", "eval.sample_prompts=0", "--set", "train.threads=1",
            "--set", "data.max_length=64", "--set", "output.run_name=ctrl-c"]
    proc = subprocess.Popen(CLI + args, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        event = parse_line(line)
        if event and event["type"] == "step":
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert_no_traceback(out, err)
    assert "SIGINT received: stopping after the current step and saving a checkpoint" in err
    assert "Ctrl-C again stops at once" in err
    assert proc.returncode == 3  # stopped, resumable
    finished = [e for e in map(parse_line, out.splitlines()) if e][-1]
    assert finished["type"] == "run_finished" and finished["status"] == "stopped"


def test_a_reply_that_fails_inside_is_one_error_event_and_the_chat_goes_on(tmp_path, monkeypatch, capsys, good_run):
    """In-process `chat --events jsonl`: a bug in one reply is a chat_error naming run.log, then the next request."""
    import io

    from ft_desk.trainer.cli import chat

    calls = []

    def reply(self, messages, base, max_new_tokens, emit, **sampling):
        calls.append(messages)
        if len(calls) == 1:
            raise RuntimeError("injected generation failure")
        return {"text": "ok", "tokens": 1, "seconds": 0.0, "stopped": True}

    monkeypatch.setattr(chat.ChatModel, "reply", reply)
    line = '{"messages": [{"role": "user", "content": "hi"}]}\n'
    monkeypatch.setattr(sys, "stdin", io.StringIO(line * 2))
    code, out, err = run_in_process(["chat", str(good_run), "--events", "jsonl"], capsys)
    assert_no_traceback(out, err)
    events = [e for e in map(parse_line, out.splitlines()) if e]
    assert [e["type"] for e in events] == ["chat_ready", "chat_error", "chat_done"]
    assert events[1]["error"] == "internal error: RuntimeError: injected generation failure"
    assert str(good_run / "run.log") in events[1]["hint"]
    assert "injected generation failure" in (good_run / "run.log").read_text(encoding="utf-8")
    assert code == 0
