"""The training loop driven directly with a tiny model and fake parts: learning, LR schedule, non-finite
losses, stop requests and checkpoints that restore bit for bit."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from ft_desk.trainer.data.batching import schedule
from ft_desk.trainer.events import ListSink
from ft_desk.trainer.presets import load_config
from ft_desk.trainer.training.loop import FitContext, LoopState, NonFiniteLoss, fit, lr_at
from ft_desk.trainer.training.loss import causal_lm_loss


def _examples(n, length=24, seed=0):
    import random

    # Something learnable with frozen random embeddings: four fixed sequences, repeated.
    patterns = [[random.Random(k).randrange(10, 1000) for _ in range(length)] for k in range(4)]
    order = random.Random(seed)
    return [SimpleNamespace(input_ids=list(p), labels=list(p)) for p in (order.choice(patterns) for _ in range(n))]


def _context(tiny_model_dir, overrides=(), loss_fn=causal_lm_loss, saved=None, stop=lambda: False):
    import torch

    from ft_desk.trainer.training.model import load_base, prepare_for_training

    cfg = load_config(["demo"], [f"model.name={tiny_model_dir}", "train.device=cpu", "train.grad_accum=2",
                                 "train.micro_batch_size=2", "eval.every_steps=4", "output.save_every=0",
                                 "optim.lr=5e-3", *overrides])
    model, tokenizer, _ = load_base(cfg, "cpu")
    model = prepare_for_training(model, cfg)
    train, val = _examples(24), _examples(6, seed=1)
    plan = schedule(train, max_length=64, micro_batch_size=2, packing=True, seed=0, epochs=cfg.train.epochs)
    val_plan = schedule(val, max_length=64, micro_batch_size=2, packing=True, seed=0, epochs=1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr)
    sink = ListSink()
    saves = saved if saved is not None else []
    ctx = FitContext(model=model, optimizer=optimizer, cfg=cfg, train_examples=train, val_examples=val,
                     schedule=plan, val_batches=val_plan, pad_id=tokenizer.pad_token_id, device="cpu", sink=sink,
                     save_checkpoint=lambda state, best: saves.append((state.step, best)), should_stop=stop,
                     loss_fn=loss_fn)
    return ctx, sink


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 100, 1e-3, 0.1, "cosine") for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 1e-5
    assert lr_at(50, 100, 1e-3, 0.0, "linear") == pytest.approx(5e-4)
    assert lr_at(99, 100, 1e-3, 0.0, "constant") == 1e-3


def test_fit_lowers_validation_loss_and_reports_progress(tiny_model_dir):
    ctx, sink = _context(tiny_model_dir, ["train.epochs=3"])
    state, status = fit(ctx, LoopState())
    assert status == "completed"
    evals = sink.of_type("eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == ctx.total_steps
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    steps = sink.of_type("step")
    assert [e["step"] for e in steps] == list(range(1, ctx.total_steps + 1))
    assert all(e["tokens_per_s"] > 0 and e["memory_bytes"] > 0 for e in steps)
    assert steps[-1]["tokens"] == sum(mb.tokens for mb in ctx.schedule)


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny_model_dir):
    import torch

    calls = {"n": 0}

    def flaky_loss(model, batch, chunk):
        loss = causal_lm_loss(model, batch, chunk)
        if not model.training:
            return loss  # validation stays finite
        calls["n"] += 1
        # Training micro-batches 3-4 (optimizer step 2) are NaN once; from micro-batch 9 (step 5) on, always.
        if calls["n"] in (3, 4) or calls["n"] >= 9:
            return loss * float("nan")
        return loss

    saved = []
    ctx, sink = _context(tiny_model_dir, ["train.max_bad_steps=3", "train.epochs=4", "output.save_every=1"],
                         loss_fn=flaky_loss, saved=saved)
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad}
    with pytest.raises(NonFiniteLoss, match="not finite for 3 steps in a row"):
        fit(ctx, LoopState())
    warnings = [e for e in sink.of_type("log") if e["level"] == "warning"]
    assert len(warnings) == 4  # one isolated skip, then three in a row
    for name, p in ctx.model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all(), name
    assert any(not torch.equal(before[n], p) for n, p in ctx.model.named_parameters() if p.requires_grad)
    # Skipped steps leave the weights as they were, so saving after them is safe; the step that ends the
    # run (7, the third bad one in a row) writes nothing.
    assert [s for s, _ in saved] == [1, 2, 3, 4, 5, 6]


def test_stop_request_finishes_the_step_and_saves(tiny_model_dir):
    saved = []
    ctx, _ = _context(tiny_model_dir, saved=saved, stop=lambda: len(saved) >= 0 and True)
    state, status = fit(ctx, LoopState())
    assert status == "stopped" and state.step == 1 and saved == [(1, False)]


def test_early_stopping_after_patience(tiny_model_dir):
    ctx, sink = _context(tiny_model_dir, ["eval.every_steps=1", "eval.early_stop_patience=2", "train.epochs=20",
                                          "optim.lr=0.5", "optim.max_grad_norm=0"])
    state, status = fit(ctx, LoopState())
    assert status == "early_stopped"
    assert state.evals_since_best == 2 and state.step < ctx.total_steps
    assert any("early stop" in e["message"] for e in sink.of_type("log"))


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tiny_model_dir, tmp_path):
    import torch

    from ft_desk.trainer.training import checkpoint as ckpt

    ctx, _ = _context(tiny_model_dir, ["train.max_steps=0", "train.epochs=1"])
    state, _ = fit(ctx, LoopState())
    torch.manual_seed(1234)
    folder = ckpt.save_checkpoint(tmp_path, ctx.model, ctx.optimizer, ctx.cfg, state)
    expected_rng = torch.rand(3)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
                     "rng.safetensors", "trainer_state.json"]
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in folder.iterdir())

    fresh, _ = _context(tiny_model_dir, ["train.epochs=1"])
    restored = ckpt.load_checkpoint(folder, fresh.model, fresh.optimizer, fresh.cfg)
    assert restored.step == state.step and restored.micro_index == state.micro_index
    assert torch.equal(torch.rand(3), expected_rng)
    a = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in fresh.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = ctx.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert math.isclose(fresh.optimizer.param_groups[0]["lr"], ctx.optimizer.param_groups[0]["lr"])


def test_checkpoint_refuses_non_finite_weights(tiny_model_dir, tmp_path):
    import torch

    from ft_desk.trainer.training import checkpoint as ckpt

    ctx, _ = _context(tiny_model_dir)
    with torch.no_grad():
        next(p for p in ctx.model.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="non-finite"):
        ckpt.save_checkpoint(tmp_path, ctx.model, ctx.optimizer, ctx.cfg, LoopState(step=1))
    assert not list(Path(tmp_path).glob("checkpoints/step-*"))


@pytest.mark.parametrize("overrides", [
    ["train.method=lora"],
    ["train.method=full", "optim.lr=1e-3"],
    ["lora.use_dora=true"],
    ["train.gradient_checkpointing=true"],
    ["train.packing=false"],
], ids=["lora", "full", "dora", "checkpointing", "no-packing"])
def test_every_method_and_option_trains(tiny_model_dir, overrides):
    ctx, sink = _context(tiny_model_dir, ["train.epochs=2", *overrides])
    state, status = fit(ctx, LoopState())
    evals = sink.of_type("eval")
    assert status == "completed"
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    if "train.method=full" in overrides:
        assert all(p.requires_grad for p in ctx.model.parameters())
    else:
        assert any("lora_" in n for n, p in ctx.model.named_parameters() if p.requires_grad)


def test_gradient_checkpointing_does_not_change_the_loss(tiny_model_dir):
    import torch

    losses = []
    for flag in ("false", "true"):
        ctx, _ = _context(tiny_model_dir, [f"train.gradient_checkpointing={flag}", "lora.dropout=0"])
        batch = __import__("ft_desk.trainer.data.batching", fromlist=["collate"]).collate(
            ctx.train_examples, ctx.schedule[0], ctx.pad_id, "cpu", True)
        ctx.model.train()
        loss = causal_lm_loss(ctx.model, batch, 64)
        loss.backward()
        grads = [p.grad.clone() for p in ctx.model.parameters() if p.requires_grad and p.grad is not None]
        losses.append((loss.item(), grads))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    assert len(losses[0][1]) == len(losses[1][1]) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(losses[0][1], losses[1][1]))


def test_the_epoch_counts_passes_over_the_data_when_max_steps_sets_the_run_length(tiny_model_dir):
    # With train.max_steps the schedule is the epoch schedule repeated to length, whatever train.epochs says.
    import dataclasses

    ctx, sink = _context(tiny_model_dir, ["train.epochs=1", "eval.every_steps=0"])
    one_pass = len(ctx.schedule)
    ctx = dataclasses.replace(ctx, schedule=list(ctx.schedule) * 2, batches_per_epoch=one_pass)
    fit(ctx, LoopState())
    epochs = [e["epoch"] for e in sink.of_type("step")]
    assert epochs[-1] == pytest.approx(2.0)
    assert epochs[len(epochs) // 2 - 1] == pytest.approx(1.0)
