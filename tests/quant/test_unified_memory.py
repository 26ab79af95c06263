"""An Apple Silicon Mac's unified memory in the planner, with injected device facts: what the GPU may use (the
recommended working set, torch's high-watermark limit) next to what macOS and other apps hold, the verdict it
gives, the Mac hardware preset, and the doctor's probe line."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ft_desk.quant.device import (
    DeviceFacts,
    DeviceReport,
    FourBitCheck,
    advice_for,
    mps_high_watermark_ratio,
    unified_budget,
)
from ft_desk.quant.planner import device_budget
from ft_desk.trainer.cli.doctor import render
from ft_desk.trainer.planning import device_from_report, plan_run
from ft_desk.trainer.presets import load_config

GIB = 1024**3
MAC_16GB = DeviceFacts("mps", "Apple M2 GPU", total_memory=int(10.67 * GIB), free_memory=12 * GIB, bf16=True,
                       unified_memory=16 * GIB, high_watermark_ratio=1.7)
MISTRAL_7B = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def test_the_budget_is_the_recommended_working_set_when_the_mac_has_room():
    budget = unified_budget(MAC_16GB)
    assert budget.budget == MAC_16GB.total_memory and budget.limited_by == "recommended working set"
    assert budget.hard_limit == int(1.7 * MAC_16GB.total_memory)  # above the RAM: torch would not stop first
    assert budget.others == 4 * GIB
    assert budget.describe() == ("the GPU may use 10.7 GiB of this Mac's 16 GiB unified memory (Metal recommends "
                                 "at most 10.7 GiB; torch stops at 18.1 GiB; macOS and other apps hold 4.0 GiB "
                                 "now)")


def test_open_apps_and_a_lower_watermark_shrink_the_budget():
    busy = replace(MAC_16GB, free_memory=7 * GIB)  # a browser and an IDE hold 9 GiB
    assert unified_budget(busy).budget == 7 * GIB and unified_budget(busy).limited_by == "free RAM"
    capped = replace(MAC_16GB, high_watermark_ratio=0.5)
    assert unified_budget(capped).budget == int(0.5 * MAC_16GB.total_memory)
    assert unified_budget(capped).limited_by == "torch's limit"
    unlimited = replace(MAC_16GB, high_watermark_ratio=0.0)
    assert unified_budget(unlimited).hard_limit is None
    assert "torch's limit is off" in unified_budget(unlimited).describe()
    assert device_budget(busy) == 7 * GIB


def test_cuda_and_cpu_budgets_are_unchanged():
    cuda = DeviceFacts("cuda", "RTX 3090", total_memory=24 * GIB, free_memory=20 * GIB, bf16=True)
    cpu = DeviceFacts("cpu", "CPU", total_memory=32 * GIB, free_memory=30 * GIB)
    assert (device_budget(cuda), device_budget(cpu)) == (20 * GIB, 30 * GIB)
    assert unified_budget(cuda) is None and unified_budget(cpu) is None
    # An MPS device known only by its working set (older doctor reports) is judged against that, as before.
    assert device_budget(DeviceFacts("mps", total_memory=10 * GIB)) == 10 * GIB


@pytest.mark.parametrize("value, expected", [(None, 1.7), ("0.0", 0.0), ("1.2", 1.2), ("lots", 1.7), ("-1", 1.7)])
def test_the_watermark_ratio_is_read_like_torch_reads_it(value, expected):
    environ = {} if value is None else {"PYTORCH_MPS_HIGH_WATERMARK_RATIO": value}
    assert mps_high_watermark_ratio(environ) == expected


def test_mac_preset_fits_qlora_of_a_7b_model_where_16bit_lora_does_not():
    qlora = plan_run(MISTRAL_7B, load_config(["qlora", "mac-16gb"], ["model.name=m"]), MAC_16GB)
    lora = plan_run(MISTRAL_7B, load_config(["lora", "mac-16gb"], ["model.name=m"]), MAC_16GB)
    assert (qlora.method, qlora.device, qlora.compute_dtype) == ("qlora", "mps", "bfloat16")
    assert qlora.verdict == "fits" and 5 * GIB < qlora.total_bytes < 7 * GIB
    assert lora.verdict == "does not fit" and lora.total_bytes > 14 * GIB
    assert lora.first_fit is not None and lora.first_fit.overrides == ("train.method=qlora",)
    # On unified memory the Python process counts against the same RAM, and the plan shows the budget's reasons.
    assert qlora.component("framework overhead") > 0
    assert any(n.startswith("the GPU may use 10.7 GiB") for n in qlora.notes)
    assert not any("does not run QLoRA" in n for n in qlora.notes)


def test_a_busy_mac_is_told_it_does_not_fit_with_its_free_memory_named():
    busy = replace(MAC_16GB, free_memory=5 * GIB)
    plan = plan_run(MISTRAL_7B, load_config(["qlora", "mac-16gb"], ["model.name=m"]), busy)
    assert plan.verdict == "does not fit" and plan.device_budget_bytes == 5 * GIB
    assert any("macOS and other apps hold 11.0 GiB now" in n for n in plan.notes)


def test_doctor_facts_of_a_mac_come_back_whole_for_the_app():
    report = {"facts": {"type": "mps", "name": "Apple M2 GPU", "total_memory": MAC_16GB.total_memory,
                        "free_memory": 12 * GIB, "compute_capability": None, "bf16": True,
                        "unified_memory": 16 * GIB, "high_watermark_ratio": 1.7}}
    assert device_from_report(report) == MAC_16GB


def _mac_report(probe: dict | None, usable: bool) -> DeviceReport:
    return DeviceReport(os="Darwin 24.1", python="3.11", packages={"torch": "2.13.0", "bitsandbytes": "0.50.2"},
                        device="mps", facts=MAC_16GB, compute_dtype="bfloat16", torch_cuda=None,
                        mps={"built": True, "available": True, "recommended_max_memory": MAC_16GB.total_memory,
                             "unified_memory": 16 * GIB, "bf16": True},
                        cpu={"name": "Apple M2", "arch": "arm64", "logical_cores": 8, "physical_cores": 8,
                             "torch_threads": 8, "ram_total": 16 * GIB, "ram_available": 12 * GIB, "arm_bf16": True,
                             "bf16": True},
                        four_bit=FourBitCheck(usable, "" if usable else "in float16, the forward pass was 40.0% off",
                                              "0.50.2", "mps", False),
                        four_bit_probe=probe)


def test_doctor_shows_the_probe_line_and_the_unified_budget():
    probe = {"device": "mps", "version": "0.50.2", "kernels": "pytorch", "error": "", "results": [
        {"dtype": "bfloat16", "ok": True, "reason": "", "quant_error": 0.093, "forward_error": 0.0025,
         "backward_error": 0.0026, "seconds": 0.012, "cpu_fallbacks": []},
        {"dtype": "float16", "ok": True, "reason": "", "quant_error": 0.093, "forward_error": 0.0003,
         "backward_error": 0.0003, "seconds": 0.011, "cpu_fallbacks": ["aten::isin"]}]}
    report = _mac_report(probe, usable=True)
    report.advice = advice_for(report)
    data = report.to_dict()
    data["export"] = {}
    text = render(data)
    line = next(x for x in text.splitlines() if x.strip().startswith("4-bit probe"))
    assert line.split("4-bit probe", 1)[1].strip() == (
        "mps: bfloat16 ok (forward 0.25%, backward 0.26%, 12 ms off the dequantized matmul) · float16 ok (forward "
        "0.03%, backward 0.03%, 11 ms off the dequantized matmul) · bitsandbytes' pure-PyTorch MPS fallbacks · ran "
        "on the CPU instead: aten::isin")
    assert "- Apple GPU: the GPU may use 10.7 GiB of this Mac's 16 GiB unified memory" in text
    assert "QLoRA runs on this GPU in bfloat16 through bitsandbytes' pure-PyTorch MPS code" in text
    assert "aten::isin ran on the CPU instead of the GPU during the 4-bit probe" in text


def test_doctor_on_a_mac_whose_probe_fails_offers_lora():
    report = _mac_report(None, usable=False)
    advice = " ".join(advice_for(report))
    assert "4-bit QLoRA is not available on mps: in float16, the forward pass was 40.0% off" in advice
    assert "--preset lora" in advice


def test_no_probe_line_off_a_mac():
    report = replace(_mac_report(None, usable=True), device="cpu", mps=None)
    data = report.to_dict()
    data["export"] = {}
    assert "4-bit probe" not in render(data)


def test_doctor_on_a_mac_runs_the_4bit_probe_and_takes_its_dtype(monkeypatch):
    from ft_desk.quant import device as dev
    from ft_desk.quant.mps_probe import DtypeProbe, FourBitProbe

    asked = []

    def fake_probe(device, dtypes, quant_type="nf4", double_quant=True):
        asked.append((device, dtypes))
        return FourBitProbe("mps", (DtypeProbe("bfloat16", False, "the forward pass was 40.0% off"),
                                    DtypeProbe("float16", True, "", 0.09, 0.0003, 0.0003, 0.01)), "0.50.2", "pytorch")

    def no_dense_check(*args, **kwargs):
        raise AssertionError("on a Mac the probe replaces the dense-weights check")

    monkeypatch.setattr(dev, "available_device_types", lambda: ["mps", "cpu"])
    monkeypatch.setattr(dev, "probe_facts", lambda device: MAC_16GB)
    monkeypatch.setattr(dev, "cached_probe", fake_probe)
    monkeypatch.setattr(dev, "check_four_bit", no_dense_check)
    report = dev.probe()
    assert asked == [("mps", ("bfloat16", "float16"))]
    assert report.device == "mps" and report.compute_dtype == "float16"  # bf16 failed the 4-bit probe
    assert report.four_bit.usable and report.four_bit_probe["results"][0]["ok"] is False
    assert any(a.startswith("QLoRA runs on this GPU in float16") for a in report.advice)
