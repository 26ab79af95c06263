"""Atomic writes: a reader sees the old file or the new one, never a mix, and a crash mid-write loses nothing."""

from __future__ import annotations

import json
import os

import pytest

from ft_desk.trainer import atomic


def test_json_and_text_replace_the_file_and_leave_no_temp_file(tmp_path):
    path = tmp_path / "report.json"
    atomic.write_json(path, {"loss": 1.5}, indent=2)
    assert json.loads(path.read_text(encoding="utf-8")) == {"loss": 1.5}
    atomic.write_text(path, "é\n")
    assert path.read_bytes() == "é\n".encode("utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_lines_are_streamed_in_order(tmp_path):
    path = atomic.write_lines(tmp_path / "val.jsonl", (f"{i}\n" for i in range(3)))
    assert path.read_text(encoding="utf-8") == "0\n1\n2\n"


def test_a_write_that_fails_midway_keeps_the_old_file(tmp_path):
    path = tmp_path / "val.jsonl"
    atomic.write_text(path, "old\n")

    def lines():
        yield "new 1\n"
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError):
        atomic.write_lines(path, lines())
    assert path.read_text(encoding="utf-8") == "old\n"
    assert not atomic.temp_path(path).exists()


def test_a_temp_file_torn_by_an_earlier_crash_is_overwritten(tmp_path):
    path = tmp_path / "state.json"
    atomic.temp_path(path).write_bytes(b'{"status": "runn')  # the writer was killed here last time
    atomic.write_json(path, {"status": "completed"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"status": "completed"}
    assert not atomic.temp_path(path).exists()


def test_the_data_and_the_folder_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else None))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", None))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic.write_bytes(tmp_path / "x.bin", b"\x00\x01")
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"]
    if calls[0][1] is not None:  # Linux: tell a file from a folder by its descriptor
        assert calls[0][1] is False and calls[2][1] is True
