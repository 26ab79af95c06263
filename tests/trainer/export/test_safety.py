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
