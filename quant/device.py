"""Which device a run uses and which dtype it computes in. Device facts are plain data so the choice logic
can be tested for CUDA, MPS and CPU on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    from ft_desk.trainer.errors import UserError

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
    """Facts about the device a run will use (a minimal probe; quant.device.probe gives the full report)."""
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
    if device_type == "mps":
        return DeviceFacts(type="mps", name="Apple GPU", bf16=False)
    import psutil

    vm = psutil.virtual_memory()
    return DeviceFacts(type="cpu", name="CPU", total_memory=vm.total, free_memory=vm.available, bf16=False)
