"""The 4-bit capability probe (quant.mps_probe) on this CPU, and bitsandbytes' own MPS code run on the CPU.

No Mac is needed: bitsandbytes' MPS backend is pure PyTorch wherever its Metal kernels are not loaded (always
on macOS < 26 and offline). The `mps_kernels_on_cpu` fixture records the kernels that backend registers for
"mps" - its real functions, imported from bitsandbytes - and registers them for the CPU for the duration of a
test, so the ops a QLoRA run on a Mac executes (quantize_4bit, the binary-search quantize_blockwise of double
quantization, dequantize_4bit, gemm_4bit, gemv_4bit) run here and are compared with bitsandbytes' CPU kernels.
"""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

from ft_desk.quant import mps_probe
from ft_desk.quant.mps_probe import (
    DtypeProbe,
    FourBitProbe,
    candidate_dtypes,
    compute_dtype_from_probe,
    dequantize_4bit,
    describe_probe,
    fallback_ops,
    run_probe,
    watch_cpu_fallbacks,
)

bnb = pytest.importorskip("bitsandbytes")
torch = pytest.importorskip("torch")

OPS_A_MAC_RUNS = ("quantize_4bit", "dequantize_4bit", "gemm_4bit", "gemv_4bit", "quantize_blockwise",
                  "dequantize_blockwise")
FALLBACK_TEXT = ("The operator 'aten::{op}' is not currently supported on the MPS backend and will fall back to "
                 "run on the CPU. This may have performance implications.")


def _record_kernels(module_name: str, device: str) -> dict[str, object]:
    """The kernels `module_name` registers for `device`, by op name, recorded instead of registered."""
    import bitsandbytes._ops as bnb_ops

    recorded: dict[str, object] = {}

    def recorder(op, dev):
        def keep(fn):
            if dev == device:
                recorded[op.split("::")[-1]] = fn
            return fn
        return keep

    saved = {name: sys.modules.pop(name) for name in (module_name,) if name in sys.modules}
    real = bnb_ops.register_kernel
    bnb_ops.register_kernel = recorder
    try:
        importlib.import_module(module_name)
    finally:
        bnb_ops.register_kernel = real
        sys.modules.pop(module_name, None)
        sys.modules.update(saved)
    return recorded


class CpuOverride:
    """Kernels registered for the CPU in place of bitsandbytes' own until `close()`; counts calls per op."""

    def __init__(self) -> None:
        self.lib = torch.library.Library("bitsandbytes", "FRAGMENT")
        self.calls: dict[str, int] = {}

    def register(self, op: str, fn) -> None:
        def counted(*args, **kwargs):
            self.calls[op] = self.calls.get(op, 0) + 1
            return fn(*args, **kwargs)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel" is the point
            torch.library.register_kernel(f"bitsandbytes::{op}", "cpu", counted, lib=self.lib)

    def close(self) -> None:
        self.lib._destroy()


@pytest.fixture
def cpu_override():
    override = CpuOverride()
    yield override
    override.close()


@pytest.fixture
def mps_kernels_on_cpu(cpu_override, monkeypatch):
    """bitsandbytes' MPS kernels (with the default backend's for the ops MPS leaves to it) as the CPU kernels."""
    import torch._dynamo

    # bitsandbytes wraps its pure-PyTorch kernels in torch.compile; eager here, the same arithmetic.
    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    mps = _record_kernels("bitsandbytes.backends.mps.ops", "mps")
    default = _record_kernels("bitsandbytes.backends.default.ops", "default")
    assert {"quantize_4bit", "dequantize_4bit", "gemm_4bit", "gemv_4bit", "quantize_blockwise"} <= set(mps)
    for op in OPS_A_MAC_RUNS:
        cpu_override.register(op, mps.get(op) or default[op])
    cpu_override.from_mps = {op for op in OPS_A_MAC_RUNS if op in mps}
    return cpu_override


def _weights(rows=96, cols=100, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


# ------------------------------------------------------------------ ft-desk's own reference dequantization


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 128), (7, 100), (33, 64)])  # exact blocks, a partial block, odd rows
def test_reference_dequantization_equals_bitsandbytes(quant_type, double_quant, shape):
    w = _weights(*shape)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                 compress_statistics=double_quant)
    theirs = bnb.functional.dequantize_4bit(packed, state)
    ours = dequantize_4bit(packed, state)
    assert ours.shape == w.shape
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-8)
    assert float((ours - w).norm() / w.norm()) < mps_probe.QUANT_TOLERANCE


# ------------------------------------------------------------------ the probe on this CPU


def test_probe_passes_here_in_every_dtype_and_measures_only_rounding():
    result = run_probe("cpu", ("float32", "bfloat16", "float16"))
    assert result.usable and result.reason == "" and result.version == bnb.__version__
    by = {r.dtype: r for r in result.results}
    assert all(r.ok for r in by.values()), [r.reason for r in by.values()]
    assert by["float32"].forward_error < 1e-5 and by["float32"].backward_error < 1e-5
    assert by["float16"].forward_error < by["bfloat16"].forward_error  # 10 mantissa bits against 7
    for r in by.values():
        assert 0.05 < r.quant_error < mps_probe.QUANT_TOLERANCE  # NF4's own error, neither zero nor garbage
        assert r.forward_error < mps_probe.FORWARD_TOLERANCE[r.dtype]
        assert r.cpu_fallbacks == ()


def test_bitsandbytes_mps_kernels_quantize_exactly_like_its_cpu_kernels(mps_kernels_on_cpu):
    # What a Mac stores for a QLoRA base equals what ft-desk's CPU export path recomputes (merge re-quantizes
    # on the CPU when the run trained on MPS): same codes, same scales, double quantization included.
    w = _weights(96, 100)
    mps_kernels_on_cpu.close()  # bitsandbytes' CPU kernels first
    expected = {}
    for quant_type in ("nf4", "fp4"):
        expected[quant_type] = bnb.functional.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                            compress_statistics=True)
    override = CpuOverride()
    try:
        mps = _record_kernels("bitsandbytes.backends.mps.ops", "mps")
        for op in ("quantize_4bit", "quantize_blockwise"):
            override.register(op, mps[op])
        for quant_type, (packed_cpu, state_cpu) in expected.items():
            packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                         compress_statistics=True)
            assert torch.equal(packed, packed_cpu)
            assert torch.equal(state.absmax, state_cpu.absmax)  # the 8-bit codes of the scales
            assert torch.equal(state.state2.absmax, state_cpu.state2.absmax)
            assert torch.allclose(state.offset, state_cpu.offset)
        assert override.calls["quantize_4bit"] == 2 and override.calls["quantize_blockwise"] == 2
    finally:
        override.close()


def test_bitsandbytes_mps_kernels_dequantize_and_multiply_like_its_cpu_kernels(mps_kernels_on_cpu):
    w = _weights(96, 128)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    mps_dq = bnb.functional.dequantize_4bit(packed, state)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(1))
    mps_gemv = bnb.functional.gemv_4bit(x, packed.t(), state=state)
    assert mps_kernels_on_cpu.calls.get("dequantize_4bit") and mps_kernels_on_cpu.calls.get("gemv_4bit")
    mps_kernels_on_cpu.close()
    assert torch.equal(mps_dq, bnb.functional.dequantize_4bit(packed, state))
    assert torch.allclose(mps_gemv, x @ dequantize_4bit(packed, state).t(), rtol=1e-5, atol=1e-6)


def test_probe_passes_with_bitsandbytes_mps_kernels_and_matches_the_cpu_kernels(mps_kernels_on_cpu):
    dtypes = ("float32", "bfloat16", "float16")
    on_mps_code = run_probe("cpu", dtypes)
    used = set(mps_kernels_on_cpu.calls)
    assert {"quantize_4bit", "quantize_blockwise", "gemm_4bit", "dequantize_4bit"} <= used  # forward + backward
    assert used & mps_kernels_on_cpu.from_mps == used - {"dequantize_blockwise"}
    mps_kernels_on_cpu.close()
    on_cpu_code = run_probe("cpu", dtypes)
    assert on_mps_code.usable, on_mps_code.reason
    assert compute_dtype_from_probe(on_mps_code) == "bfloat16"
    for mine, theirs in zip(on_mps_code.results, on_cpu_code.results):
        assert mine.ok, mine.reason
        assert mine.quant_error == pytest.approx(theirs.quant_error, rel=1e-6)  # identical 4-bit weights
        assert mine.forward_error < mps_probe.FORWARD_TOLERANCE[mine.dtype]
        assert mine.backward_error < mps_probe.FORWARD_TOLERANCE[mine.dtype]


# ------------------------------------------------------------------ the probe catches broken kernels


def test_a_gemm_that_returns_zeros_fails_the_forward_check(cpu_override):
    def zeros(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None,
              absmax_offset=None):
        return torch.zeros(*A.shape[:-1], shapeB[0], dtype=A.dtype)

    cpu_override.register("gemm_4bit", zeros)
    result = run_probe("cpu", ("float16",))
    assert not result.usable
    assert "forward pass was 100.0% off the dequantized matmul" in result.reason
    assert compute_dtype_from_probe(result) is None


def test_a_dequantize_with_wrong_scales_is_caught_by_the_independent_reference(cpu_override):
    import torch._dynamo
    from bitsandbytes.backends.default import ops as default_ops

    def doubled(A, absmax, blocksize, quant_type, shape, dtype):
        code = bnb.functional.get_4bit_type(quant_type, device=A.device)
        with torch._dynamo.config.patch(disable=True):
            return 2 * default_ops._dequantize_4bit_compute(A.view(torch.uint8).reshape(-1), absmax, code, blocksize,
                                                            shape, dtype)

    cpu_override.register("dequantize_4bit", doubled)  # forward and backward both dequantize through this op
    result = run_probe("cpu", ("float32",))
    assert not result.usable
    # The reference dequantizes the packed codes itself, so the doubled weights show up as a 100% error.
    assert result.reason == ("in float32, the forward pass was 100.0% off the dequantized matmul (rounding in "
                             "float32 allows 0.10%)")


def test_a_quantizer_that_writes_zeros_cannot_pass(cpu_override):
    def zero_codes(A, blocksize, quant_type, quant_storage):
        n = A.numel()
        blocks = -(-n // blocksize)
        return torch.zeros(((n + 1) // 2, 1), dtype=torch.uint8), torch.zeros(blocks)

    cpu_override.register("quantize_4bit", zero_codes)
    result = run_probe("cpu", ("float32",), double_quant=False)
    assert not result.usable
    assert "quantizing changed the weights" in result.reason or "non-finite" in result.reason


def test_a_kernel_that_raises_is_a_verdict_not_a_crash(cpu_override):
    def broken(*args, **kwargs):
        raise RuntimeError("Metal kernel failed to compile\nsecond line")

    cpu_override.register("gemm_4bit", broken)
    result = run_probe("cpu", ("float16",))
    assert result.reason == "in float16, a 4-bit layer failed: RuntimeError: Metal kernel failed to compile"


def test_no_bitsandbytes_is_said_as_such():
    result = run_probe("mps", ("float16",), import_bnb=lambda: (None, "bitsandbytes is not installed (pip ...)"))
    assert not result.usable and result.results == ()
    assert result.reason == "bitsandbytes is not installed (pip ...)"
    assert describe_probe(result) == "not run: bitsandbytes is not installed (pip ...)"


# ------------------------------------------------------------------ dtype decisions from injected results


def _probe(*results: tuple[str, bool]) -> FourBitProbe:
    return FourBitProbe("mps", tuple(DtypeProbe(d, ok, "" if ok else "the forward pass was 40.0% off",
                                                0.09, 0.001, 0.001, 0.01) for d, ok in results), "0.50.2",
                        "pytorch")


@pytest.mark.parametrize("results, requested, expected", [
    ((("bfloat16", True), ("float16", True)), "auto", "bfloat16"),
    ((("bfloat16", False), ("float16", True)), "auto", "float16"),
    ((("float16", True),), "auto", "float16"),  # a Mac without bf16 only tries fp16
    ((("bfloat16", False), ("float16", False)), "auto", None),
    ((("float16", True),), "float16", "float16"),
    ((("bfloat16", False),), "bfloat16", None),
])
def test_compute_dtype_is_what_the_probe_shows_works(results, requested, expected):
    assert compute_dtype_from_probe(_probe(*results), requested) == expected


def test_candidate_dtypes_follow_the_device_and_the_request():
    assert candidate_dtypes(bf16=True) == ("bfloat16", "float16")
    assert candidate_dtypes(bf16=False) == ("float16",)
    assert candidate_dtypes(bf16=True, requested="float32") == ("float32",)


def test_the_doctor_line_survives_json_and_names_every_result():
    probe = _probe(("bfloat16", False), ("float16", True))
    again = FourBitProbe.from_dict(probe.to_dict())
    assert again == probe
    line = describe_probe(again)
    assert line.startswith("bfloat16 FAILED (the forward pass was 40.0% off) · float16 ok (forward 0.10%")
    assert "pure-PyTorch MPS fallbacks" in line and "no op fell back to the CPU" in line


# ------------------------------------------------------------------ CPU fallbacks are reported once


def test_fallback_warnings_name_their_ops():
    texts = [FALLBACK_TEXT.format(op="_linalg_eigh"), "unrelated", FALLBACK_TEXT.format(op="_linalg_eigh")]
    assert fallback_ops(texts) == ("aten::_linalg_eigh",)


def test_a_fallback_during_a_run_is_reported_once_with_what_it_costs():
    said: list[str] = []
    watch = watch_cpu_fallbacks("mps", said.append)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = watch.showwarning  # catch_warnings saved and will restore the hook
            for _ in range(3):
                warnings.warn(FALLBACK_TEXT.format(op="isin"), UserWarning, stacklevel=1)
            warnings.warn(FALLBACK_TEXT.format(op="nonzero"), UserWarning, stacklevel=1)
    finally:
        watch.uninstall()
    assert len(said) == 2
    assert said[0].startswith("aten::isin is not supported on the Apple GPU and runs on the CPU instead")
    assert "copies its tensors to the CPU and back" in said[0]
    assert watch_cpu_fallbacks("cuda", said.append) is None and watch_cpu_fallbacks("cpu", said.append) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_kernel_a_tenth_off_fails_in_every_dtype(cpu_override, dtype):
    # The tolerances leave room for rounding in the compute dtype, not for a kernel that is merely a bit wrong.
    from bitsandbytes.backends.default import ops as default_ops

    def tenth_off(*args, **kwargs):
        return default_ops._gemm_4bit_default_impl(*args, **kwargs) * 1.1

    cpu_override.register("gemm_4bit", tenth_off)
    result = run_probe("cpu", (dtype,))
    assert not result.usable
    assert result.results[0].forward_error == pytest.approx(0.1, abs=0.01)
