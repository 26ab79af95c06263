"""Everything the screens show about one run, rebuilt from its events (see ft_desk.trainer.events).

`RunHistory.apply(event)` folds one event in; the Train, Evaluate and Export screens only read from it, so a run
replayed from RUN_DIR/events.jsonl and a run watched live look the same. Pure Python, no UI.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ft_desk.trainer.events import describe_event

LOG_LINES = 2000


@dataclass
class StepPoint:
    step: int
    loss: float
    lr: float = 0.0
    tokens_per_s: float = 0.0
    epoch: float = 0.0
    grad_norm: float | None = None


@dataclass
class EvalPoint:
    step: int
    val_loss: float
    perplexity: float | None = None
    is_best: bool = False


@dataclass
class RunHistory:
    started: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    model_import: dict[str, Any] = field(default_factory=dict)
    """The last `model_import` event: a GGUF / Ollama base being converted once (or reused) before loading."""
    last_step: dict[str, Any] = field(default_factory=dict)
    steps: list[StepPoint] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)
    samples: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    finished: dict[str, Any] | None = None
    log: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    """(level, text) lines for the log pane: every event but steps, plus a step line every so often."""
    extra: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Events of other tools (eval, export) by type, newest last."""
    events_seen: int = 0
    log_total: int = 0
    """Lines ever added to `log` (the log pane appends the ones it has not shown yet)."""

    def _log(self, level: str, text: str) -> None:
        self.log.append((level, text))
        self.log_total += 1

    def log_since(self, shown: int) -> list[tuple[str, str]]:
        """Log lines added after the first `shown` ones (as many as are still kept)."""
        new = self.log_total - shown
        if new <= 0:
            return []
        return list(self.log)[-min(new, len(self.log)):]

    def apply(self, event: dict[str, Any]) -> None:
        self.events_seen += 1
        kind = event.get("type")
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(event)
        else:
            self.extra.setdefault(str(kind), []).append(event)
            return
        if kind != "step":
            try:
                text = _sample_line(event) if kind == "sample" else describe_event(event)
            except (KeyError, TypeError, ValueError):
                text = str(event)
            level = event.get("level", "error" if event.get("status") == "failed" else "info")
            self._log(str(level), text)

    def apply_all(self, events) -> None:
        for event in events:
            self.apply(event)

    # One handler per event type. Unknown fields are ignored, missing ones default.
    def _on_run_started(self, e: dict[str, Any]) -> None:
        resumed = int(e.get("resumed_from_step") or 0)
        if self.started and resumed:
            # A resumed run replays from its checkpoint: drop what came after it.
            self.steps = [p for p in self.steps if p.step <= resumed]
            self.evals = [p for p in self.evals if p.step <= resumed]
        self.started = dict(e)
        self.finished = None

    def _on_data_ready(self, e: dict[str, Any]) -> None:
        self.data = dict(e)

    def _on_model_loaded(self, e: dict[str, Any]) -> None:
        self.model = dict(e)

    def _on_model_import(self, e: dict[str, Any]) -> None:
        self.model_import = dict(e)

    def _on_step(self, e: dict[str, Any]) -> None:
        self.last_step = dict(e)
        loss = e.get("loss")
        if not isinstance(loss, (int, float)):
            return
        step = int(e.get("step", 0))
        if self.steps and step <= self.steps[-1].step:
            self.steps = [p for p in self.steps if p.step < step]
        self.steps.append(
            StepPoint(step, float(loss), float(e.get("lr") or 0.0), float(e.get("tokens_per_s") or 0.0),
                      float(e.get("epoch") or 0.0), e.get("grad_norm"))
        )
        total = int(e.get("total_steps") or 0)
        every = max(1, total // 20) if total else 10
        if step == 1 or step % every == 0 or (total and step == total):
            self._log("step", _step_line(e))

    def _on_eval(self, e: dict[str, Any]) -> None:
        value = e.get("val_loss")
        if isinstance(value, (int, float)):
            step = int(e.get("step", 0))
            self.evals = [p for p in self.evals if p.step != step]
            self.evals.append(EvalPoint(step, float(value), e.get("perplexity"), bool(e.get("is_best"))))

    def _on_sample(self, e: dict[str, Any]) -> None:
        self.samples[(str(e.get("phase")), int(e.get("index", 0)))] = dict(e)

    def _on_checkpoint(self, e: dict[str, Any]) -> None:
        self.checkpoints.append(dict(e))

    def _on_log(self, e: dict[str, Any]) -> None:
        pass

    def _on_run_finished(self, e: dict[str, Any]) -> None:
        self.finished = dict(e)

    # What the screens ask.
    @property
    def run_dir(self) -> str:
        return str(self.started.get("run_dir", ""))

    @property
    def status(self) -> str:
        if self.finished:
            return str(self.finished.get("status", "finished"))
        return "running" if self.started else "starting"

    @property
    def step(self) -> int:
        return int(self.last_step.get("step", 0)) if self.last_step else 0

    @property
    def total_steps(self) -> int:
        return int(self.last_step.get("total_steps") or self.started.get("total_steps") or 0)

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def best_eval(self) -> EvalPoint | None:
        finite = [p for p in self.evals if math.isfinite(p.val_loss)]
        return min(finite, key=lambda p: p.val_loss) if finite else None

    def sample_pairs(self) -> list[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
        """(before, after) sample events by index, for the side-by-side view."""
        indices = sorted({i for _, i in self.samples})
        return [(self.samples.get(("before", i)), self.samples.get(("after", i))) for i in indices]

    def smoothed_losses(self, alpha: float = 0.2) -> list[float]:
        out: list[float] = []
        for p in self.steps:
            if not math.isfinite(p.loss):
                out.append(out[-1] if out else p.loss)
                continue
            out.append(p.loss if not out else alpha * p.loss + (1 - alpha) * out[-1])
        return out


def _sample_line(e: dict[str, Any]) -> str:
    output = " ".join(str(e.get("output", "")).split())
    short = output[:100] + ("…" if len(output) > 100 else "")
    return f"sample {int(e.get('index', 0)) + 1} {e.get('phase')} training: {short!r}"


def _step_line(e: dict[str, Any]) -> str:
    try:
        return describe_event(e) + f"  lr {float(e.get('lr') or 0):.2e}  {float(e.get('tokens_per_s') or 0):.0f} tok/s"
    except (KeyError, TypeError, ValueError):
        return f"step {e.get('step')}"
