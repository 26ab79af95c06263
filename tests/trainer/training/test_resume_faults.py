"""Resuming a run whose folder is not as training left it: damaged checkpoints fall back to the newest good one
(and say which), a run trained with other settings, data or base model stops listing the differences, and a
completed run is left exactly as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from ft_desk.trainer import run_folder
from ft_desk.trainer.events import ListSink, read_events
from ft_desk.trainer.presets import load_config
from ft_desk.trainer.training import run as run_mod
from tests.trainer.training.helpers import StopAtStep

ROWS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
        for a in range(6) for b in range(6)]


def _cfg(model_dir, data, home, name, *overrides):
    return load_config(["demo"], [f"model.name={model_dir}", f"data.train_file={data}", "train.device=cpu",
                                  "train.threads=1", "train.max_steps=6", "output.save_every=2",
                                  "output.keep_last=3", "eval.every_steps=0", "eval.sample_prompts=0",
                                  "train.micro_batch_size=4", "data.max_length=64", f"output.runs_dir={home}",
                                  f"output.run_name={name}", *overrides])


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_model_dir):
    """A run stopped at step 4 of 6 with checkpoints at steps 2 and 4, on its own copy of the model and data."""
    import torch

    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("resume-faults")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    home = root / "runs"
    code, run_dir = run_mod.train(_cfg(model, data, home, "base"), ListSink(), stop=StopAtStep(4))
    torch.set_num_threads(threads)
    assert code == 3, run_folder.log_path(run_dir).read_text()[-3000:]
    assert [p.name for p in run_folder.checkpoint_folders(run_dir)] == ["step-000002", "step-000004"]
    return {"run_dir": run_dir, "model": model, "data": data, "root": root}


def _copy(stopped_run, tmp_path) -> Path:
    run_dir = tmp_path / "runs" / "copy"
    shutil.copytree(stopped_run["run_dir"], run_dir)
    return run_dir


def _resume(run_dir):
    sink = ListSink()
    code, _ = run_mod.train(None, sink, resume_dir=run_dir)
    return code, sink


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated-adapter": (lambda f: _truncate(f / "adapter_model.safetensors"),
                          "adapter_model.safetensors is truncated"),
    "garbage-trainer-state": (lambda f: (f / "trainer_state.json").write_text("{not json", encoding="utf-8"),
                              "trainer_state.json is not readable JSON"),
    "missing-trainer-state": (lambda f: (f / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "missing-optimizer": (lambda f: (f / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
    "garbage-rng": (lambda f: (f / "rng.safetensors").write_bytes(b"\x00garbage" * 9),
                    "rng.safetensors is"),
    "bit-flip-in-optimizer": (lambda f: _flip_last_byte(f / "optimizer.safetensors"),
                              "optimizer.safetensors has changed since it was written"),
}


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(damage, stopped_run, tmp_path,
                                                                                 one_thread):
    run_dir = _copy(stopped_run, tmp_path)
    spoil, reason = DAMAGE[damage]
    spoil(run_folder.step_folder(run_dir, 4))
    code, sink = _resume(run_dir)
    assert code == 0, sink.of_type("run_finished")[-1]
    rejected = sink.of_type("checkpoint_rejected")
    assert [e["step"] for e in rejected] == [4] and rejected[0]["reason"].startswith(reason)
    assert "resuming from step 2 instead" in rejected[0]["message"]
    assert any(reason in e["message"] for e in sink.of_type("log") if e["level"] == "warning")
    assert sink.of_type("run_started")[0]["resumed_from_step"] == 2
    assert [e["step"] for e in sink.of_type("step")] == [3, 4, 5, 6]
    assert run_folder.read_state(run_dir)["status"] == "completed"
    assert (run_dir / "adapter" / run_folder.ADAPTER_WEIGHTS).is_file()
    # The damaged folder was moved aside, then cleaned away once newer good checkpoints existed.
    assert not list(run_folder.checkpoints_dir(run_dir).glob(".damaged-*"))


def test_when_every_checkpoint_is_damaged_the_resume_stops_and_lists_them(stopped_run, tmp_path, one_thread):
    run_dir = _copy(stopped_run, tmp_path)
    _truncate(run_folder.step_folder(run_dir, 4) / "adapter_model.safetensors")
    (run_folder.step_folder(run_dir, 2) / "trainer_state.json").write_text("[]", encoding="utf-8")
    code, sink = _resume(run_dir)
    finished = sink.of_type("run_finished")[-1]
    assert code == 2 and finished["status"] == "failed"
    assert finished["error"].startswith(f"cannot resume {run_dir}: none of its 2 checkpoint(s) is usable "
                                        "(step-000004: adapter_model.safetensors is truncated")
    assert "step-000002: trainer_state.json does not hold a checkpoint's state" in finished["error"]
    assert not sink.of_type("step")  # never a silent fresh start
    state = run_folder.read_state(run_dir)
    assert state["status"] == "failed" and state["error"] == finished["error"]
    # Nothing was deleted: both are kept aside for whoever wants to look.
    assert len(list(run_folder.checkpoints_dir(run_dir).glob(".damaged-step-*"))) == 2


def _edit_config(run_dir: Path, section: str, key: str, value) -> None:
    path = run_folder.config_path(run_dir)
    config = json.loads(path.read_text())
    config[section][key] = value
    path.write_text(json.dumps(config))


def _perturb_model(model_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + torch.ones_like(tensors[name]) * 1e-3
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_a_changed_lora_rank_stops_the_resume_listing_the_difference(stopped_run, tmp_path, one_thread):
    run_dir = _copy(stopped_run, tmp_path)
    _edit_config(run_dir, "lora", "r", 8)
    events_before = run_folder.events_path(run_dir).read_bytes()
    code, sink = _resume(run_dir)
    finished = sink.of_type("run_finished")[-1]
    assert code == 2
    assert finished["error"] == (f"cannot resume {run_dir}: its checkpoint at step 4 was trained differently: "
                                 "lora.r was 16, now 8")
    assert "config.json" in finished["hint"]
    assert not sink.of_type("step")
    assert [p.name for p in run_folder.checkpoint_folders(run_dir)] == ["step-000002", "step-000004"]
    assert run_folder.events_path(run_dir).read_bytes().startswith(events_before)


def test_changed_data_or_base_model_stops_the_resume(stopped_run, tmp_path, one_thread):
    run_dir = _copy(stopped_run, tmp_path)
    data = tmp_path / "data.jsonl"
    shutil.copy(stopped_run["data"], data)
    model = tmp_path / "model"
    shutil.copytree(stopped_run["model"], model)
    _edit_config(run_dir, "data", "train_file", str(data))
    _edit_config(run_dir, "model", "name", str(model))
    with open(data, "a", encoding="utf-8") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "And 7 plus 7?"},
                                         {"role": "assistant", "content": "7 plus 7 is 14."}]}) + "\n")
    _perturb_model(model)
    code, sink = _resume(run_dir)
    error = sink.of_type("run_finished")[-1]["error"]
    assert code == 2
    assert f"data.train_file was '{stopped_run['data']}', now '{data}'" in error
    assert "the training or validation data changed" in error
    assert "the base model's files changed" in error
    assert not sink.of_type("step")


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resuming_a_completed_run_says_so_and_changes_nothing(stopped_run, tmp_path, one_thread):
    run_dir = _copy(stopped_run, tmp_path)
    code, _ = _resume(run_dir)
    assert code == 0 and run_folder.read_state(run_dir)["status"] == "completed"
    before = _snapshot(run_dir)
    code, sink = _resume(run_dir)
    assert code == 0
    assert [e["type"] for e in sink.events] == ["log", "run_finished"]
    assert sink.events[0]["message"].startswith("copy is already complete (6 steps, final weights in ")
    assert sink.events[1]["status"] == "completed" and sink.events[1]["final_step"] == 6
    assert _snapshot(run_dir) == before  # not one byte or timestamp: adapter, events, state, log
    assert [e["type"] for e in read_events(run_folder.events_path(run_dir))].count("run_finished") == 2


def test_a_garbage_config_json_is_one_sentence(stopped_run, tmp_path):
    from ft_desk.trainer.errors import UserError

    run_dir = _copy(stopped_run, tmp_path)
    run_folder.config_path(run_dir).write_text("\x00\x01 not json", encoding="utf-8")
    with pytest.raises(UserError, match=r"config.json is not a readable ft-desk config"):
        run_mod.train(None, ListSink(), resume_dir=run_dir)


def test_a_run_saved_before_row_length_existed_resumes_with_the_rows_it_started(stopped_run, tmp_path, one_thread):
    """Runs written before train.row_length packed rows to data.max_length: their config and checkpoint identity
    lack the key. The resume reads the old layout back (not the new data-sized rows) and is not refused."""
    run_dir = _copy(stopped_run, tmp_path)
    config = json.loads(run_folder.config_path(run_dir).read_text())
    del config["train"]["row_length"]
    run_folder.config_path(run_dir).write_text(json.dumps(config))
    for folder in run_folder.checkpoint_folders(run_dir):
        meta = json.loads((folder / "trainer_state.json").read_text())
        del meta["identity"]["config"]["train"]["row_length"]
        (folder / "trainer_state.json").write_text(json.dumps(meta))
    assert run_mod.load_run_config(run_dir).train.row_length == config["data"]["max_length"]
    code, sink = _resume(run_dir)
    assert code == 0, [e for e in sink.events if e["type"] in ("log", "run_finished")][-3:]
    assert any(e["type"] == "log" and e["message"] == "resuming from checkpoint step-000004" for e in sink.events)
