"""Does bitsandbytes 4-bit really train on this device? The capability probe QLoRA on an Apple GPU (MPS) depends on.

bitsandbytes >= 0.48 registers its 4-bit ops for "mps": Metal kernels fetched from the Hugging Face Hub on
macOS 26+, pure-PyTorch fallbacks otherwise (and always when offline). Whether they give right answers, in which
16-bit dtype, and whether any op silently runs on the CPU is a property of the exact macOS, torch and
bitsandbytes on the machine, so ft-desk measures it instead of assuming it:

  `run_probe` quantizes a small layer on the device exactly as a QLoRA base is quantized (NF4, double
  quantization), runs it forward and backward in each candidate compute dtype, and compares both passes with the
  same matmul done in fp32 on the CPU on the weights dequantized by `dequantize_4bit` below - ft-desk's own
  dequantization of the packed codes, so a broken device kernel cannot also break the reference. A third check
  compares the dequantized weights with the originals, so a quantizer that writes zeros cannot pass.
  `compute_dtype_from_probe` turns the results into the run's compute dtype (bf16 when it passes, else fp16),
  or None when none passes; `ft-desk doctor` prints the results and `ft-desk train` runs the probe before a QLoRA
  run on MPS.

The probe is device-generic, so the tests run it on the CPU, also with bitsandbytes' MPS kernels put in place of
its CPU ones. `watch_cpu_fallbacks` reports, once per op, any op torch runs on the CPU instead of the Apple GPU
(only possible with PYTORCH_ENABLE_MPS_FALLBACK=1; without it such an op is an error the trainer explains).
Heavy imports happen inside functions.
"""

from __future__ import annotations

import functools
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

# Note: the probe layer is 128 -> 96 (multiples of 32, two 64-weight blocks per row, 192 blocks: enough for the
# double quantization's 256-block grouping to leave a partial group, as real layers of odd sizes do) and a batch
# of 8 rows: milliseconds on any device, yet every code path of a real layer (quantize, nested absmax, dequantize,
# matmul, backward through the dequantized weight) runs.
PROBE_IN = 128
PROBE_OUT = 96
PROBE_ROWS = 8

# Note: relative error (Frobenius norm) of the 4-bit layer's forward output and input gradient against the same
# matmul in fp32 on the dequantized weights. Only rounding separates them; measured on CPU with bitsandbytes
# 0.50.2 (fp32 accumulation): fp32 3e-8, fp16 3e-4, bf16 2.5e-3. A GPU that accumulates the 128-term sums in the
# compute dtype itself rounds more, about sqrt(128) x its epsilon: fp16 0.6%, bf16 4.4%. The limits sit above
# that worst honest case and far below what a wrong kernel gives (a wrong scale or code: 10% to 100%).
FORWARD_TOLERANCE = {"float32": 1e-3, "float16": 1.5e-2, "bfloat16": 6e-2}

# Note: NF4 with 64-weight blocks reproduces a Gaussian weight matrix to ~9.3% relative error (measured on the
# probe layer: 0.0926 with and without double quantization); 0.15 fails a quantizer that returns garbage or zeros.
QUANT_TOLERANCE = 0.15

# What torch says, once per op, when PYTORCH_ENABLE_MPS_FALLBACK=1 sends an op the Apple GPU lacks to the CPU.
_FALLBACK_WARNING = re.compile(r"operator '([^']+)' is not (?:currently )?supported on the MPS backend and will "
                               r"fall back to run on the CPU")

MPS_KERNELS_REPO = "kernels-community/bitsandbytes-mps"


@dataclass(frozen=True)
class DtypeProbe:
    """The probe's result in one compute dtype."""

    dtype: str
    ok: bool
    reason: str = ""
    quant_error: float | None = None
    """Relative error of the dequantized 4-bit weights against the original ones."""
    forward_error: float | None = None
    """Relative error of the 4-bit layer's output against the dequantized matmul in fp32."""
    backward_error: float | None = None
    """Relative error of the input gradient against the dequantized matmul in fp32."""
    seconds: float | None = None
    """Wall time of quantizing the layer, the forward and the backward pass (first call: includes warm-up)."""
    cpu_fallbacks: tuple[str, ...] = ()
    """Ops torch ran on the CPU instead of the device during the probe (PYTORCH_ENABLE_MPS_FALLBACK=1)."""


@dataclass(frozen=True)
class FourBitProbe:
    """The probe of one device: one DtypeProbe per candidate compute dtype, in the order they were tried."""

    device: str
    results: tuple[DtypeProbe, ...] = ()
    version: str | None = None
    """bitsandbytes version (None when it could not be imported)."""
    kernels: str = ""
    """Which bitsandbytes code ran the 4-bit ops on MPS: "metal" (Hub kernels) or "pytorch" (fallbacks)."""
    error: str = ""
    """Why no layer could be tried at all (bitsandbytes missing or broken); empty otherwise."""

    @property
    def usable(self) -> bool:
        return any(r.ok for r in self.results)

    def result(self, dtype: str) -> DtypeProbe | None:
        return next((r for r in self.results if r.dtype == dtype), None)

    @property
    def reason(self) -> str:
        """Why 4-bit is unusable, as a clause ("" when some dtype passed)."""
        if self.usable:
            return ""
        if self.error:
            return self.error
        return "; ".join(f"in {r.dtype}, {r.reason}" for r in self.results) or "no compute dtype was tried"

    @property
    def cpu_fallbacks(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for r in self.results:
            seen.update(dict.fromkeys(r.cpu_fallbacks))
        return tuple(seen)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["usable"] = self.usable
        out["reason"] = self.reason
        out["cpu_fallbacks"] = list(self.cpu_fallbacks)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FourBitProbe:
        """The probe back from `to_dict()` (what `ft-desk doctor --json` prints)."""
        fields = ("dtype", "ok", "reason", "quant_error", "forward_error", "backward_error", "seconds")
        results = tuple(DtypeProbe(**{k: r[k] for k in fields if k in r},
                                   cpu_fallbacks=tuple(r.get("cpu_fallbacks") or ()))
                        for r in data.get("results") or ())
        return cls(str(data.get("device", "")), results, data.get("version"), str(data.get("kernels") or ""),
                   str(data.get("error") or ""))


def candidate_dtypes(bf16: bool, requested: str = "auto") -> tuple[str, ...]:
    """The compute dtypes worth probing: the requested one, or bf16 (where the device runs bf16 at all) then fp16."""
    if requested != "auto":
        return (requested,)
    return ("bfloat16", "float16") if bf16 else ("float16",)


def compute_dtype_from_probe(probe: FourBitProbe, requested: str = "auto") -> str | None:
    """The QLoRA compute dtype the probe shows works: the requested one if it passed; for auto bf16 (no fp16
    overflow) before fp16. None when nothing asked for passed."""
    order = candidate_dtypes(True, requested)
    return next((d for d in order if (r := probe.result(d)) is not None and r.ok), None)


def dequantize_4bit(packed, quant_state):
    """fp32 weights of a bitsandbytes 4-bit tensor, computed on the CPU from its packed codes and scales.

    The layout, as bitsandbytes stores it: two 4-bit codes per byte, the first weight in the high nibble; one
    absmax scale per `blocksize` weights; with double quantization the scales are themselves 8-bit codes into
    `state2.code`, one fp32 scale per `state2.blocksize` of them, plus a common `offset`.
    """
    import torch  # heavy import

    qs = quant_state
    data = packed.detach().reshape(-1).cpu()
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    codes = torch.stack(((data >> 4) & 0xF, data & 0xF), dim=1).reshape(-1).long()
    n = 1
    for size in qs.shape:
        n *= int(size)
    codes = codes[:n]
    if qs.nested:
        scale_codes = qs.absmax.detach().cpu().long()
        group = torch.arange(scale_codes.numel()) // qs.state2.blocksize
        absmax = (qs.state2.code.detach().cpu().float()[scale_codes] * qs.state2.absmax.detach().cpu().float()[group]
                  + float(qs.offset))
    else:
        absmax = qs.absmax.detach().cpu().float()
    block = torch.arange(n) // qs.blocksize
    weights = qs.code.detach().cpu().float()[codes] * absmax[block]
    return weights.reshape(tuple(int(s) for s in qs.shape))


def _relative(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _sync(device: str) -> None:
    import torch  # heavy import

    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def fallback_ops(messages) -> tuple[str, ...]:
    """Op names (aten::...) in torch's MPS CPU-fallback warnings among `messages` (strings), first seen first."""
    found: dict[str, None] = {}
    for message in messages:
        match = _FALLBACK_WARNING.search(str(message))
        if match:
            found[match.group(1)] = None
    return tuple(found)


def _probe_dtype(bnb, device: str, dtype_name: str, quant_type: str, double_quant: bool) -> DtypeProbe:
    import torch  # heavy import

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(PROBE_OUT, PROBE_IN, generator=generator) * 0.05
    x_cpu = torch.randn(PROBE_ROWS, PROBE_IN, generator=generator)
    grad_cpu = torch.randn(PROBE_ROWS, PROBE_OUT, generator=generator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            started = time.perf_counter()
            layer = bnb.nn.Linear4bit(PROBE_IN, PROBE_OUT, bias=False, compute_dtype=dtype, quant_type=quant_type,
                                      compress_statistics=double_quant)
            layer.weight = bnb.nn.Params4bit(dense.clone(), requires_grad=False, quant_type=quant_type,
                                             compress_statistics=double_quant)
            layer = layer.to(device)  # quantizes on the device, as loading a QLoRA base does
            if hasattr(layer, "support_avx512bf16_for_cpu"):
                layer.support_avx512bf16_for_cpu = False  # the training matmul path (see quant.policy)
            x = x_cpu.to(device=device, dtype=dtype).requires_grad_(True)
            y = layer(x)
            y.backward(grad_cpu.to(device=device, dtype=y.dtype))
            _sync(device)
            seconds = time.perf_counter() - started
            weights = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            y_out = y.detach().float().cpu()
            x_grad = None if x.grad is None else x.grad.detach().float().cpu()
        except Exception as exc:  # any kernel failure is a verdict, not a crash
            text = str(exc).strip().splitlines()
            return DtypeProbe(dtype_name, False, f"a 4-bit layer failed: {type(exc).__name__}: "
                                                 f"{text[0] if text else ''}".rstrip(": "),
                              cpu_fallbacks=fallback_ops(w.message for w in caught))
    fallbacks = fallback_ops(w.message for w in caught)
    for w in caught:  # pass torch's one-time fallback warnings on, so a FallbackWatch of the run sees them too
        if fallback_ops([w.message]):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    x_used = x_cpu.to(dtype).float()  # the input as the device saw it, rounded to the compute dtype
    quant_error = _relative(weights, dense)
    forward_error = _relative(y_out, x_used @ weights.t())
    backward_error = None if x_grad is None else _relative(x_grad, grad_cpu.to(dtype).float() @ weights)
    limit = FORWARD_TOLERANCE.get(dtype_name, FORWARD_TOLERANCE["bfloat16"])
    reason = ""
    if not all(map(_finite, (quant_error, forward_error, backward_error))):
        reason = "the 4-bit layer gave non-finite numbers"
    elif not quant_error < QUANT_TOLERANCE:
        reason = f"quantizing changed the weights by {quant_error:.0%} (NF4 keeps them within ~9%)"
    elif not forward_error < limit:
        reason = (f"the forward pass was {forward_error:.1%} off the dequantized matmul (rounding in {dtype_name} "
                  f"allows {limit:.2%})")
    elif backward_error is None:
        reason = "the backward pass gave no input gradient"
    elif not backward_error < limit:
        reason = (f"the backward pass was {backward_error:.1%} off the dequantized matmul (rounding in "
                  f"{dtype_name} allows {limit:.2%})")
    return DtypeProbe(dtype_name, not reason, reason, quant_error, forward_error, backward_error, seconds, fallbacks)


def _finite(value: float | None) -> bool:
    import math

    return value is None or math.isfinite(value)


def _import_bitsandbytes():
    """(module, None) or (None, why it cannot be used); its import-time notices stay out of reports."""
    import logging

    bnb_log = logging.getLogger("bitsandbytes")
    level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb  # heavy import
    except ImportError:
        return None, "bitsandbytes is not installed (pip install bitsandbytes)"
    except Exception as exc:  # a broken native library raises all sorts of errors at import
        text = str(exc).strip().splitlines()
        return None, f"bitsandbytes failed to import: {type(exc).__name__}: {text[0] if text else ''}"
    finally:
        bnb_log.setLevel(level)
    return bnb, None


def mps_kernels_in_use() -> str:
    """"metal" when bitsandbytes loaded its Metal kernels from the Hub, "pytorch" when its MPS ops run the
    pure-PyTorch fallbacks, "" when its MPS backend is not loaded (not a Mac, or too old a bitsandbytes)."""
    import sys

    ops = sys.modules.get("bitsandbytes.backends.mps.ops")
    if ops is None:
        return ""
    return "metal" if getattr(ops, "_kernel", None) is not None else "pytorch"


def run_probe(device: str, dtypes: tuple[str, ...], quant_type: str = "nf4", double_quant: bool = True,
              import_bnb: Callable[[], tuple[Any, str | None]] = _import_bitsandbytes) -> FourBitProbe:
    """Probe 4-bit training on `device` in each of `dtypes` (see the module docstring). Never raises."""
    bnb, error = import_bnb()
    if bnb is None:
        return FourBitProbe(device, error=error or "bitsandbytes cannot be used")
    version = getattr(bnb, "__version__", None)
    if device == "mps" and not mps_kernels_in_use() and not _has_mps_backend():
        return FourBitProbe(device, version=version,
                            error=f"bitsandbytes {version} has no Apple GPU (MPS) backend; 0.48 or newer has one "
                                  "(pip install -U bitsandbytes)")
    results = tuple(_probe_dtype(bnb, device, d, quant_type, double_quant) for d in dtypes)
    return FourBitProbe(device, results, version, mps_kernels_in_use() if device == "mps" else "")


def _has_mps_backend() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("bitsandbytes.backends.mps.ops") is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=8)
def cached_probe(device: str, dtypes: tuple[str, ...], quant_type: str = "nf4",
                 double_quant: bool = True) -> FourBitProbe:
    """`run_probe`, once per process for the same arguments (training, then eval or export in one process)."""
    return run_probe(device, dtypes, quant_type, double_quant)


def describe_result(r: DtypeProbe) -> str:
    """One result as a phrase for `ft-desk doctor`: "bfloat16 ok (forward 0.25%, backward 0.26%, 12 ms)"."""
    if not r.ok:
        return f"{r.dtype} FAILED ({r.reason})"
    parts = [f"forward {r.forward_error:.2%}", f"backward {r.backward_error:.2%}"]
    if r.seconds is not None:
        parts.append(f"{r.seconds * 1000:.0f} ms")
    return f"{r.dtype} ok ({', '.join(parts)} off the dequantized matmul)"


def describe_probe(probe: FourBitProbe) -> str:
    """The probe as one line: each dtype's result, which kernels ran, and any CPU fallback."""
    if probe.error:
        return f"not run: {probe.error}"
    kernels = {"metal": f"bitsandbytes Metal kernels ({MPS_KERNELS_REPO})",
               "pytorch": "bitsandbytes' pure-PyTorch MPS fallbacks"}.get(probe.kernels, "")
    parts = [describe_result(r) for r in probe.results]
    if kernels:
        parts.append(kernels)
    fallbacks = probe.cpu_fallbacks
    parts.append(f"ran on the CPU instead: {', '.join(fallbacks)}" if fallbacks else "no op fell back to the CPU")
    return " · ".join(parts)


def fallback_sentence(op: str, step_hint: str = "") -> str:
    """What one CPU fallback means for a run, said once."""
    return (f"{op} is not supported on the Apple GPU and runs on the CPU instead (PYTORCH_ENABLE_MPS_FALLBACK=1): "
            "every call waits for the GPU to finish and copies its tensors to the CPU and back, so each step that "
            f"uses it is slower{step_hint}; a newer torch may run it on the GPU")


@dataclass
class FallbackWatch:
    """Reports each op torch sends from the Apple GPU to the CPU once, through `report` (a sentence)."""

    report: Callable[[str], None]
    seen: set[str] = field(default_factory=set)
    _previous: Callable | None = None

    def showwarning(self, message, category, filename, lineno, file=None, line=None):
        for op in fallback_ops([message]):
            if op not in self.seen:
                self.seen.add(op)
                self.report(fallback_sentence(op))
        if self._previous is not None:
            self._previous(message, category, filename, lineno, file, line)

    def install(self) -> FallbackWatch:
        self._previous = warnings.showwarning
        warnings.showwarning = self.showwarning
        return self

    def uninstall(self) -> None:
        if warnings.showwarning == self.showwarning and self._previous is not None:
            warnings.showwarning = self._previous


def watch_cpu_fallbacks(device: str, report: Callable[[str], None]) -> FallbackWatch | None:
    """On MPS, report every op that falls back to the CPU once, for the rest of the process; None elsewhere
    (CUDA and the CPU have no such fallback)."""
    if device != "mps":
        return None
    return FallbackWatch(report).install()


__all__ = ["DtypeProbe", "FallbackWatch", "FourBitProbe", "cached_probe", "candidate_dtypes",
           "compute_dtype_from_probe", "dequantize_4bit", "describe_probe", "fallback_ops", "run_probe",
           "watch_cpu_fallbacks"]
