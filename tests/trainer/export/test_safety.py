"""The output folder promises: new or empty only, no writing through symlinks, --force never touches others' files,
disk full reported with the space needed and nothing partial left behind."""

from __future__ import annotations

import errno

import pytest

from ft_desk.trainer.errors import UserError
from ft_desk.trainer.events import ListSink
from ft_desk.trainer.export.pipeline import ExportRequest, export_run


def _export(run, out, **kw):
    return export_run(ExportRequest(run_dir=run.run_dir, format=kw.pop("format", "adapter"), out=out,
                                    verify=False, **kw), ListSink())


def _leftovers(folder):
    return [p.name for p in folder.parent.iterdir() if ".partial-" in p.name or ".work-" in p.name]


def test_non_empty_folder_is_refused_and_left_alone(qlora_run, out_dir):
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty") as err:
        _export(qlora_run, out_dir)
    assert "--force" in err.value.hint
    assert [p.name for p in out_dir.iterdir()] == ["notes.txt"]


def test_empty_folder_and_new_folder_are_fine(qlora_run, out_dir, tmp_path):
    out_dir.mkdir()
    _export(qlora_run, out_dir)
    assert (out_dir / "adapter_model.safetensors").is_file()
    fresh = tmp_path / "a" / "b"
    _export(qlora_run, fresh)
    assert (fresh / "adapter_config.json").is_file()
    assert not _leftovers(out_dir) and not _leftovers(fresh)


def test_symlink_is_refused_without_force_and_written_through_with_it(qlora_run, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UserError, match="symbolic link"):
        _export(qlora_run, link)
    _export(qlora_run, link, force=True)
    assert link.is_symlink() and (real / "adapter_model.safetensors").is_file()
    assert (real / "keep.txt").read_text() == "keep"


def test_force_never_overwrites_a_file_it_did_not_write(qlora_run, out_dir):
    out_dir.mkdir()
    (out_dir / "adapter_config.json").write_text("the user's own file")
    (out_dir / "other.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="did not write"):
        _export(qlora_run, out_dir, force=True)
    assert (out_dir / "adapter_config.json").read_text() == "the user's own file"
    assert sorted(p.name for p in out_dir.iterdir()) == ["adapter_config.json", "other.bin"]
    assert not _leftovers(out_dir)


def test_force_replaces_its_own_earlier_export_and_keeps_the_rest(qlora_run, out_dir):
    _export(qlora_run, out_dir)
    (out_dir / "README.md").write_text("written by the user after the export")
    before = (out_dir / "adapter_model.safetensors").stat().st_mtime_ns
    _export(qlora_run, out_dir, force=True)
    assert (out_dir / "README.md").read_text() == "written by the user after the export"
    assert (out_dir / "adapter_model.safetensors").stat().st_mtime_ns >= before


def test_too_little_free_space_is_refused_before_writing(qlora_run, out_dir, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match=r"not enough disk space.*needs about"):
        _export(qlora_run, out_dir, format="merged")
    assert not out_dir.exists() and not _leftovers(out_dir)


def test_disk_full_while_writing_removes_partial_output(qlora_run, out_dir, monkeypatch):
    from ft_desk.trainer.export import safetensors_io

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_io.ShardWriter, "write", full)
    with pytest.raises(UserError, match=r"not enough disk space.*needs about .*partial output was removed"):
        _export(qlora_run, out_dir, format="merged")
    assert not out_dir.exists() and not _leftovers(out_dir)


def test_disk_full_in_a_library_that_wraps_the_error_is_still_disk_full(qlora_run, out_dir, monkeypatch):
    """safetensors (and other Rust/C writers) raise their own error type with the OS words inside."""
    from ft_desk.trainer.export import safetensors_io

    def full(self, name, tensor):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors_io.ShardWriter, "write", full)
    with pytest.raises(UserError, match=r"not enough disk space.*needs about .*partial output was removed"):
        _export(qlora_run, out_dir, format="merged")
    assert not out_dir.exists() and not _leftovers(out_dir)


def test_disk_full_in_the_reload_check_child_is_disk_full(qlora_run, out_dir, monkeypatch):
    import subprocess

    from ft_desk.trainer.export import verify

    def child_ran_out_of_space(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\nOSError: [Errno 28] No space left on device")

    monkeypatch.setattr(verify.subprocess, "run", child_ran_out_of_space)
    with pytest.raises(UserError, match=r"not enough disk space.*partial output was removed"):
        export_run(ExportRequest(run_dir=qlora_run.run_dir, format="adapter", out=out_dir, verify=True), ListSink())
    assert not out_dir.exists() and not _leftovers(out_dir)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 128 KiB tmpfs (root only): too small for a merged export of the test model (about 400 KB)."""
    import os
    import shutil
    import subprocess

    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount")):
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_really_full_disk_during_an_export_keeps_the_users_files_and_cleans_up(qlora_run, tiny_tmpfs,
                                                                                 monkeypatch):
    """The space check passes (another program freed space, then took it back): the kernel's ENOSPC mid-write
    is reported with the space needed, the folder the user named keeps exactly what it had."""
    import shutil
    import subprocess
    from collections import namedtuple

    from ft_desk.trainer.export import safety

    out = tiny_tmpfs / "export"
    out.mkdir()
    (out / "mine.txt").write_text("the user's file")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    with pytest.raises(UserError, match=r"not enough disk space.*needs about .*partial output was removed"):
        _export(qlora_run, out, format="merged", force=True)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "the user's file"
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["export"]  # no partial or work folder left
    monkeypatch.undo()
    subprocess.run(["mount", "-o", "remount,size=128m", str(tiny_tmpfs)], check=True)
    _export(qlora_run, out, format="merged", force=True)  # room again: it works
    assert (out / "mine.txt").read_text() == "the user's file" and (out / "config.json").is_file()
    assert shutil.disk_usage(tiny_tmpfs).used > 128 << 10


def test_the_next_export_sweeps_what_a_killed_export_of_the_same_folder_left(qlora_run, out_dir):
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    killed = [out_dir.parent / f".{out_dir.name}.partial-1a2b3c4d", out_dir.parent / f".{out_dir.name}.work-5e6f7a8b"]
    for folder in killed:  # what a SIGKILLed export leaves: its hidden staging folders, half written
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    other = out_dir.parent / ".someone-else.partial-1a2b3c4d"  # another folder's staging: not ours to touch
    other.mkdir()
    mine = out_dir.parent / f".{out_dir.name}.partial-notes"  # not a staging name: kept
    mine.mkdir()
    _export(qlora_run, out_dir)
    assert (out_dir / "adapter_model.safetensors").is_file()
    assert not any(folder.exists() for folder in killed)
    assert other.is_dir() and mine.is_dir()
