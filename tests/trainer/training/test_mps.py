"""The trainer's Apple GPU (MPS) decisions with injected device facts and probe results - no Mac needed: QLoRA's
compute dtype comes from the 4-bit probe, a failed probe is one sentence offering 16-bit LoRA with its plan, the
Mac stays awake while it trains, and MPS out-of-memory / watchdog / missing-op failures read as such."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ft_desk.quant.device import DeviceFacts
from ft_desk.quant.mps_probe import DtypeProbe, FourBitProbe
from ft_desk.trainer.errors import MPS_OOM_LEVER, UserError
from ft_desk.trainer.events import ListSink
from ft_desk.trainer.presets import load_config
from ft_desk.trainer.training import awake as awake_mod
from ft_desk.trainer.training import model as model_mod
from ft_desk.trainer.training import run as run_mod

GIB = 1024**3
MAC_16GB = DeviceFacts("mps", "Apple M2 GPU", total_memory=int(10.67 * GIB), free_memory=12 * GIB, bf16=True,
                       unified_memory=16 * GIB, high_watermark_ratio=1.7)
MISTRAL_7B = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def _probe(**ok: bool) -> FourBitProbe:
    results = tuple(DtypeProbe(d, passed, "" if passed else "the backward pass was 37.0% off the dequantized matmul",
                               0.09, 0.001, 0.001 if passed else 0.37, 0.02) for d, passed in ok.items())
    return FourBitProbe("mps", results, "0.50.2", "pytorch")


@pytest.fixture
def on_a_mac(monkeypatch):
    """probe_facts answers with a 16 GB Mac's facts; `probes` records what the 4-bit probe was asked."""
    probes: list[tuple] = []
    state = {"probe": _probe(bfloat16=True, float16=True), "facts": MAC_16GB}

    def fake_probe(device, dtypes, quant_type="nf4", double_quant=True):
        probes.append((device, dtypes, quant_type, double_quant))
        return state["probe"]

    monkeypatch.setattr(model_mod, "probe_facts", lambda device: state["facts"])
    monkeypatch.setattr(model_mod, "cached_probe", fake_probe)
    state["probes"] = probes
    return state


def _cfg(*overrides, presets=("qlora", "mac-16gb")):
    return load_config(list(presets), ["model.name=mistralai/Mistral-7B-v0.1", *overrides])


def test_qlora_on_a_mac_computes_in_bf16_when_the_probe_passes_it(on_a_mac):
    assert model_mod.run_dtypes(_cfg(), "mps") == ("bfloat16", "bfloat16")
    assert on_a_mac["probes"] == [("mps", ("bfloat16", "float16"), "nf4", True)]


def test_qlora_on_a_mac_falls_back_to_fp16_when_only_fp16_passes(on_a_mac):
    on_a_mac["probe"] = _probe(bfloat16=False, float16=True)
    assert model_mod.run_dtypes(_cfg(), "mps")[0] == "float16"


def test_a_mac_without_bf16_only_probes_fp16(on_a_mac):
    from dataclasses import replace

    on_a_mac["facts"] = replace(MAC_16GB, bf16=False)
    on_a_mac["probe"] = _probe(float16=True)
    assert model_mod.run_dtypes(_cfg(), "mps")[0] == "float16"
    assert on_a_mac["probes"][0][1] == ("float16",)


def test_a_failed_probe_says_why_and_offers_lora_with_its_plan(on_a_mac, tmp_path):
    on_a_mac["probe"] = _probe(bfloat16=False, float16=False)
    (tmp_path / "config.json").write_text(json.dumps(MISTRAL_7B), encoding="utf-8")
    with pytest.raises(UserError) as caught:
        model_mod.run_dtypes(_cfg(), "mps", model_dir=tmp_path)
    err = caught.value
    assert err.message == ("4-bit QLoRA does not work on this Mac's GPU: in bfloat16, the backward pass was 37.0% "
                           "off the dequantized matmul; in float16, the backward pass was 37.0% off the "
                           "dequantized matmul")
    # The 16-bit LoRA plan of this very model on this Mac: too big, and the hint says so with numbers.
    assert err.hint.startswith("train 16-bit LoRA instead with --preset lora: its plan for "
                               "mistralai/Mistral-7B-v0.1 is about 15.3 GiB at these settings (does not fit in "
                               "the 10.7 GiB this Mac gives the GPU)")


def test_a_failed_probe_without_the_model_config_still_points_to_the_plan(on_a_mac):
    on_a_mac["probe"] = FourBitProbe("mps", error="bitsandbytes 0.43.1 has no Apple GPU (MPS) backend; 0.48 or "
                                                  "newer has one (pip install -U bitsandbytes)")
    with pytest.raises(UserError) as caught:
        model_mod.run_dtypes(_cfg(), "mps")
    assert "has no Apple GPU (MPS) backend" in caught.value.message
    assert caught.value.hint == ("train 16-bit LoRA instead with --preset lora (ft-desk plan "
                                 "mistralai/Mistral-7B-v0.1 --preset lora shows what it needs)")


def test_a_requested_dtype_that_fails_names_the_one_that_works(on_a_mac):
    on_a_mac["probe"] = _probe(bfloat16=False)
    with pytest.raises(UserError) as caught:
        model_mod.run_dtypes(_cfg("quant.compute_dtype=bfloat16"), "mps")
    assert caught.value.message.startswith("4-bit QLoRA does not work in bfloat16 on this Mac's GPU")
    on_a_mac["probe"] = FourBitProbe("mps", _probe(bfloat16=False).results + _probe(float16=True).results)
    with pytest.raises(UserError) as caught:
        model_mod.run_dtypes(_cfg("quant.compute_dtype=bfloat16"), "mps")
    assert caught.value.hint == "use --set quant.compute_dtype=float16 (it passed the same test)"


def test_lora_and_other_devices_never_run_the_probe(on_a_mac, monkeypatch):
    assert model_mod.run_dtypes(_cfg(presets=("lora", "mac-16gb")), "mps") == ("bfloat16", "bfloat16")
    monkeypatch.setattr(model_mod, "probe_facts", lambda device: DeviceFacts("cuda", bf16=False))
    assert model_mod.run_dtypes(_cfg("train.device=cuda"), "cuda") == ("float16", "float16")
    assert on_a_mac["probes"] == []


# ------------------------------------------------------------------ keeping the Mac awake


class FakeProcess:
    def __init__(self, argv, **kwargs):
        self.argv, self.kwargs, self.pid, self.returncode = argv, kwargs, 4242, None

    def poll(self):
        return self.returncode

    def terminate(self):
        self.returncode = -15

    def wait(self, timeout=None):
        return self.returncode


def test_on_macos_caffeinate_watches_the_trainer_and_stops_with_it():
    started: list[FakeProcess] = []

    def spawn(argv, **kwargs):
        started.append(FakeProcess(argv, **kwargs))
        return started[-1]

    awake = awake_mod.keep_awake(pid=123, system=lambda: "Darwin", which=lambda name: f"/usr/bin/{name}",
                                 spawn=spawn)
    assert started[0].argv == ["/usr/bin/caffeinate", "-i", "-w", "123"]
    assert awake.active and "keeping this Mac awake" in awake.message
    awake.stop()
    assert started[0].returncode == -15 and not awake.active
    awake.stop()  # a second stop is harmless


def test_elsewhere_nothing_is_started():
    def spawn(argv, **kwargs):
        raise AssertionError("nothing may be started off macOS")

    for system in ("Linux", "Windows"):
        awake = awake_mod.keep_awake(system=lambda s=system: s, spawn=spawn)
        assert not awake.active and awake.message == ""
        awake.stop()


def test_a_mac_without_caffeinate_trains_anyway_and_is_told():
    awake = awake_mod.keep_awake(system=lambda: "Darwin", which=lambda name: None)
    assert not awake.active
    assert awake.message.startswith("caffeinate was not found, so this Mac may go to sleep during training")


def test_stop_ends_a_real_child_process():
    awake = awake_mod.keep_awake(system=lambda: "Darwin", which=lambda name: sys.executable,
                                 spawn=lambda argv, **kw: subprocess.Popen(
                                     [sys.executable, "-c", "import time; time.sleep(60)"], **kw))
    process = awake.process
    assert process.poll() is None
    awake.stop()
    assert process.poll() is not None


def test_a_training_run_on_macos_keeps_awake_until_it_ends(tiny_model_dir, tmp_path, monkeypatch):
    started: list[FakeProcess] = []
    stopped_before_finish: list[bool] = []

    def spawn(argv, **kwargs):
        started.append(FakeProcess(argv, **kwargs))
        return started[-1]

    def fake_keep_awake():
        return awake_mod.keep_awake(system=lambda: "Darwin", which=lambda name: "/usr/bin/caffeinate", spawn=spawn)

    def setup_that_fails(cfg, run_dir, sink, resumed):
        stopped_before_finish.append(started[0].returncode is None)  # awake while the run works
        raise UserError("no training examples are left after reading and cleaning the data")

    monkeypatch.setattr(run_mod, "keep_awake", fake_keep_awake)
    monkeypatch.setattr(run_mod, "setup", setup_that_fails)
    sink = ListSink()
    cfg = load_config(["demo"], [f"model.name={tiny_model_dir}", "train.device=cpu", f"output.runs_dir={tmp_path}"])
    code, _ = run_mod.train(cfg, sink)
    assert code == 2 and stopped_before_finish == [True]
    import os

    assert started[0].argv == ["/usr/bin/caffeinate", "-i", "-w", str(os.getpid())]
    assert started[0].returncode == -15  # stopped with the run, failed or not
    logs = [e["message"] for e in sink.of_type("log")]
    assert any(m.startswith("keeping this Mac awake while it trains") for m in logs)


# ------------------------------------------------------------------ readable MPS failures


MPS_OOM = ("MPS backend out of memory (MPS allocated: 9.10 GiB, other allocations: 1.20 GiB, max allowed: "
           "18.13 GiB). Tried to allocate 512.00 MiB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 "
           "to disable upper limit for memory allocations (may cause system failure).")


def test_an_mps_out_of_memory_says_its_numbers_and_the_next_lever():
    oom = run_mod.as_out_of_memory(RuntimeError(MPS_OOM))
    assert oom.message == ("the Apple GPU ran out of memory: the run held 9.10 GiB plus 1.20 GiB outside torch and "
                           "asked for 512.00 MiB more, over the 18.13 GiB torch lets it use")
    assert oom.hint == f"{run_mod.OOM_HINT}; {MPS_OOM_LEVER}"
    assert "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0" not in oom.message + oom.hint  # never advise freezing the Mac
    outcome = run_mod.failure_outcome(RuntimeError(MPS_OOM))
    assert (outcome["exit_code"], outcome["error"]) == (1, oom.message)


def test_macos_running_out_of_unified_memory_is_an_out_of_memory_too():
    text = ("Error: command buffer exited with error status.\n\tThe Metal Performance Shaders operations encoded "
            "on it may not have completed.\n\tError: Insufficient Memory "
            "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)")
    oom = run_mod.as_out_of_memory(RuntimeError(text))
    assert oom.message == ("macOS ran out of unified memory for the GPU's work (the rest of the system needed it "
                           "too)")


@pytest.mark.parametrize("code", ["Caused GPU Timeout Error (00000002:kIOAccelCommandBufferCallbackErrorTimeout)",
                                  "Impacting Interactivity (0000000e:kIOGPUCommandBufferCallbackErrorImpactingInt"
                                  "eractivity)"])
def test_the_gpu_watchdog_is_named_with_what_to_change(code):
    outcome = run_mod.failure_outcome(RuntimeError(f"Error: command buffer exited with error status.\n\t{code}"))
    assert outcome["exit_code"] == 1
    assert outcome["error"].startswith("macOS stopped the run's GPU work because one command ran too long")
    assert "train.micro_batch_size" in outcome["hint"] and "--resume" in outcome["hint"]


def test_an_op_the_apple_gpu_lacks_is_named():
    text = ("The operator 'aten::_fft_r2c' is not currently implemented for the MPS device. If you want this op "
            "to be added in priority during the prototype phase of this feature, please comment on ...")
    outcome = run_mod.failure_outcome(NotImplementedError(text))
    assert outcome["error"] == "aten::_fft_r2c is not implemented for the Apple GPU in this torch"
    assert "PYTORCH_ENABLE_MPS_FALLBACK=1" in outcome["hint"]


def test_cuda_and_cpu_failures_read_as_before():
    assert run_mod.as_out_of_memory(RuntimeError("CUDA error: out of memory")).message == \
        "the device ran out of memory"
    assert run_mod.failure_outcome(RuntimeError("shape mismatch"))["error"] == \
        "internal error: RuntimeError: shape mismatch"
