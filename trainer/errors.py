"""Errors meant for the user: one readable sentence naming the problem, plus the fix.

Anything raised as a `UserError` is printed as its message (and hint) without a traceback; every other
exception is a bug or an environment failure and goes, with its traceback, to the run log. Stdlib only.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem the user can fix. `str(err)` is the sentence; `hint` says what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def full(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message


class DataError(UserError):
    """A row or file of training data is unusable; `where` is `file:line`."""

    def __init__(self, where: str, reason: str, hint: str = "") -> None:
        super().__init__(f"{where}: {reason}", hint)
        self.where = where
        self.reason = reason


class ModelError(UserError):
    """The base model cannot be used as asked (missing, gated, needs remote code, no safetensors...)."""


class OutOfMemory(UserError):
    """The device ran out of memory; the hint names the settings that lower the peak."""


# ------------------------------------------------------------------ Apple GPU (MPS) failures, read from their text

# Note: torch's MPS allocator says "MPS backend out of memory (MPS allocated: 9.10 GiB, other allocations:
# 1.20 GiB, max allowed: 18.13 GiB). Tried to allocate 512.00 MiB on private pool. Use
# PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit ..."; macOS itself fails a command buffer with
# "Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)" when unified memory runs out, and
# with kIOGPUCommandBufferCallbackErrorTimeout / ...ImpactingInteractivity / "GPU Hang" when its watchdog stops
# GPU work that ran too long or froze the screen.
_MPS_NUMBERS = ("MPS allocated", "other allocations", "max allowed", "Tried to allocate")
_WATCHDOG_WORDS = ("kiogpucommandbuffercallbackerrortimeout", "kioaccelcommandbuffercallbackerrortimeout",
                   "impactinginteractivity", "gpu timeout error", "gpu hang error", "submissionsignored")

MPS_OOM_LEVER = ("close other apps to leave the GPU more unified memory, or use --preset qlora for a 4-bit base "
                 "if this run is 16-bit LoRA")
"""What frees memory on a Mac beyond the run's own settings (the settings themselves are the caller's hint)."""

WATCHDOG_HINT = ("resume with ft-desk train --resume RUN_DIR after lowering train.micro_batch_size (raise "
                 "train.grad_accum to keep the batch) or data.max_length, so each GPU command is shorter; keep "
                 "other GPU-heavy apps closed while training")


def _amount(text: str, label: str) -> str:
    import re

    match = re.search(re.escape(label) + r":?\s*([\d.]+\s*[KMGT]i?B)", text)
    return match.group(1) if match else ""


def mps_out_of_memory(text: str) -> str | None:
    """The sentence for an Apple GPU out-of-memory failure (torch's limit or macOS's unified memory running
    out), None when `text` is not one."""
    if "MPS backend out of memory" in text:
        held, other, limit, asked = (_amount(text, label) for label in _MPS_NUMBERS)
        if held and limit and asked:
            extra = f" plus {other} outside torch" if other else ""
            return (f"the Apple GPU ran out of memory: the run held {held}{extra} and asked for {asked} more, "
                    f"over the {limit} torch lets it use")
        return "the Apple GPU ran out of memory"
    if "kiogpucommandbuffercallbackerroroutofmemory" in text.lower():
        return "macOS ran out of unified memory for the GPU's work (the rest of the system needed it too)"
    return None


def gpu_watchdog(text: str) -> tuple[str, str] | None:
    """(sentence, hint) when macOS's GPU watchdog stopped the run's GPU work, None otherwise."""
    lowered = text.lower()
    if not any(word in lowered for word in _WATCHDOG_WORDS):
        return None
    return ("macOS stopped the run's GPU work because one command ran too long or kept the screen from "
            "updating (the GPU watchdog)", WATCHDOG_HINT)


def mps_unsupported_op(text: str) -> tuple[str, str] | None:
    """(sentence, hint) for an op this torch cannot run on the Apple GPU, None otherwise."""
    import re

    match = re.search(r"operator '([^']+)' is not currently implemented for the MPS device", text)
    if not match:
        return None
    return (f"{match.group(1)} is not implemented for the Apple GPU in this torch",
            "upgrade torch, or set PYTORCH_ENABLE_MPS_FALLBACK=1 to run that op on the CPU (slower; ft-desk reports "
            "each such op once), or train with --set train.device=cpu")


def device_failure(text: str) -> tuple[str, str] | None:
    """(sentence, hint) for a known device failure that is not out of memory: the GPU watchdog or an
    unsupported op on the Apple GPU; None otherwise."""
    return gpu_watchdog(text) or mps_unsupported_op(text)


class DiskFull(UserError):
    """A write ran out of disk space (ENOSPC / EDQUOT); the message names the space needed and what is intact."""


_DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded", "os error 28", "not enough space on the disk")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk is full: an OSError with ENOSPC/EDQUOT, or a library error that wraps one and
    only keeps the words (safetensors raises `SafetensorError: ... No space left on device (os error 28)`)."""
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, UserError):
        return False
    if isinstance(exc, OSError) and exc.errno in {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}:
        return True
    text = str(exc).lower()
    return any(words in text for words in _DISK_FULL_WORDS)
