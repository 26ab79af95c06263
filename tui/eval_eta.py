"""How long `ft-desk eval` has left, from its eval_started and eval_progress events.

An evaluation runs the same phases for the base model and then for the tuned one (loss, generate, retention; the
model load first, a semantic pass last). The phase in progress is projected from its own rate; a phase that
has not started yet takes as long as the same phase took for the other model when that is known, else as long
as the phase in progress is projected to take (the first estimate is rough, and firms up once the base model's
phases are done - the tuned model's are the same work). Pure: the Evaluate screen feeds it events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GENERATION_METRICS = frozenset({"exact", "rouge", "chrf", "bleu", "json", "regex", "stop", "length", "semantic"})
SIDES = ("base", "tuned")


def phases_of(metrics: list[str]) -> list[str]:
    """The per-model phases an evaluation with these metrics runs, in order."""
    wanted = set(metrics)
    phases = []
    if "loss" in wanted:
        phases.append("loss")
    if wanted & GENERATION_METRICS:
        phases.append("generate")
    if "retention" in wanted:
        phases.append("retention")
    return phases


@dataclass
class EvalEta:
    phases: list[str] = field(default_factory=lambda: ["loss", "generate", "retention"])
    durations: dict[tuple[str, str], float] = field(default_factory=dict)
    current: tuple[str, str] | None = None
    started_at: float = 0.0  # elapsed_s when the current phase began
    done: int = 0
    total: int = 0
    elapsed: float = 0.0

    def started(self, event: dict[str, Any]) -> None:
        self.phases = phases_of(list(event.get("metrics") or [])) or self.phases

    def progress(self, event: dict[str, Any]) -> None:
        side, phase = str(event.get("model")), str(event.get("phase"))
        elapsed = float(event.get("elapsed_s") or 0.0)
        key = (side, phase)
        if key != self.current:
            if self.current is not None and self.current[1] in self.phases:
                self.durations[self.current] = max(0.0, self.elapsed - self.started_at)
            self.current, self.started_at = key, self.elapsed
        self.done, self.total = int(event.get("done") or 0), int(event.get("total") or 0)
        self.elapsed = elapsed
        if self.total and self.done >= self.total and phase in self.phases:
            self.durations[key] = max(0.0, elapsed - self.started_at)

    def _projected(self) -> float | None:
        """The current phase's whole duration at its present rate."""
        if self.current is None or not self.done or not self.total:
            return None
        return (self.elapsed - self.started_at) * self.total / self.done

    def remaining_s(self) -> float | None:
        """Seconds left for the whole evaluation, or None until a phase has made measurable progress."""
        projected = self._projected()
        if projected is None or self.current is None or self.current[1] not in self.phases:
            return None
        left = max(0.0, projected - (self.elapsed - self.started_at))
        sequence = [(side, phase) for side in SIDES for phase in self.phases]
        if self.current not in sequence:
            return left
        for side, phase in sequence[sequence.index(self.current) + 1:]:
            if (side, phase) in self.durations:
                continue
            other = "tuned" if side == "base" else "base"
            left += self.durations.get((other, phase), projected)
        return left
