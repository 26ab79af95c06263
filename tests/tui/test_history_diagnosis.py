"""A run rebuilt from its events, and the doctor's reading of it."""

import math

from ft_desk.tui.history import RunHistory
from ft_desk.tui.loss_diagnosis import diagnose


def run(losses, vals=(), samples=(), finished=True, every=10):
    h = RunHistory()
    total = len(losses)
    h.apply({"type": "run_started", "run_dir": "/r", "run_name": "r", "model": "m", "method": "qlora",
             "device": "cpu", "total_steps": total, "resumed_from_step": 0})
    for i, loss in enumerate(losses, 1):
        h.apply({"type": "step", "step": i, "total_steps": total, "loss": loss, "lr": 1e-4, "tokens_per_s": 100,
                 "epoch": i / total, "eta_s": total - i, "memory_bytes": 1})
        if i % every == 0 and i // every <= len(vals):
            v = vals[i // every - 1]
            h.apply({"type": "eval", "step": i, "val_loss": v, "perplexity": math.exp(v)})
    for phase, index, output in samples:
        h.apply({"type": "sample", "phase": phase, "index": index, "prompt": "p", "output": output, "reference": "r"})
    if finished:
        h.apply({"type": "run_finished", "status": "completed", "final_step": total, "elapsed_s": 5})
    return h


def kinds(h):
    return [f.kind for f in diagnose(h)]


def test_history_tracks_progress_best_eval_and_log():
    h = run([3.0 - i * 0.02 for i in range(40)], vals=[2.9, 2.5, 2.4, 2.45])
    assert h.step == 40 and h.total_steps == 40 and h.progress == 1.0
    assert h.best_eval.step == 30 and h.best_eval.val_loss == 2.4
    assert h.status == "completed"
    assert any("val loss" in text for _, text in h.log)


def test_a_resumed_run_drops_the_steps_after_its_checkpoint():
    h = run([2.0] * 30, vals=[1.9, 1.8, 1.7], finished=False)
    h.apply({"type": "run_finished", "status": "stopped", "final_step": 30})
    h.apply({"type": "run_started", "run_dir": "/r", "total_steps": 40, "resumed_from_step": 20})
    assert h.finished is None and h.status == "running"
    assert h.steps[-1].step == 20 and [p.step for p in h.evals] == [10, 20]
    h.apply({"type": "step", "step": 21, "total_steps": 40, "loss": 1.5})
    assert h.step == 21


def test_log_since_returns_only_lines_not_shown_yet():
    h = run([1.0] * 5, finished=False)
    shown = h.log_total
    h.apply({"type": "log", "level": "warning", "message": "disk almost full"})
    assert h.log_since(shown) == [("warning", "warning: disk almost full")]
    assert h.log_since(h.log_total) == []


def test_healthy_run():
    h = run([3.0 - i * 0.03 for i in range(40)], vals=[2.8, 2.5, 2.3, 2.2],
            samples=[("before", 0, "zzz"), ("after", 0, "Hello, thanks for asking!")])
    assert kinds(h) == ["healthy"]


def test_overfitting_is_flagged_with_the_best_step():
    losses = [3.0 - i * 0.05 for i in range(50)]
    h = run(losses, vals=[2.5, 2.2, 2.35, 2.5, 2.7])
    findings = diagnose(h)
    assert [f.kind for f in findings] == ["overfitting"]
    assert "step 20" in findings[0].detail and findings[0].try_


def test_no_effect_when_loss_is_flat_or_answers_did_not_change():
    assert "no_effect" in kinds(run([2.0 + 0.001 * (i % 3) for i in range(30)]))
    same = run([3.0 - i * 0.03 for i in range(30)], samples=[("before", 0, "same"), ("after", 0, "same")])
    assert "no_effect" in kinds(same)


def test_loss_collapse_and_divergence():
    assert "collapse" in kinds(run([2.0 * 0.7 ** i for i in range(40)]))
    spiky = run([2.0 - i * 0.05 for i in range(20)] + [1.0 + i * 0.3 for i in range(20)])
    assert "diverging" in kinds(spiky)
    nan = run([2.0] * 10 + [float("nan")] + [1.9] * 10)
    assert "diverging" in kinds(nan)


def test_too_early_to_tell():
    assert kinds(run([2.0, 1.9], finished=False)) == ["too_early"]
