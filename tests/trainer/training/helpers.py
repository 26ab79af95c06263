"""Helpers shared by the training tests."""

from __future__ import annotations


class StopAtStep:
    """A stop request at optimizer step `step` (the loop asks once per step), like a Ctrl-C there."""

    signal_name = "SIGINT"

    def __init__(self, step: int) -> None:
        self.step, self.asked = step, 0

    @property
    def requested(self) -> bool:
        self.asked += 1
        return self.asked >= self.step
