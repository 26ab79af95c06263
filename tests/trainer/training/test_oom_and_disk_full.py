"""Out of memory and a full disk during a run, injected where a real device or disk would fail: the micro-batch
is halved with the effective batch kept, and a disk-full checkpoint leaves the previous one intact, the run marked
failed with the space it needs, and a resume that works once there is room."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ft_desk.trainer import run_folder
from ft_desk.trainer.data.batching import MicroBatch
from ft_desk.trainer.events import ListSink
from ft_desk.trainer.presets import load_config
from ft_desk.trainer.training import checkpoint as ckpt
from ft_desk.trainer.training import loop, replan
from ft_desk.trainer.training import run as run_mod
from tests.trainer.training.helpers import StopAtStep


def _cfg(model_dir, home, name, *overrides):
    return load_config(["demo"], [f"model.name={model_dir}", "train.device=cpu", "train.threads=1",
                                  "train.max_steps=4", "output.save_every=2", "eval.every_steps=0",
                                  "eval.sample_prompts=0", "data.max_length=128", f"output.runs_dir={home}",
                                  f"output.run_name={name}", *overrides])


class SmallDevice:
    """collate() on a device that holds `room()` rows per forward pass: more raises CUDA's out-of-memory error."""

    def __init__(self, monkeypatch, room) -> None:
        self.room, self.real, self.widest = room, loop.collate, 0
        monkeypatch.setattr(loop, "collate", self)

    def __call__(self, examples, mb, pad_id, device, packing):
        import torch

        if len(mb.rows) > self.room():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 3.00 GiB total)")
        self.widest = max(self.widest, len(mb.rows))
        return self.real(examples, mb, pad_id, device, packing)


# ------------------------------------------------------------------ the split itself

def _batch(rows):
    return MicroBatch(rows=tuple(tuple(r) for r in rows), tokens=0, target_tokens=0)


def test_a_split_keeps_every_optimizer_step_on_the_same_examples():
    from types import SimpleNamespace

    examples = [SimpleNamespace(input_ids=[1] * (3 + i), labels=[-100] + [1] * (2 + i)) for i in range(40)]
    plan = [_batch([[0, 1], [2], [3, 4], [5]]), _batch([[6], [7], [8]]), _batch([[9]])]
    for split in (2, 4, 8):
        pieces = replan.split_batches(examples, plan, split)
        assert len(pieces) == split * len(plan)  # positions stay `split` apart: micro_index scales exactly
        for k, mb in enumerate(plan):
            mine = pieces[k * split:(k + 1) * split]
            assert tuple(row for p in mine for row in p.rows) == mb.rows  # same rows, same order
            assert max(len(p.rows) for p in mine) == -(-len(mb.rows) // split)
            tokens = sum(len(examples[i].input_ids) for row in mb.rows for i in row)
            assert sum(p.tokens for p in mine) == tokens
            assert sum(p.target_tokens for p in mine) == sum(len(examples[i].labels) - 1
                                                             for row in mb.rows for i in row)


def test_every_allocator_wording_counts_as_out_of_memory():
    import torch

    from ft_desk.trainer.errors import UserError

    assert replan.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert replan.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"))
    assert replan.is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 68719476736 bytes"))
    assert replan.is_out_of_memory(MemoryError())
    assert not replan.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not replan.is_out_of_memory(UserError("data.max_length is more than fits in memory"))


# ------------------------------------------------------------------ out of memory in a run

def _step_events(sink):
    return {e["step"]: e for e in sink.of_type("step")}


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tiny_model_dir, tmp_path, one_thread,
                                                                            monkeypatch):
    straight_sink = ListSink()
    code, _ = run_mod.train(_cfg(tiny_model_dir, tmp_path, "roomy"), straight_sink)
    assert code == 0

    device = SmallDevice(monkeypatch, lambda: 2)
    sink = ListSink()
    code, run_dir = run_mod.train(_cfg(tiny_model_dir, tmp_path, "small"), sink)
    assert code == 0, sink.of_type("run_finished")[-1]
    replans = sink.of_type("batch_replanned")
    assert [(e["previous_micro_batch_size"], e["previous_grad_accum"], e["micro_batch_size"], e["grad_accum"])
            for e in replans] == [(8, 1, 4, 2), (4, 2, 2, 4)]
    assert replans[0]["step"] == 1 and replans[0]["resumed_from_step"] == 0
    assert replans[0]["error"].startswith("CUDA out of memory")
    assert "continuing from the start of step 1" in replans[0]["message"]
    warnings = [e["message"] for e in sink.of_type("log") if e["level"] == "warning"]
    assert any("micro-batch 8 -> 4, accumulation 1 -> 2 (effective batch unchanged)" in w for w in warnings)
    assert device.widest == 2
    state = run_folder.read_state(run_dir)
    assert (state["status"], state["batch_split"], state["micro_batch_size"], state["grad_accum"]) == \
        ("completed", 4, 2, 4)
    # The same examples in every optimizer step: the same token counts, and the same losses up to rounding.
    straight, small = _step_events(straight_sink), _step_events(sink)
    assert sorted(small) == sorted(straight) == [1, 2, 3, 4]
    for step in straight:
        assert small[step]["tokens"] == straight[step]["tokens"]
        assert small[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-4)


def test_out_of_memory_after_a_checkpoint_continues_from_it_and_a_resume_keeps_the_smaller_batch(
        tiny_model_dir, tmp_path, one_thread, monkeypatch):
    home = tmp_path / "runs"
    SmallDevice(monkeypatch, lambda: 4 if list(home.glob("*/checkpoints/step-*")) else 99)
    sink = ListSink()
    code, run_dir = run_mod.train(_cfg(tiny_model_dir, home, "shrinks", "train.max_steps=6"), sink,
                                  stop=StopAtStep(4))
    assert code == 3, sink.of_type("run_finished")[-1]
    (replanned,) = sink.of_type("batch_replanned")
    assert (replanned["step"], replanned["resumed_from_step"]) == (3, 2)
    assert "continuing from the checkpoint at step 2" in replanned["message"]
    assert [e["step"] for e in sink.of_type("step")] == [1, 2, 3, 4]
    assert run_folder.read_state(run_dir)["batch_split"] == 2

    monkeypatch.undo()
    watch = SmallDevice(monkeypatch, lambda: 99)
    sink = ListSink()
    code, _ = run_mod.train(None, sink, resume_dir=run_dir)
    assert code == 0
    assert watch.widest == 4  # the resumed run kept the halved micro-batch
    assert any("training with micro-batches of 4 and accumulation 2" in e["message"] for e in sink.of_type("log"))
    assert [e["step"] for e in sink.of_type("step")] == [5, 6]


# ------------------------------------------------------------------ disk full

class FullDisk:
    """The disk fills up while the second checkpoint is written: safetensors fails the way it does on ENOSPC, and
    from then on state.json cannot be written while the run's space reserve still takes the last blocks."""

    def __init__(self, monkeypatch, home: Path) -> None:
        import safetensors.torch

        self.home, self.full = home, False
        real_save = safetensors.torch.save_file
        real_write = run_folder.write_json

        def save_file(tensors, filename, metadata=None):
            if self.full or list(home.glob("*/checkpoints/step-*")):
                self.full = True
                raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real_save(tensors, filename, metadata=metadata)

        def write_json(path, data, **kw):
            if self.full and any(home.glob(f"*/{run_folder.RESERVE}")):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(path, data, **kw)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
        monkeypatch.setattr(run_folder, "write_json", write_json)


def _assert_failed_on_full_disk(run_dir, sink):
    finished = sink.of_type("run_finished")[-1]
    assert finished["exit_code"] == 1 and finished["status"] == "failed"
    state = run_folder.read_state(run_dir)
    assert state["status"] == "failed" and state["error"] == finished["error"]  # not left "running"
    assert [p.name for p in run_folder.checkpoint_folders(run_dir)] == ["step-000002"]
    assert ckpt.check_checkpoint(run_folder.step_folder(run_dir, 2), run_mod.load_run_config(run_dir)) is None
    assert not list(run_folder.checkpoints_dir(run_dir).glob(".tmp-*"))  # its own partial files are gone
    assert not (run_dir / run_folder.RESERVE).exists()
    return finished


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_says_how_much_is_needed(
        tiny_model_dir, tmp_path, one_thread, monkeypatch):
    home = tmp_path / "runs"
    disk = FullDisk(monkeypatch, home)
    sink = ListSink()
    code, run_dir = run_mod.train(_cfg(tiny_model_dir, home, "full"), sink)
    assert code == 1
    finished = _assert_failed_on_full_disk(run_dir, sink)
    assert finished["error"].startswith("the disk is full: the checkpoint at step 4 needs about ")
    assert "its partial files were removed and the checkpoint at step 2 is intact" in finished["error"]
    assert finished["hint"].endswith(f"then resume with: ft-desk train --resume {run_dir}")
    assert "Traceback" not in finished["error"] and "SafetensorError" not in finished["error"]
    assert disk.full

    monkeypatch.undo()  # space was freed
    sink = ListSink()
    code, _ = run_mod.train(None, sink, resume_dir=run_dir)
    assert code == 0
    assert sink.of_type("run_started")[0]["resumed_from_step"] == 2
    assert run_folder.read_state(run_dir)["status"] == "completed"


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real tmpfs of its own (root only); `resize(bytes)` changes its size while files are open in it."""
    if not _can_mount():
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")

    def resize(size: int) -> None:
        size = -(-size // 4096) * 4096
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True, capture_output=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


class ShrinkAfterFirstCheckpoint:
    """A sink that, once the first checkpoint is written, shrinks the file system to what is used now: the disk
    is then really full (every later write of the run gets ENOSPC from the kernel)."""

    def __init__(self, mnt: Path, resize) -> None:
        self.mnt, self.resize, self.done = mnt, resize, False

    def emit(self, event):
        if event["type"] == "checkpoint" and not self.done:
            self.done = True
            self.resize(shutil.disk_usage(self.mnt).used + 4096)

    def close(self):
        pass


def test_a_really_full_file_system_fails_the_run_cleanly_and_resume_works_once_there_is_room(
        tiny_model_dir, small_tmpfs, one_thread):
    mnt, resize = small_tmpfs
    sink = ListSink()
    from ft_desk.trainer.events import FanOut

    code, run_dir = run_mod.train(_cfg(tiny_model_dir, mnt, "tmpfs"), FanOut(sink, ShrinkAfterFirstCheckpoint(
        mnt, resize)))
    assert code == 1
    finished = _assert_failed_on_full_disk(run_dir, sink)
    assert finished["error"].startswith("the disk is full")
    assert "needs about" in finished["error"] and "intact" in finished["error"]
    events = run_folder.events_path(run_dir).read_text(encoding="utf-8")
    assert events.rstrip().endswith("}") and '"run_finished"' in events.splitlines()[-1]

    resize(64 << 20)
    sink = ListSink()
    code, _ = run_mod.train(None, sink, resume_dir=run_dir)
    assert code == 0, sink.of_type("run_finished")[-1]
    assert sink.of_type("run_started")[0]["resumed_from_step"] == 2


def test_the_last_state_write_gives_up_the_reserve_or_rewrites_in_place_and_never_raises(tmp_path, monkeypatch):
    run_folder.write_state(tmp_path, {"status": "running", "pid": 1, "note": "x" * 200})
    run_folder.reserve_space(tmp_path)
    assert (tmp_path / run_folder.RESERVE).stat().st_size == run_folder.RESERVE_BYTES
    real = run_folder.write_json
    reserve = tmp_path / run_folder.RESERVE

    def full_until_reserve_freed(path, data, **kw):
        if reserve.exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, **kw)

    monkeypatch.setattr(run_folder, "write_json", full_until_reserve_freed)
    assert run_folder.settle_state(tmp_path, status="failed", error="the disk is full")
    assert run_folder.read_state(tmp_path)["status"] == "failed" and not reserve.exists()

    def always_full(path, data, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_folder, "write_json", always_full)
    assert run_folder.settle_state(tmp_path, status="stopped", note="")  # fits in the old file's bytes
    assert run_folder.read_state(tmp_path)["status"] == "stopped"
    assert not run_folder.settle_state(tmp_path, status="failed", note="y" * 5000)  # cannot fit: says so, no raise
    assert run_folder.read_state(tmp_path)["status"] == "stopped"


def test_a_disk_too_full_to_start_a_run_says_so_and_leaves_no_folder(tiny_model_dir, tmp_path, monkeypatch):
    from ft_desk.trainer.errors import DiskFull

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_mod, "write_text", full)
    with pytest.raises(DiskFull, match=r"is full: a new run cannot even write its settings"):
        run_mod.train(_cfg(tiny_model_dir, tmp_path / "runs", "never"), ListSink())
    assert list((tmp_path / "runs").iterdir()) == []
