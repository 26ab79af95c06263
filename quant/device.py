"""Which device a run uses, which dtype it computes in, and what this machine can do.

`DeviceFacts` is plain data so the dtype and 4-bit choices can be tested for CUDA, MPS and CPU on any machine
(inject the facts). `probe_facts` measures the facts of one device for a run; `probe` builds the full
`DeviceReport` that `ft-desk doctor` prints: OS, Python, library versions, CUDA/MPS/CPU facts, and whether
bitsandbytes 4-bit really works here (a tiny quantized layer runs forward and backward; on failure the report
says why and what 16-bit LoRA costs instead). Heavy imports happen inside functions.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

from ft_desk.quant.mps_probe import FourBitProbe, cached_probe, candidate_dtypes, compute_dtype_from_probe
from ft_desk.trainer.errors import UserError

DEVICE_TYPES = ("cuda", "mps", "cpu")


@dataclass(frozen=True)
class DeviceFacts:
    """What the dtype and 4-bit choices depend on."""

    type: str
    name: str = ""
    total_memory: int = 0
    free_memory: int = 0
    compute_capability: tuple[int, int] | None = None
    bf16: bool = False
    unified_memory: int = 0
    """MPS: the RAM the CPU and the GPU share (bytes); 0 on other devices."""
    high_watermark_ratio: float | None = None
    """MPS: torch's hard allocation limit as a multiple of `total_memory` (PYTORCH_MPS_HIGH_WATERMARK_RATIO,
    1.7 by default; 0 means no limit); None on other devices."""


# torch's MPS allocator fails an allocation beyond this multiple of the recommended working set (its default;
# the PYTORCH_MPS_HIGH_WATERMARK_RATIO environment variable, read when the allocator starts, overrides it).
MPS_DEFAULT_HIGH_WATERMARK_RATIO = 1.7


def mps_high_watermark_ratio(environ: dict[str, str] | None = None) -> float:
    """The hard-limit ratio torch's MPS allocator uses in this environment (unparseable values: the default)."""
    value = (os.environ if environ is None else environ).get("PYTORCH_MPS_HIGH_WATERMARK_RATIO", "")
    try:
        ratio = float(value)
    except ValueError:
        return MPS_DEFAULT_HIGH_WATERMARK_RATIO
    return ratio if ratio >= 0 else MPS_DEFAULT_HIGH_WATERMARK_RATIO


@dataclass(frozen=True)
class UnifiedBudget:
    """What a run may use of an Apple Silicon Mac's unified memory, and why.

    The GPU and everything else share one pool of RAM. Metal recommends a working set for the GPU
    (`recommended`, about two thirds to three quarters of the RAM); torch's MPS allocator refuses allocations
    beyond `hard_limit` (the high-watermark ratio times that, 1.7x by default, which can be more than the RAM);
    and whatever macOS and the other open apps hold now is not available to the run at all. The run's budget is
    the smallest of the three: beyond the recommended working set macOS starts compressing and swapping memory,
    and a training step that waits on swap can trip the GPU watchdog.
    """

    unified: int
    recommended: int
    hard_limit: int | None
    available: int | None

    @property
    def others(self) -> int | None:
        """Bytes macOS and the other apps use now (None when the free RAM is not known)."""
        return None if self.available is None or not self.unified else max(0, self.unified - self.available)

    @property
    def budget(self) -> int:
        limits = [self.recommended]
        if self.hard_limit:
            limits.append(self.hard_limit)
        if self.available is not None:
            limits.append(self.available)
        return min(limits)

    @property
    def limited_by(self) -> str:
        if self.available is not None and self.budget == self.available and self.available < self.recommended:
            return "free RAM"
        if self.hard_limit and self.budget == self.hard_limit and self.hard_limit < self.recommended:
            return "torch's limit"
        return "recommended working set"

    def describe(self) -> str:
        gib = 1024**3
        text = f"the GPU may use {self.budget / gib:.1f} GiB of this Mac's {self.unified / gib:.0f} GiB unified memory"
        parts = [f"Metal recommends at most {self.recommended / gib:.1f} GiB"]
        parts.append(f"torch stops at {self.hard_limit / gib:.1f} GiB" if self.hard_limit
                     else "torch's limit is off (PYTORCH_MPS_HIGH_WATERMARK_RATIO=0)")
        if self.others is not None:
            parts.append(f"macOS and other apps hold {self.others / gib:.1f} GiB now")
        return f"{text} ({'; '.join(parts)})"


def unified_budget(facts: DeviceFacts) -> UnifiedBudget | None:
    """The unified-memory budget of an MPS device; None for other devices or when the RAM size is not known."""
    if facts.type != "mps" or not facts.unified_memory:
        return None
    recommended = facts.total_memory or facts.unified_memory
    ratio = MPS_DEFAULT_HIGH_WATERMARK_RATIO if facts.high_watermark_ratio is None else facts.high_watermark_ratio
    hard = int(ratio * recommended) if ratio > 0 else None
    return UnifiedBudget(unified=facts.unified_memory, recommended=recommended, hard_limit=hard,
                         available=facts.free_memory or None)


def available_device_types() -> list[str]:
    import torch  # heavy import

    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    found.append("cpu")
    return found


def resolve_device(preference: str = "auto") -> str:
    """cuda > mps > cpu for `auto`; an explicit choice that is not available is a readable error."""
    found = available_device_types()
    if preference == "auto":
        return found[0]
    if preference not in DEVICE_TYPES:
        raise UserError(f"train.device must be one of auto, {', '.join(DEVICE_TYPES)}, got {preference!r}")
    if preference not in found:
        raise UserError(
            f"train.device is {preference} but no {preference} device is available here (found: {', '.join(found)})",
            hint="use --set train.device=auto to pick the best available device",
        )
    return preference


def choose_compute_dtype(facts: DeviceFacts, requested: str = "auto") -> str:
    """bf16 where the device does it natively, fp16 on older CUDA cards, fp32 on CPU.

    CPU: bf16 matmuls are only fast with AMX and bitsandbytes' CPU 4-bit path is exact in fp32, so fp32.
    MPS: fp16 is well supported on every Apple GPU; bf16 only on newer macOS, so fp16 unless bf16 is known good.
    """
    if requested != "auto":
        return requested
    if facts.type == "cuda":
        return "bfloat16" if facts.bf16 else "float16"
    if facts.type == "mps":
        return "bfloat16" if facts.bf16 else "float16"
    return "float32"


def probe_facts(device_type: str) -> DeviceFacts:
    """Facts about the device a run will use (a minimal probe; `probe` gives the full report).

    CUDA: the first card, its free memory as the driver reports it now. MPS: the working set Metal recommends
    for the GPU (`total_memory`), the RAM available now (`free_memory`), the unified RAM and torch's hard limit
    ratio, and whether bf16 kernels run. CPU: RAM and native bf16.
    """
    import torch  # heavy import

    if device_type == "cuda":
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        return DeviceFacts(
            type="cuda",
            name=props.name,
            total_memory=total,
            free_memory=free,
            compute_capability=(props.major, props.minor),
            bf16=torch.cuda.is_bf16_supported(),
        )
    import psutil

    vm = psutil.virtual_memory()
    if device_type == "mps":
        limit = int(torch.mps.recommended_max_memory()) if hasattr(torch.mps, "recommended_max_memory") else 0
        return DeviceFacts(
            type="mps", name=_apple_chip() or "Apple GPU", total_memory=limit or vm.total,
            free_memory=int(vm.available), bf16=_mps_bf16(), unified_memory=int(vm.total),
            high_watermark_ratio=mps_high_watermark_ratio(),
        )
    return DeviceFacts(
        type="cpu", name=cpu_name(), total_memory=vm.total, free_memory=vm.available, bf16=cpu_features()["bf16"]
    )


# Note: glibc's malloc serves blocks above M_MMAP_THRESHOLD with mmap (returned to the OS on free) and the rest
# from its heaps (kept resident after free). By default the threshold grows to the largest block freed so far
# (up to 32 MiB), so after the first training step every activation tensor comes from the heaps, and the next
# step's activations do not fit the holes the last one left: peak RSS grew by about one activation set
# (measured on CPU QLoRA: 11M model 589 -> 741 MiB, 135M model 1.6 -> 2.7 GiB over the first steps).
# Pinning the threshold stops that growth, at a price: every block above it is a fresh mmap whose pages the
# kernel zero-fills. At 128 KiB that cost a quarter of the speed (SmolLM2-width 8-layer QLoRA, 2 x 512 tokens:
# peak 2020 -> 1348 MiB, 23 -> 30 s; the real SmolLM2-135M at its defaults, 96 WikiSQL rows: 60 against 88
# tok/s). At 1 MiB the weight and MLP-sized blocks still go back and the many small ones stay in the heaps: on
# the real SmolLM2 run (25 steps of 1 x 192, samples on, two rounds each) peak RSS 1375 / 1451 MiB -> 1250 /
# 1239; tokens/s 114 / 74 against 129 / 107, within what other load moved them by (a full run: 92 against 88).
CPU_MMAP_THRESHOLD = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
# Whether `ft-desk train` calls cap_cpu_allocator() before a CPU run; the planner models the peak accordingly.
TRAINING_CAPS_CPU_ALLOCATOR = True


def cap_cpu_allocator(threshold: int = CPU_MMAP_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold so freed activation memory goes back to the OS instead of piling up in the
    heap between steps. Call once at the start of a CPU training process. Returns False where it does not apply
    (not Linux/glibc); the setting lasts for the process."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def _mps_bf16() -> bool:
    """bf16 matmuls run on MPS only on recent macOS; try one instead of guessing from version numbers."""
    import torch  # heavy import

    try:
        a = torch.ones((2, 2), dtype=torch.bfloat16, device="mps")
        return bool(torch.isfinite((a @ a).float().cpu()).all())
    except (RuntimeError, TypeError):
        return False


def _apple_chip() -> str:
    """"Apple M2 Pro GPU" style, from the CPU brand macOS reports (the GPU is on the same chip)."""
    brand = _sysctl("machdep.cpu.brand_string") if platform.system() == "Darwin" else ""
    return f"{brand} GPU" if brand.startswith("Apple") else ""


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        out = _sysctl("machdep.cpu.brand_string")
        if out:
            return out
    return platform.processor() or platform.machine() or "CPU"


def _sysctl(key: str) -> str:
    import subprocess

    try:
        done = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def cpu_features() -> dict[str, bool]:
    """Instruction sets that matter for CPU training: AVX2, AVX-512, native bf16 (AVX512-BF16, AMX, Arm BF16).

    Read from the OS (Linux /proc/cpuinfo, macOS sysctl) so no torch import is needed.
    """
    flags = _cpuinfo_flags()
    arm_bf16 = "bf16" in flags
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        arm_bf16 = _sysctl("hw.optional.arm.FEAT_BF16") == "1"
    found = {
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "arm_bf16": arm_bf16,
    }
    found["bf16"] = found["avx512_bf16"] or found["amx_bf16"] or found["arm_bf16"]
    return found


@dataclass(frozen=True)
class FourBitCheck:
    """Whether bitsandbytes 4-bit training works on one device, and why not when it does not."""

    usable: bool
    reason: str = ""
    version: str | None = None
    backend: str = ""
    native_library: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Note: the smoke-test layer is tiny (64 x 64, one 4-bit block row per output) so the check costs milliseconds;
# its width is a multiple of 32 so it exercises the kernels real models use, not the CPU repack pitfall.
CHECK_FEATURES = 64


def check_four_bit(device_type: str, compute_dtype: str = "float32") -> FourBitCheck:
    """Quantize a small layer to NF4 on `device_type`, run forward and backward, and compare with 16/32-bit math.

    bitsandbytes is imported here, lazily: a broken install (missing CUDA binary, wrong torch) must not stop
    ft-desk from starting, only from using 4-bit.
    """
    import logging

    bnb_log = logging.getLogger("bitsandbytes")
    level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)  # its import-time notice about optional hub kernels is noise in a report
    try:
        import bitsandbytes as bnb  # heavy import
    except ImportError:
        return FourBitCheck(False, "bitsandbytes is not installed (pip install bitsandbytes)")
    except Exception as exc:  # a broken native library raises all sorts of errors at import
        return FourBitCheck(False, f"bitsandbytes failed to import: {type(exc).__name__}: {_first_line(exc)}")
    finally:
        bnb_log.setLevel(level)
    version = getattr(bnb, "__version__", None)
    backend, native = _bnb_backend()
    import torch  # heavy import

    try:
        dtype = getattr(torch, compute_dtype)
        torch.manual_seed(0)
        dense = torch.nn.Linear(CHECK_FEATURES, CHECK_FEATURES, bias=False)
        layer = bnb.nn.Linear4bit(CHECK_FEATURES, CHECK_FEATURES, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
        layer = layer.to(device_type)
        x = torch.randn(4, CHECK_FEATURES, device=device_type, dtype=dtype, requires_grad=True)
        y = layer(x)
        y.float().sum().backward()
        with torch.no_grad():
            ref = x.detach().float().cpu() @ dense.weight.float().t()
        err = float((y.detach().float().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
        grad_ok = x.grad is not None and bool(torch.isfinite(x.grad.float()).all())
    except Exception as exc:
        return FourBitCheck(
            False,
            f"a 4-bit test layer failed on {device_type}: {type(exc).__name__}: {_first_line(exc)}",
            version,
            backend,
            native,
        )
    # Note: NF4 with 64-wide blocks keeps a random layer's output within ~10% of the dense result; 0.25 only
    # catches kernels that return garbage, not quantization error.
    if not grad_ok or not err < 0.25:
        return FourBitCheck(
            False,
            f"the 4-bit test layer on {device_type} gave wrong results (relative error {err:.2f})",
            version,
            backend,
            native,
        )
    return FourBitCheck(True, "", version, backend, native)


def _bnb_backend() -> tuple[str, bool]:
    """(backend name bitsandbytes picked, whether its compiled library loaded)."""
    try:
        from bitsandbytes import cextension
    except Exception:
        return "", False
    lib = getattr(cextension, "lib", None)
    native = lib is not None and "Mock" not in type(lib).__name__
    return str(getattr(cextension, "BNB_BACKEND", "")), native


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "huggingface_hub", "safetensors",
            "tokenizers", "textual")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions from package metadata (nothing is imported); None when a package is missing."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class DeviceReport:
    """Everything `ft-desk doctor` shows: what a bug report needs and what decides a run's settings."""

    os: str
    python: str
    packages: dict[str, str | None]
    device: str  # the device `train.device=auto` resolves to
    facts: DeviceFacts  # of that device
    compute_dtype: str  # what `auto` picks there
    torch_cuda: str | None  # CUDA version torch was built with
    cuda_devices: list[dict[str, Any]] = field(default_factory=list)
    mps: dict[str, Any] | None = None
    cpu: dict[str, Any] = field(default_factory=dict)
    four_bit: FourBitCheck = field(default_factory=lambda: FourBitCheck(False, "not checked"))
    advice: list[str] = field(default_factory=list)
    four_bit_probe: dict[str, Any] | None = None
    """MPS: the capability probe's results per compute dtype (quant.mps_probe.FourBitProbe.to_dict())."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["facts"]["compute_capability"] = list(self.facts.compute_capability or []) or None
        return out


# Note: 16-bit LoRA keeps the base in 2 bytes per parameter (fp32 on CPU: 4); the advice quotes it per billion
# parameters so it means something before a model is chosen. `ft-desk plan` gives the exact figure per model.
LORA_BYTES_PER_PARAM = {"cuda": 2, "mps": 2, "cpu": 4}


def probe() -> DeviceReport:
    """The full device report for this machine (imports torch; runs the 4-bit smoke test on the run device)."""
    import sys

    import psutil
    import torch  # heavy import

    device = available_device_types()[0]
    facts = probe_facts(device)
    compute = choose_compute_dtype(facts)
    cuda_devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            cuda_devices.append({
                "index": i,
                "name": props.name,
                "total_memory": int(total),
                "free_memory": int(free),
                "compute_capability": [props.major, props.minor],
                "bf16": bool(props.major >= 8),
            })
    mps = None
    mps_backend = getattr(torch.backends, "mps", None)
    if mps_backend is not None and (mps_backend.is_built() or platform.system() == "Darwin"):
        available = mps_backend.is_available()
        mps = {"built": bool(mps_backend.is_built()), "available": bool(available)}
        if available:
            mps["recommended_max_memory"] = int(torch.mps.recommended_max_memory())
            mps["unified_memory"] = int(psutil.virtual_memory().total)
            mps["bf16"] = _mps_bf16()
    vm = psutil.virtual_memory()
    cpu = {
        "name": cpu_name(),
        "arch": platform.machine(),
        "logical_cores": os.cpu_count() or 1,
        "physical_cores": psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        "torch_threads": torch.get_num_threads(),
        "ram_total": int(vm.total),
        "ram_available": int(vm.available),
        **cpu_features(),
    }
    probe_details = None
    if device == "mps":
        # The full probe (both 16-bit dtypes, forward and backward against the dequantized matmul), as a QLoRA
        # run on this Mac does at its start; the compute dtype is the one it shows works.
        result = cached_probe("mps", candidate_dtypes(facts.bf16))
        backend, native = _bnb_backend()
        four_bit = FourBitCheck(result.usable, result.reason, result.version, backend or "mps", native)
        compute = compute_dtype_from_probe(result) or compute
        probe_details = result.to_dict()
    else:
        four_bit = check_four_bit(device, compute)
    report = DeviceReport(
        os=f"{platform.system()} {platform.release()} ({platform.platform()})",
        python=f"{platform.python_version()} ({sys.executable})",
        packages=package_versions(),
        device=device,
        facts=facts,
        compute_dtype=compute,
        torch_cuda=torch.version.cuda,
        cuda_devices=cuda_devices,
        mps=mps,
        cpu=cpu,
        four_bit=four_bit,
        four_bit_probe=probe_details,
    )
    report.advice = advice_for(report)
    return report


def advice_for(report: DeviceReport) -> list[str]:
    """Plain-language consequences of the report for choosing a run's settings."""
    out = []
    gib = 1024**3
    if not report.four_bit.usable:
        per_b = LORA_BYTES_PER_PARAM.get(report.device, 2)
        out.append(
            f"4-bit QLoRA is not available on {report.device}: {report.four_bit.reason}. Train 16-bit LoRA instead "
            f"(--preset lora): its base takes {per_b} bytes per parameter, about {per_b * 1e9 / gib:.1f} GiB per "
            f"billion parameters before activations (ft-desk plan MODEL --preset lora gives the exact figure)."
        )
    if report.device == "cpu":
        out.append(
            "No GPU found: training runs on the CPU in float32. Fine for small models (up to ~0.5B); "
            "expect minutes per step for larger ones."
        )
        if not report.cpu.get("bf16"):
            out.append("This CPU has no native bf16 instructions, so float32 is also the fastest dtype here.")
    if report.device == "cuda" and report.compute_dtype == "float16":
        out.append(
            f"{report.facts.name} (compute capability {report.facts.compute_capability}) has no bf16: training uses "
            "float16 with loss scaling, which can overflow on some models; lower optim.lr if the loss turns NaN."
        )
    if report.device == "mps":
        budget = unified_budget(report.facts)
        if budget is not None:
            out.append(f"Apple GPU: {budget.describe()}. Closing other apps leaves a run more.")
        else:
            out.append(f"Apple GPU: one process may use about {report.facts.total_memory / gib:.1f} GiB of unified "
                       "memory.")
        probe = report.four_bit_probe or {}
        fallbacks = FourBitProbe.from_dict(probe).cpu_fallbacks if probe else ()
        if report.four_bit.usable:
            kernels = ("bitsandbytes' Metal kernels" if probe.get("kernels") == "metal"
                       else "bitsandbytes' pure-PyTorch MPS code (no Metal kernels: slower 4-bit matmuls)")
            out.append(f"QLoRA runs on this GPU in {report.compute_dtype} through {kernels}.")
        if fallbacks:
            out.append(f"{', '.join(fallbacks)} ran on the CPU instead of the GPU during the 4-bit probe "
                       "(PYTORCH_ENABLE_MPS_FALLBACK=1): each call copies its tensors to the CPU and back.")
    if report.packages.get("bitsandbytes") is None and report.device == "cuda":
        out.append("pip install bitsandbytes to train QLoRA on this GPU.")
    return out
