"""A whole run in-process: setup -> fit -> finish leaves a complete run folder, and a failure - an out-of-memory
error above all - ends with the sentence and hint the user is shown, the trace in run.log."""

from __future__ import annotations

import pytest

from ft_desk.trainer import run_folder
from ft_desk.trainer.events import ListSink, read_events
from ft_desk.trainer.presets import load_config
from ft_desk.trainer.training import run as run_mod

OOM_ERROR = "the device ran out of memory"
OOM_HINT = ("lower train.micro_batch_size (raise train.grad_accum to keep the batch), lower data.max_length, "
            "or turn on train.gradient_checkpointing; `ft-desk plan` shows what fits")


def _cfg(tiny_model_dir, tmp_path, *overrides):
    return load_config(["demo"], [f"model.name={tiny_model_dir}", "train.device=cpu", "train.threads=1",
                                  "train.max_steps=4", "eval.every_steps=2", "eval.sample_prompts=1",
                                  "eval.max_new_tokens=4", f"output.runs_dir={tmp_path}", *overrides])


def test_a_finished_run_leaves_its_final_weights_state_and_samples(tiny_model_dir, tmp_path, one_thread,
                                                                   monkeypatch):
    capped = []
    monkeypatch.setattr(run_mod, "cap_cpu_allocator", lambda: capped.append(True) or True)
    sink = ListSink()
    code, run_dir = run_mod.train(_cfg(tiny_model_dir, tmp_path, "output.run_name=done"), sink)
    assert code == 0, run_folder.log_path(run_dir).read_text()[-2000:]
    assert capped == [True]  # a CPU run pins glibc's mmap threshold once, as the planner assumes
    state = run_folder.read_state(run_dir)
    assert state["status"] == "completed" and state["step"] == 4 and state["exit_code"] == 0
    assert run_folder.checkpoint_folder(run_dir, "best") == run_dir / "adapter"
    assert (run_dir / "adapter" / run_folder.ADAPTER_WEIGHTS).is_file()
    assert not list(run_dir.glob(".tmp-*"))  # the staging folder was renamed into place
    assert run_folder.val_path(run_dir).is_file()
    phases = [e["phase"] for e in sink.of_type("sample")]
    assert phases == ["before", "after"]
    on_disk = [e["type"] for e in read_events(run_folder.events_path(run_dir))]
    assert on_disk == [e["type"] for e in sink.events] and on_disk[-1] == "run_finished"


def _oom_errors():
    import torch

    return [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB)"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                     "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"),
    ]


@pytest.mark.parametrize("which", range(3), ids=["cuda", "mps", "cpu"])
def test_out_of_memory_at_every_micro_batch_stops_naming_the_next_setting(which, tiny_model_dir, tmp_path,
                                                                         one_thread, monkeypatch):
    """Every allocator's wording is recognised; the micro-batch is halved down to one row (8 -> 4 -> 2 -> 1, the
    accumulation doubled each time), and then the run stops with the next lever and the planner's estimate."""
    error = _oom_errors()[which]

    def fit_that_runs_out_of_memory(ctx, state):
        raise error

    monkeypatch.setattr(run_mod, "fit", fit_that_runs_out_of_memory)
    sink = ListSink()
    code, run_dir = run_mod.train(_cfg(tiny_model_dir, tmp_path, f"output.run_name=oom-{which}"), sink)
    replans = sink.of_type("batch_replanned")
    assert [(e["micro_batch_size"], e["grad_accum"]) for e in replans] == [(4, 2), (2, 4), (1, 8)]
    finished = sink.of_type("run_finished")[-1]
    assert (code, finished["status"]) == (1, "failed")
    assert finished["error"].startswith("the device ran out of memory even with train.micro_batch_size=1 (cut from "
                                        "8, with train.grad_accum raised to 8); the planner estimates a peak of ")
    assert finished["hint"].startswith("next: turn on gradient checkpointing (--set train.gradient_checkpointing=true)")
    assert "data.max_length=128" in finished["hint"] and "smaller model" in finished["hint"]
    state = run_folder.read_state(run_dir)
    assert (state["status"], state["error"], state["hint"]) == ("failed", finished["error"], finished["hint"])
    assert (state["batch_split"], state["micro_batch_size"], state["grad_accum"]) == (8, 1, 8)
    assert "fit_that_runs_out_of_memory" in run_folder.log_path(run_dir).read_text(encoding="utf-8")


def test_other_failures_keep_their_own_sentence():
    from ft_desk.trainer.errors import OutOfMemory, UserError

    assert run_mod.as_out_of_memory(RuntimeError("shape mismatch")) is None
    assert run_mod.as_out_of_memory(UserError("data.max_length must fit in memory")) is None
    oom = run_mod.as_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert isinstance(oom, OutOfMemory) and (oom.message, oom.hint) == (OOM_ERROR, OOM_HINT)
    bug = run_mod.failure_outcome(RuntimeError("shape mismatch"))
    assert (bug["exit_code"], bug["error"]) == (1, "internal error: RuntimeError: shape mismatch")
    bad = run_mod.failure_outcome(UserError("no data", hint="add some"))
    assert (bad["exit_code"], bad["error"], bad["hint"]) == (2, "no data", "add some")


def test_an_auto_recipe_is_sized_from_the_data_said_before_step_one_and_saved_for_resume(tiny_model_dir, tmp_path,
                                                                                      one_thread):
    cfg = _cfg(tiny_model_dir, tmp_path, "output.run_name=sized", "train.micro_batch_size=auto",
               "train.grad_accum=auto", "data.max_length=auto")
    sink = ListSink()
    code, run_dir = run_mod.train(cfg, sink)
    assert code == 0, run_folder.log_path(run_dir).read_text()[-2000:]
    saved = run_mod.load_run_config(run_dir)
    assert all(isinstance(v, int) for v in (saved.train.micro_batch_size, saved.train.grad_accum,
                                            saved.train.row_length, saved.data.max_length))
    recipe = run_folder.read_state(run_dir)["recipe"]
    assert (recipe["micro_batch_size"], recipe["grad_accum"], recipe["row_length"], recipe["max_length"]) == (
        saved.train.micro_batch_size, saved.train.grad_accum, saved.train.row_length, saved.data.max_length)
    # Rows follow the data; the truncation limit stays the model's context (the tiny model's 1024).
    assert saved.train.row_length < saved.data.max_length == 1024
    types = [e["type"] for e in sink.events]
    said = [i for i, e in enumerate(sink.events) if e["type"] == "log" and e["message"].startswith("recipe: ")]
    assert said and types.index("run_started") < said[0] < types.index("step")
    assert f"micro-batch {saved.train.micro_batch_size} x {saved.train.row_length} tokens" in sink.events[said[0]][
        "message"]


def test_a_plan_that_does_not_fit_gets_its_first_same_result_suggestion(tiny_model_dir, tmp_path, monkeypatch,
                                                                        one_thread):
    from ft_desk.quant.device import DeviceFacts
    from ft_desk.trainer.planning import plan_run

    cfg = _cfg(tiny_model_dir, tmp_path, "data.max_length=2048", "train.micro_batch_size=8",
               "train.grad_accum=1", "train.loss_chunk_tokens=2048")
    model_config = run_mod.read_model_config(tiny_model_dir)
    roomy = DeviceFacts(type="cpu", total_memory=2**40, free_memory=2**40)
    need = plan_run(model_config, cfg, roomy).total_bytes

    def tight(device):  # a device with a little less than the plan needs
        return DeviceFacts(type="cpu", total_memory=int(need * 0.97), free_memory=int(need * 0.97))

    monkeypatch.setattr(run_mod, "probe_facts", tight)
    changed, note = run_mod.fit_memory(cfg, model_config, "cpu")
    assert note.startswith("memory: the plan") and "same result" in note
    moved = {k for k in ("gradient_checkpointing", "micro_batch_size", "grad_accum", "loss_chunk_tokens")
             if getattr(changed.train, k) != getattr(cfg.train, k)}
    assert moved  # only settings that keep what training computes
    assert changed.train.micro_batch_size * changed.train.grad_accum == 8
    assert (changed.lora, changed.data, changed.optim) == (cfg.lora, cfg.data, cfg.optim)

    def hopeless(device):
        return DeviceFacts(type="cpu", total_memory=2**20, free_memory=2**20)

    monkeypatch.setattr(run_mod, "probe_facts", hopeless)
    kept, note = run_mod.fit_memory(cfg, model_config, "cpu")
    assert kept == cfg and "does not fit" in note
