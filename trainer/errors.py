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
