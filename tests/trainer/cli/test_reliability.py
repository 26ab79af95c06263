"""The one rule at every entry point (cli/main.py), and the guards it relies on: locks, run status, redaction,
folder problems, chat requests, the schedule bound."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ft_desk.trainer import run_folder
from ft_desk.trainer.cli import main as cli
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.events import FileSink, JsonlSink, make_event
from ft_desk.trainer.limits import folder_problem
from ft_desk.trainer.redaction import redact_tokens

TOKEN = "hf_" + "Ab1" * 11 + "z"


def _boom(args):
    raise RuntimeError("the flux capacitor is empty")


def test_an_unexpected_error_is_one_sentence_and_its_traceback_goes_to_the_log_folder(monkeypatch, capsys,
                                                                                     session_home):
    from ft_desk.trainer.cli import runs

    monkeypatch.setattr(runs, "run", _boom)
    code = cli.main(["runs"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in out + err
    first, fix = err.strip().splitlines()
    assert first == "ft-desk: internal error: RuntimeError: the flux capacitor is empty"
    assert fix.startswith("  fix: this is a bug in ft-desk; the traceback is in ")
    log = Path(fix.split("the traceback is in ", 1)[1])
    assert log.parent == session_home / "logs"
    text = log.read_text(encoding="utf-8")
    assert "Traceback (most recent call last)" in text and "flux capacitor" in text


def test_an_unexpected_error_on_a_run_logs_to_its_run_log_and_reports_as_data(monkeypatch, capsys, tmp_path):
    from ft_desk.trainer.cli import export

    run = tmp_path / "run"
    run.mkdir()
    run_folder.write_state(run, {"status": "completed"})
    monkeypatch.setattr(export, "run", _boom)
    code = cli.main(["export", str(run), "--format", "adapter", "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    final = json.loads(out.strip().splitlines()[-1])
    assert final["type"] == "command_failed" and final["exit_code"] == 1
    assert str(run / "run.log") in final["hint"]
    assert "Traceback (most recent call last)" in (run / "run.log").read_text(encoding="utf-8")


def test_a_full_disk_or_a_read_only_folder_is_said_as_such(monkeypatch, capsys):
    from ft_desk.trainer.cli import runs

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/state.json")

    monkeypatch.setattr(runs, "run", full)
    assert cli.main(["runs"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ft-desk: the disk is full (writing /data/runs/x/state.json)\n  fix: free some space")


def test_a_refused_command_line_is_one_sentence_with_the_fix_and_exit_2(capsys):
    assert cli.main(["train", "--events", "yes"]) == 2
    err = capsys.readouterr().err
    first, fix = err.splitlines()
    assert first.startswith("ft-desk train: argument --events: invalid choice: 'yes' (choose from ")
    assert fix == "  fix: `ft-desk train --help` lists the arguments"


def test_a_refused_command_line_in_jsonl_mode_ends_with_a_command_failed_event(capsys):
    assert cli.main(["chat", "somewhere", "--events", "jsonl", "--max-new-tokens", "0"]) == 2
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["type"] == "command_failed" and final["exit_code"] == 2
    assert "must be an int from 1 to 32768, got 0" in final["error"] and final["hint"]


def test_every_user_error_comes_with_a_fix_even_where_the_raise_site_has_none(monkeypatch, capsys):
    from ft_desk.trainer.cli import runs

    def plain(args):
        raise UserError("the moon is in the way")

    monkeypatch.setattr(runs, "run", plain)
    assert cli.main(["runs"]) == 2
    assert capsys.readouterr().err == ("ft-desk: the moon is in the way\n"
                                       "  fix: `ft-desk runs --help` explains what it accepts\n")


# ---------------------------------------------------------------- one writer per run, and one way to judge a run

def _ft_desk_looking_sleeper() -> subprocess.Popen:
    """A live process whose command line mentions ft_desk, as a reused pid or a hung trainer would."""
    return subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(120)", "ft_desk"])


def test_a_second_writer_to_a_run_is_refused_while_the_first_holds_it(tmp_path):
    lock = run_folder.lock_run(tmp_path)
    try:
        with pytest.raises(UserError, match="another ft-desk process is writing to"):
            run_folder.lock_run(tmp_path)
    finally:
        lock.release()
    run_folder.lock_run(tmp_path).release()  # free again once released


def test_a_running_state_with_a_live_pid_but_no_lock_holder_is_judged_crashed(tmp_path):
    sleeper = _ft_desk_looking_sleeper()
    try:
        state = {"status": "running", "pid": sleeper.pid}
        assert run_folder.judged_status(state) == "running"  # the pid alone looks alive
        (tmp_path / run_folder.LOCK).touch()  # the trainer that held the lock is gone
        assert run_folder.judged_status(state, tmp_path) == "crashed"
        lock = run_folder.lock_run(tmp_path)
        try:
            assert run_folder.judged_status(state, tmp_path) == "running"
        finally:
            lock.release()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_sigkilled_lock_holder_leaves_the_run_crashed_at_once(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ft_desk.trainer import run_folder; "
                               "held = run_folder.lock_run(sys.argv[1]); print('locked', flush=True); time.sleep(120)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        state = {"status": "running", "pid": holder.pid}
        assert run_folder.judged_status(state, tmp_path) == "running"
        holder.kill()
        deadline = time.monotonic() + 30
        while run_folder.is_locked(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        # not reaped yet (a zombie), or reaped: either way the run is crashed, for runs, resume and export alike
        assert run_folder.judged_status(state, tmp_path) == "crashed"
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- secrets

@pytest.mark.parametrize("secret, shown", [
    (TOKEN, "hf_***"),
    ("sk-proj-" + "a1B2" * 6, "sk-***"),
    ("ghp_" + "x" * 36, "ghp_***"),
    ("github_pat_" + "A1_" * 10, "github_pat_***"),
    ("AKIA" + "ABCDEFGHIJ012345", "AKIA***"),
])
def test_token_shaped_strings_are_masked_and_keep_their_kind(secret, shown):
    assert redact_tokens(f"model {secret}!") == f"model {shown}!"


def test_names_that_only_look_a_bit_like_tokens_are_left_alone():
    text = "hf_hub_download sk-learn ghp_x AKIA-notakey scikit-learn_hf_transfer"
    assert redact_tokens(text) == text


def test_events_and_state_written_by_ft_desk_never_hold_a_token(tmp_path):
    import io

    sink = FileSink(tmp_path / "events.jsonl")
    sink.emit(make_event("log", level="info", message=f"loading {TOKEN}"))
    sink.close()
    stream = io.StringIO()
    JsonlSink(stream).emit(make_event("log", level="info", message=f"see /data/{TOKEN}/x.jsonl"))
    run_folder.write_state(tmp_path, {"status": "failed", "model_name": TOKEN, "nested": {"path": [TOKEN]}})
    for text in ((tmp_path / "events.jsonl").read_text(), stream.getvalue(), (tmp_path / "state.json").read_text()):
        assert TOKEN not in text and "hf_***" in text
        json.loads(text.splitlines()[0]) if text.startswith("{\"v\"") else json.loads(text)


# ---------------------------------------------------------------- folders ft-desk must write into

@pytest.mark.parametrize("code, says", [
    (errno.EROFS, "is on a read-only file system"),
    (errno.EACCES, "is not writable (permission denied)"),
    (errno.ENOSPC, "is full"),
])
def test_a_folder_that_cannot_be_written_is_one_sentence(tmp_path, code, says):
    err = folder_problem(OSError(code, "x", str(tmp_path / "runs")), tmp_path / "runs", "the runs folder",
                         "output.runs_dir")
    assert err.message.startswith(f"cannot use {tmp_path / 'runs'} as the runs folder: ") and says in err.message
    assert err.hint == "point output.runs_dir at a writable folder"


def test_a_runs_folder_that_is_a_file_is_refused_before_anything_is_written(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder", encoding="utf-8")
    with pytest.raises(UserError, match=r"is a file, not a folder"):
        run_folder.create_run_dir(blocker, "my-run")
    assert blocker.read_text(encoding="utf-8") == "not a folder"


# ---------------------------------------------------------------- chat requests on stdin

@pytest.mark.parametrize("line, says", [
    ("nope", "bad request: not JSON"),
    ("[]", "expected a JSON object, got list"),
    ('{"messages": []}', '"messages" must be a non-empty list'),
    ('{"messages": [{"content": "hi"}]}', "messages[0] must be an object with a string role"),
    ('{"messages": [{"role": "user", "content": "hi"}], "base": 1}', '"base" must be true or false'),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 1e12}', "from 1 to 32768"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": true}', "from 1 to 32768"),
])
def test_a_garbage_chat_request_is_one_sentence_with_the_request_shape(line, says):
    from ft_desk.trainer.cli.chat import REQUEST_HINT, parse_request

    with pytest.raises(UserError) as info:
        parse_request(line, 256)
    assert says in info.value.message and info.value.hint == REQUEST_HINT


def test_a_good_chat_request_keeps_its_messages_and_defaults():
    from ft_desk.trainer.cli.chat import parse_request

    line = '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}'
    assert parse_request(line, 99) == ([{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": "hi"}], False, 99)


# ---------------------------------------------------------------- the training schedule

class _Row:
    def __init__(self, n: int) -> None:
        self.input_ids = [1] * n
        self.labels = [-100] + [1] * (n - 1)


def _old_train_schedule(cfg, examples):
    """The schedule as it was planned before (one epoch added at a time): a resume must replay the same batches."""
    from ft_desk.trainer.training.run import epoch_schedule

    plan = epoch_schedule(cfg, examples, cfg.train.epochs)
    if cfg.train.max_steps:
        need = cfg.train.max_steps * cfg.train.grad_accum
        epochs = 1.0
        while len(plan) < need:
            epochs += 1
            plan = epoch_schedule(cfg, examples, epochs)
        plan = plan[:need]
    return plan


@pytest.mark.parametrize("sets", [["train.max_steps=37"], ["train.max_steps=3", "train.epochs=2.5"],
                                  ["train.epochs=0.5"], ["train.max_steps=200", "train.packing=false"]])
def test_the_schedule_is_the_same_batches_as_before_only_planned_faster(sets):
    from ft_desk.trainer.presets import load_config
    from ft_desk.trainer.training.run import train_schedule

    cfg = load_config(["demo"], sets + ["train.micro_batch_size=2", "train.grad_accum=3", "data.max_length=64"])
    examples = [_Row(5 + (i * 7) % 40) for i in range(23)]
    assert train_schedule(cfg, examples) == _old_train_schedule(cfg, examples)


def test_a_schedule_too_long_to_plan_is_refused_with_the_bound():
    from ft_desk.trainer.presets import load_config
    from ft_desk.trainer.training.run import train_schedule

    cfg = load_config(["demo"], ["train.max_steps=1000000", "train.grad_accum=4"])
    with pytest.raises(UserError, match=r"the run would take 4,000,000 micro-batches; ft-desk plans at most 2,000,000"):
        train_schedule(cfg, [_Row(10)])
