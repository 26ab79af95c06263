"""Loss diagnosis (the Evaluate screen's Doctor tab): reads a run's loss curves and samples and names what went
wrong, with what to try.

Each check looks only at the event history (no model is loaded), so it works for a live run, a replayed one and
a run from last week. The thresholds are deliberately coarse: a finding is a prompt to look, not a verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ft_desk.tui.history import RunHistory

# Note: relative changes below these are treated as noise on the small validation sets hobbyists use.
OVERFIT_RISE = 0.03
"""Val loss this much (relative) above its best, over the last two evaluations, counts as rising."""
NO_EFFECT_DROP = 0.03
"""Train loss that fell by less than this (relative) from the first steps to the last means little was learned."""
COLLAPSE_LOSS = 0.02
"""Train loss below this means the model is reproducing its data verbatim."""
DIVERGE_RISE = 0.5
"""Smoothed train loss this much (relative) above its minimum at the end means training went unstable."""


@dataclass(frozen=True)
class Finding:
    kind: str  # overfitting | no_effect | collapse | diverging | healthy | too_early
    severity: str  # warning | error | ok | info
    title: str
    detail: str
    try_: tuple[str, ...] = ()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _head_tail(values: list[float]) -> tuple[float, float]:
    n = max(1, len(values) // 10)
    return _mean(values[:n]), _mean(values[-n:])


def diagnose(h: RunHistory) -> list[Finding]:
    finite = [p.loss for p in h.steps if math.isfinite(p.loss)]
    if len(finite) < 5:
        return [Finding("too_early", "info", "Not enough steps yet",
                        "The doctor needs at least 5 logged steps to read the loss curve.")]
    out: list[Finding] = []
    nonfinite = len(h.steps) - len(finite) + int(h.last_step.get("skipped_steps") or 0)
    smooth = [v for v in h.smoothed_losses() if math.isfinite(v)]
    first, last = _head_tail(finite)
    lowest = min(smooth)

    if nonfinite or (smooth[-1] > lowest * (1 + DIVERGE_RISE) and smooth[-1] > first * 0.9):
        why = f"{nonfinite} step(s) had a non-finite loss" if nonfinite else (
            f"the smoothed train loss climbed back from {lowest:.3f} to {smooth[-1]:.3f}")
        out.append(Finding(
            "diverging", "error", "Training became unstable", f"{why.capitalize()}.",
            ("lower optim.lr by 3-10x", "raise optim.warmup_ratio to 0.1",
             "keep optim.max_grad_norm at 1.0 (clipping on)", "use bfloat16 if the device supports it"),
        ))

    evals = [p for p in h.evals if math.isfinite(p.val_loss)]
    best = h.best_eval
    if best is not None and len(evals) >= 3 and evals[-1].step > best.step:
        after = [p for p in evals if p.step > best.step]
        train_at_best = [p.loss for p in h.steps if p.step <= best.step and math.isfinite(p.loss)]
        train_falling = train_at_best and last < _mean(train_at_best[-max(1, len(train_at_best) // 10):])
        if (len(after) >= 2 and after[-1].val_loss > best.val_loss * (1 + OVERFIT_RISE)
                and after[-1].val_loss >= after[0].val_loss and train_falling):
            out.append(Finding(
                "overfitting", "warning", "Overfitting: validation loss is rising while train loss falls",
                f"Best val loss {best.val_loss:.3f} at step {best.step}; now {after[-1].val_loss:.3f} at step "
                f"{after[-1].step}. The saved adapter is the best checkpoint, not the last one.",
                ("train fewer epochs (train.epochs) or stop early: eval.early_stop_patience=2",
                 "add more varied training data", "lower lora.r (e.g. 8) or raise lora.dropout to 0.1",
                 "lower optim.lr"),
            ))

    if last < COLLAPSE_LOSS:
        out.append(Finding(
            "collapse", "warning", "Loss collapse: the model is memorising its training data",
            f"Train loss fell to {last:.4f}. Replies will repeat training examples word for word and general "
            "ability can suffer.",
            ("train fewer epochs or steps", "raise lora.dropout (0.05-0.1)", "add more data or drop duplicates",
             "compare val loss: if it rose, use the best checkpoint"),
        ))

    samples = h.sample_pairs()
    unchanged = [b for b, a in samples if b and a and b.get("output", "").strip() == a.get("output", "").strip()]
    drop = (first - last) / first if first > 0 else 0.0
    if (drop < NO_EFFECT_DROP and h.finished) or (samples and len(unchanged) == len(samples) and all(
            b and a for b, a in samples)):
        reason = (f"Train loss moved only {drop * 100:.1f}% ({first:.3f} -> {last:.3f})" if drop < NO_EFFECT_DROP
                  else "Every sample answer after training is identical to the one before")
        out.append(Finding(
            "no_effect", "warning", "No effect: the model barely changed", reason + ".",
            ("raise optim.lr (x3) or train longer (train.epochs)",
             "check that data.train_on covers the part you want learned (assistant turns)",
             "make sure lora.target_modules is all-linear",
             "look at the Data step: rows may be truncated away by data.max_length"),
        ))

    if not out:
        if best is not None and evals:
            detail = f"Val loss went from {evals[0].val_loss:.3f} to a best of {best.val_loss:.3f} at step {best.step}."
        else:
            detail = f"Train loss went from {first:.3f} to {last:.3f}."
        out.append(Finding("healthy", "ok", "Nothing alarming in the loss curves", detail,
                           ("compare the before / after answers", "try the model in the Chat tab")))
    return out
