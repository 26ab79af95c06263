"""Device probe and the dtype/4-bit choices, on this CPU and with injected device facts."""

from __future__ import annotations

import json

import pytest

from ft_desk.quant import device as dev
from ft_desk.quant.device import DeviceFacts, FourBitCheck, choose_compute_dtype


@pytest.fixture(scope="module")
def report():
    return dev.probe()


def test_probe_describes_this_machine(report):
    import platform

    import psutil
    import torch

    assert report.packages["torch"] == torch.__version__
    assert report.python.startswith(platform.python_version())
    assert report.cpu["ram_total"] == psutil.virtual_memory().total
    assert report.cpu["logical_cores"] >= 1
    expected = "cuda" if torch.cuda.is_available() else report.device
    assert report.device == expected
    assert report.facts.type == report.device
    if report.device == "cpu":
        assert report.compute_dtype == "float32"
        assert report.facts.total_memory == report.cpu["ram_total"]
    # The report is what doctor --json prints: it must be plain JSON.
    assert json.loads(json.dumps(report.to_dict()))["device"] == report.device


def test_four_bit_check_runs_a_real_layer_here(report):
    pytest.importorskip("bitsandbytes")
    check = report.four_bit
    assert check.version is not None
    if report.device == "cpu":
        assert check.usable, check.reason  # bitsandbytes >= 0.45 trains 4-bit layers on CPU
        assert check.backend


def test_four_bit_check_says_why_it_fails():
    pytest.importorskip("bitsandbytes")
    check = dev.check_four_bit("meta")  # no kernels can run on the meta device
    assert not check.usable
    assert "meta" in check.reason


def test_advice_offers_16bit_lora_with_its_cost_when_4bit_is_unusable(report):
    from dataclasses import replace

    broken = replace(report, four_bit=FourBitCheck(False, "bitsandbytes is not installed"))
    advice = " ".join(dev.advice_for(broken))
    assert "bitsandbytes is not installed" in advice
    assert "16-bit LoRA" in advice and "GiB per billion parameters" in advice


@pytest.mark.parametrize(
    "facts, expected",
    [
        (DeviceFacts("cuda", "A100", compute_capability=(8, 0), bf16=True), "bfloat16"),
        (DeviceFacts("cuda", "RTX 4090", compute_capability=(8, 9), bf16=True), "bfloat16"),
        (DeviceFacts("cuda", "Tesla T4", compute_capability=(7, 5), bf16=False), "float16"),
        (DeviceFacts("cuda", "V100", compute_capability=(7, 0), bf16=False), "float16"),
        (DeviceFacts("mps", "Apple GPU", bf16=False), "float16"),
        (DeviceFacts("mps", "Apple GPU", bf16=True), "bfloat16"),
        (DeviceFacts("cpu", "CPU", bf16=True), "float32"),
        (DeviceFacts("cpu", "CPU", bf16=False), "float32"),
    ],
)
def test_compute_dtype_for_each_device(facts, expected):
    assert choose_compute_dtype(facts) == expected
    assert choose_compute_dtype(facts, "auto") == expected


def test_an_explicit_dtype_wins():
    assert choose_compute_dtype(DeviceFacts("cuda", bf16=False), "float32") == "float32"
    assert choose_compute_dtype(DeviceFacts("cpu"), "bfloat16") == "bfloat16"


def test_cpu_features_come_from_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(dev, "_cpuinfo_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setattr(dev.platform, "system", lambda: "Linux")
    found = dev.cpu_features()
    assert found["avx512_bf16"] and found["bf16"] and not found["amx_bf16"]
    monkeypatch.setattr(dev, "_cpuinfo_flags", lambda: {"avx2"})
    assert not dev.cpu_features()["bf16"]


def test_probe_facts_cpu_keeps_its_meaning():
    facts = dev.probe_facts("cpu")
    assert facts.type == "cpu"
    assert 0 < facts.free_memory <= facts.total_memory


ALLOCATOR_PROBE = r"""
import ctypes, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "cap":
    from ft_desk.quant.device import cap_cpu_allocator
    assert cap_cpu_allocator()
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
MB = 1 << 20
big = libc.malloc(8 * MB); ctypes.memset(big, 1, 8 * MB); libc.free(big)  # like one freed activation tensor
base = rss()
blocks, keep = [], []
for _ in range(32):  # the next step's activations, with small long-lived objects allocated in between
    blocks.append(libc.malloc(4 * MB))
    ctypes.memset(blocks[-1], 1, 4 * MB)
    keep.append(libc.malloc(256 * 1024))
for b in blocks:
    libc.free(b)
print((rss() - base) // MB)
"""


def test_cap_cpu_allocator_returns_freed_activation_memory():
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    kept = {mode: int(subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, mode], capture_output=True, text=True,
                                     check=True).stdout)
            for mode in ("default", "cap")}
    assert kept["default"] >= 100  # 128 MiB freed but still resident: glibc raised its mmap threshold
    assert kept["cap"] <= 16  # with the threshold pinned, freeing gives the memory back
