"""The run folder contract: the names on disk, state.json that survives a crash, checkpoint lookup, the status a
user is shown, and the list of runs - the same answers for `ft-desk runs`, eval, export and the app."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from ft_desk.trainer import run_folder as rf
from ft_desk.trainer.atomic import temp_path
from ft_desk.trainer.errors import UserError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass", "ft_desk"])
    proc.wait()  # exited and reaped: nobody holds the pid
    return proc.pid


def _run(home, name, status="completed", created="2026-01-01T00:00:00+00:00", **state):
    run_dir = home / name
    run_dir.mkdir(parents=True)
    rf.write_state(run_dir, {"status": status, "created": created, "run_name": name, **state})
    return run_dir


def _checkpoint(run_dir, step):
    folder = rf.step_folder(run_dir, step)
    folder.mkdir(parents=True)
    return folder


def test_the_layout_names_are_the_ones_on_users_disks(tmp_path):
    run = tmp_path / "r"
    assert rf.config_path(run) == run / "config.json"
    assert rf.state_path(run) == run / "state.json"
    assert rf.events_path(run) == run / "events.jsonl"
    assert rf.log_path(run) == run / "run.log"
    assert rf.val_path(run) == run / "data" / "val.jsonl"
    assert rf.step_folder(run, 12) == run / "checkpoints" / "step-000012"
    assert rf.final_weights_dir(run, "qlora") == run / "adapter"
    assert rf.final_weights_dir(run, "full") == run / "model"
    assert rf.step_of(run / "checkpoints" / "step-000012") == 12 and rf.step_of(run / "adapter") is None


def test_a_new_run_folder_never_reuses_an_existing_one(tmp_path):
    name = rf.default_run_name("Qwen/Qwen2.5 0.5B", "qlora", datetime(2026, 3, 4, 5, 6, 7))
    assert name == "20260304-050607-qwen2.5-0.5b-qlora"
    first = rf.create_run_dir(tmp_path / "runs", name)
    second = rf.create_run_dir(tmp_path / "runs", name)
    assert (first.name, second.name) == (name, f"{name}-2") and second.is_dir()
    assert rf.unused_run_dir(tmp_path / "runs", name).name == f"{name}-3"
    for bad in ("a/b", ".hidden"):
        with pytest.raises(UserError, match="output.run_name must be a plain folder name"):
            rf.create_run_dir(tmp_path / "runs", bad)


def test_state_updates_survive_a_torn_temp_file_and_are_never_half_written(tmp_path):
    run = _run(tmp_path, "r", status="running", step=3)
    temp_path(rf.state_path(run)).write_text('{"status": "comp', encoding="utf-8")  # killed mid-write
    assert rf.read_state(run)["step"] == 3  # readers never see the torn copy
    state = rf.update_state(run, step=4, best_step=4)
    on_disk = json.loads(rf.state_path(run).read_text(encoding="utf-8"))
    assert on_disk == state and on_disk["step"] == 4 and on_disk["status"] == "running" and on_disk["updated"]
    assert not temp_path(rf.state_path(run)).exists()
    rf.state_path(run).write_text("{not json", encoding="utf-8")
    assert rf.read_state(run) == {}  # a hand-damaged file reads as "no state", not a crash


def test_best_is_the_final_weights_then_the_best_step_then_the_last(tmp_path):
    run = _run(tmp_path, "r", best_step=2, step=6)
    for step in (2, 4, 6):
        _checkpoint(run, step)
    assert rf.checkpoint_folder(run, "best") == rf.step_folder(run, 2)
    assert rf.checkpoint_folder(run, "last") == rf.step_folder(run, 6)
    assert rf.checkpoint_folder(run, 4) == rf.checkpoint_folder(run, "4") == rf.step_folder(run, 4)
    assert rf.weights_step(run, rf.checkpoint_folder(run, "best")) == 2

    (run / "adapter").mkdir()
    (run / "adapter" / rf.ADAPTER_WEIGHTS).write_bytes(b"")
    assert rf.checkpoint_folder(run, "best") == run / "adapter"
    assert rf.weights_step(run, run / "adapter") == 2  # the best checkpoint was kept: its weights are final

    rf.update_state(run, best_step=None)
    assert rf.weights_step(run, run / "adapter") == 6
    (run / "adapter" / rf.ADAPTER_WEIGHTS).unlink()
    assert rf.checkpoint_folder(run, "best") == rf.step_folder(run, 6)  # no usable final weights, no best


def test_a_missing_checkpoint_is_a_sentence_that_lists_what_there_is(tmp_path):
    run = _run(tmp_path, "r")
    with pytest.raises(UserError, match="has no checkpoint yet"):
        rf.checkpoint_folder(run, "last")
    _checkpoint(run, 5)
    _checkpoint(run, 10)
    with pytest.raises(UserError, match="no checkpoint at step 7; available: 5, 10"):
        rf.checkpoint_folder(run, 7)
    with pytest.raises(UserError, match="--checkpoint must be best, last or a step number"):
        rf.checkpoint_folder(run, "newest")
    with pytest.raises(UserError, match="not an ft-desk run folder"):
        rf.checkpoint_folder(tmp_path / "elsewhere")


def test_a_running_state_whose_process_is_gone_is_crashed(tmp_path):
    assert rf.judged_status({"status": "running", "pid": _dead_pid()}) == "crashed"
    assert rf.judged_status({"status": "running"}) == "crashed"
    assert rf.judged_status({"status": "stopped", "pid": _dead_pid()}) == "stopped"
    assert rf.judged_status({}) == "unknown"
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "ft_desk"])
    try:
        run = _run(tmp_path, "live", status="running", pid=owner.pid)
        assert rf.judged_status(rf.read_state(run)) == "running" and rf.is_live(run)
    finally:
        owner.kill()
        owner.wait()
    assert not rf.is_live(run)


def test_list_runs_is_newest_first_with_judged_status(tmp_path):
    home = tmp_path / "runs"
    _run(home, "old", created="2026-01-01T00:00:00+00:00", best_val_loss=1.25)
    _run(home, "new", status="running", pid=_dead_pid(), created="2026-02-01T00:00:00+00:00")
    (home / "not-a-run").mkdir()
    _run(home, ".hidden")
    rows = rf.list_runs(home)
    assert [(r["run_name"], r["status"]) for r in rows] == [("new", "crashed"), ("old", "completed")]
    assert rows[1]["best_val_loss"] == 1.25 and rows[1]["run_dir"] == str(home / "old")
    assert rf.list_runs(tmp_path / "nothing-here") == []


def test_has_weights_once_a_checkpoint_or_final_weights_exist(tmp_path):
    run = _run(tmp_path, "r")
    assert not rf.has_weights(run)
    _checkpoint(run, 1)
    assert rf.has_weights(run)


def test_only_a_live_ft_desk_process_counts_as_the_runs_owner():
    ft_desk_like = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "ft_desk"])
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    finished = subprocess.Popen([sys.executable, "-c", "pass", "ft_desk"])
    try:
        deadline = time.monotonic() + 30
        while not _is_zombie(finished.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # exited but not yet reaped: a zombie that still holds its pid
        assert rf.pid_alive(ft_desk_like.pid)
        assert not rf.pid_alive(stranger.pid)  # a pid reused by an unrelated program
        assert not rf.pid_alive(finished.pid)
    finally:
        for proc in (ft_desk_like, stranger, finished):
            proc.kill()
            proc.wait()
    assert not rf.pid_alive(finished.pid)  # reaped and gone
    assert not rf.pid_alive(None) and not rf.pid_alive("1234")


def _is_zombie(pid: int) -> bool:
    import psutil

    return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_commands_take_a_run_by_its_name_or_its_folder(tmp_path, monkeypatch):
    home = tmp_path / "runs"
    run = home / "20260101-demo-qlora"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}", encoding="utf-8")
    assert rf.resolve_run("20260101-demo-qlora", home) == run
    assert rf.resolve_run(str(run), home) == run
    monkeypatch.chdir(home)
    assert rf.resolve_run("./20260101-demo-qlora", tmp_path / "elsewhere") == Path("20260101-demo-qlora")
    with pytest.raises(UserError) as err:
        rf.resolve_run("no-such-run", home)
    assert "no run folder or run named 'no-such-run'" in err.value.message and str(home) in err.value.message
    assert "ft-desk runs" in err.value.hint
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="is not an ft-desk run folder"):
        rf.resolve_run(tmp_path / "plain", home)
