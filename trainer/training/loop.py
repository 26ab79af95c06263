"""The training loop: one explicit function, `fit`, that reads top to bottom.

Design for speed and memory (see also data/batching.py and training/loss.py):
- Batches are packed rows with a block-diagonal mask: no compute spent on padding.
- The loss (loss.py) is computed from the decoder's hidden states at labelled positions only, in chunks of
  `train.loss_chunk_tokens`, each chunk recomputed in backward; full-vocabulary fp32 logits never exist at once.
- Host-side token counts normalise the loss, so nothing waits on the device inside a step. The device is
  synchronised once per optimizer step (the finiteness of the gradient norm) and at log intervals (loss value).
Everything a step needs is passed in (loss function, schedule, sink, clock, stop flag) so tests drive the real
loop with fakes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from ft_desk.trainer.config import RunConfig
from ft_desk.trainer.data.batching import MicroBatch, collate
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.events import EventSink, make_event
from ft_desk.trainer.training.loss import causal_lm_loss


class NonFiniteLoss(UserError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class LoopState:
    """Everything about the loop's progress that a checkpoint must restore (JSON-serialisable)."""

    step: int = 0  # optimizer steps done
    micro_index: int = 0  # next micro-batch of the schedule
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    bad_steps_in_row: int = 0
    skipped_steps: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    last_val_loss: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # recent step losses, for the summary

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoopState":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, schedule: str) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`: linear warmup, then the chosen decay."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def memory_in_use(device: str) -> int:
    """Bytes the run holds on its device: allocator peak on CUDA, allocated on MPS, resident set on CPU."""
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    if device == "mps":
        return int(torch.mps.driver_allocated_memory())
    import psutil

    return int(psutil.Process().memory_info().rss)


def evaluate_loss(model, examples: Sequence, batches: Sequence[MicroBatch], *, pad_id: int, device: str,
                  packing: bool, chunk_tokens: int, loss_fn=causal_lm_loss, autocast=None) -> float | None:
    """Mean per-token validation loss (None without validation data)."""
    import torch

    if not batches:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.no_grad():
        for mb in batches:
            if not mb.rows:  # an empty piece of a micro-batch cut after running out of memory (replan.py)
                continue
            batch = collate(examples, mb, pad_id, device, packing)
            with autocast() if autocast else _null():
                total += loss_fn(model, batch, chunk_tokens).double()
            count += mb.target_tokens
    if was_training:
        model.train()
    return float(total.item()) / max(1, count)  # one sync per validation pass


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@dataclass
class FitContext:
    """What `fit` works on. Built by training/run.py; tests build it directly with fakes."""

    model: Any
    optimizer: Any
    cfg: RunConfig
    train_examples: Sequence
    val_examples: Sequence
    schedule: Sequence[MicroBatch]
    val_batches: Sequence[MicroBatch]
    pad_id: int
    device: str
    sink: EventSink
    save_checkpoint: Callable[[LoopState, bool], str | None]  # (state, is_best) -> folder written
    should_stop: Callable[[], bool] = lambda: False
    loss_fn: Callable = causal_lm_loss
    clock: Callable[[], float] = time.perf_counter
    autocast: Callable | None = None
    memory: Callable[[], int] | None = None
    on_progress: Callable[[LoopState], None] | None = None
    saved_activations: Any | None = None
    """A BF16SavedActivations (saved_activations.py) entered around each training forward pass, or None."""
    batches_per_epoch: int | None = None
    """Micro-batches in one pass over the training data; None when the schedule is exactly cfg.train.epochs
    passes (with train.max_steps it is cut or repeated to length, so the epoch must be counted from this)."""

    @property
    def total_steps(self) -> int:
        return math.ceil(len(self.schedule) / self.cfg.train.grad_accum)


def fit(ctx: FitContext, state: LoopState) -> tuple[LoopState, str]:
    """Train from `state` to the end of the schedule. Returns (state, status) with status
    completed | stopped (stop requested) | early_stopped."""
    import torch  # heavy import

    cfg = ctx.cfg
    model, optimizer = ctx.model, ctx.optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total_steps = ctx.total_steps
    accum = cfg.train.grad_accum
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
    memory = ctx.memory or (lambda: memory_in_use(ctx.device))

    def run_eval() -> None:
        val = evaluate_loss(model, ctx.val_examples, ctx.val_batches, pad_id=ctx.pad_id, device=ctx.device,
                            packing=cfg.train.packing, chunk_tokens=cfg.train.loss_chunk_tokens,
                            loss_fn=ctx.loss_fn, autocast=ctx.autocast)
        if val is None:
            return
        is_best = state.best_val_loss is None or val < state.best_val_loss
        state.last_val_loss = val
        if is_best:
            state.best_val_loss, state.best_step, state.evals_since_best = val, state.step, 0
        else:
            state.evals_since_best += 1
        ctx.sink.emit(make_event("eval", step=state.step, val_loss=val, perplexity=math.exp(min(val, 50.0)),
                                 best_val_loss=state.best_val_loss, is_best=is_best))
        return is_best

    if state.step == 0 and ctx.val_batches:
        n = len(ctx.val_batches)
        limit = ("eval.max_batches limits it" if not cfg.eval.max_batches
                 else f"eval.max_batches={cfg.eval.max_batches}")
        ctx.sink.emit(make_event("log", level="info", message=(
            f"before step 1: measuring the starting validation loss over {n} batch{'es' if n != 1 else ''} "
            f"({limit})…")))
        run_eval()  # the starting point of the validation curve

    model.train()
    window_start = ctx.clock()
    window_tokens = 0
    loss_acc = torch.zeros((), dtype=torch.float32, device=ctx.device)
    window_denom = 0
    step_seconds: list[float] = []

    while state.step < total_steps:
        step_started = ctx.clock()
        window = ctx.schedule[state.micro_index : state.micro_index + accum]
        denom = sum(mb.target_tokens for mb in window) or 1
        step_loss = torch.zeros((), dtype=torch.float32, device=ctx.device)
        for mb in window:
            if not mb.rows:  # an empty piece of a micro-batch cut after running out of memory (replan.py)
                continue
            batch = collate(ctx.train_examples, mb, ctx.pad_id, ctx.device, cfg.train.packing)
            with ctx.autocast() if ctx.autocast else _null(), ctx.saved_activations or _null():
                loss_sum = ctx.loss_fn(model, batch, cfg.train.loss_chunk_tokens)
            (loss_sum / denom).backward()
            if ctx.saved_activations is not None:
                ctx.saved_activations.release()
            step_loss += loss_sum.detach().float()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        finite = bool(torch.isfinite(norm) & torch.isfinite(step_loss))  # the one sync of an optimizer step
        lr = lr_at(state.step, total_steps, cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.schedule)
        if finite:
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            state.bad_steps_in_row = 0
        else:
            state.skipped_steps += 1
            state.bad_steps_in_row += 1
            ctx.sink.emit(make_event("log", level="warning",
                                     message=f"step {state.step + 1}: non-finite loss or gradient, step skipped "
                                             f"({state.bad_steps_in_row} in a row)"))
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.micro_index += len(window)
        tokens = sum(mb.tokens for mb in window)
        state.tokens_seen += tokens
        window_tokens += tokens
        if finite:
            loss_acc += step_loss
            window_denom += denom
        if state.bad_steps_in_row >= cfg.train.max_bad_steps:
            raise NonFiniteLoss(
                f"the loss was not finite for {state.bad_steps_in_row} steps in a row, so training stopped "
                f"(no checkpoint with NaN was written)",
                hint="lower optim.lr (e.g. --set optim.lr=5e-5), keep optim.max_grad_norm at 1.0, "
                     "or use float32/bfloat16 instead of float16",
            )
        took = ctx.clock() - step_started
        state.train_seconds += took
        step_seconds.append(took)

        last = state.step == total_steps
        if state.step % cfg.train.log_every == 0 or last:
            now = ctx.clock()
            elapsed = max(now - window_start, 1e-9)
            loss_value = float((loss_acc / max(1, window_denom)).item()) if window_denom else float("nan")
            recent = step_seconds[-20:]
            eta = (total_steps - state.step) * (sum(recent) / len(recent))
            event = make_event(
                "step", step=state.step, total_steps=total_steps,
                epoch=_epoch_of(ctx, state.micro_index), loss=loss_value, lr=lr,
                grad_norm=float(norm.item()) if finite else None, tokens=state.tokens_seen,
                tokens_per_s=window_tokens / elapsed, elapsed_s=state.train_seconds, eta_s=eta,
                memory_bytes=memory(), skipped_steps=state.skipped_steps,
            )
            ctx.sink.emit(event)
            state.history = (state.history + [{"step": state.step, "loss": loss_value}])[-200:]
            loss_acc.zero_()
            window_denom = 0
            window_tokens = 0
            window_start = ctx.clock()

        is_best = False
        eval_due = cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0
        if (eval_due or last) and ctx.val_batches:
            is_best = bool(run_eval())
        save_due = cfg.output.save_every and state.step % cfg.output.save_every == 0
        stop = ctx.should_stop()
        early = (cfg.eval.early_stop_patience and state.evals_since_best >= cfg.eval.early_stop_patience)
        if save_due or is_best or last or stop or early:
            ctx.save_checkpoint(state, is_best)
        if ctx.on_progress:
            ctx.on_progress(state)
        if stop:
            return state, "stopped"
        if early:
            ctx.sink.emit(make_event("log", level="info",
                                     message=f"early stop: no better validation loss for "
                                             f"{state.evals_since_best} evaluations (best at step {state.best_step})"))
            return state, "early_stopped"
        # Keep the clock for tokens/s on training only: evaluation and checkpointing are excluded.
        if eval_due or save_due:
            window_start = ctx.clock()
    return state, "completed"


def _epoch_of(ctx: FitContext, micro_index: int) -> float:
    """Epochs done, as a fraction, from the position in the schedule."""
    if ctx.batches_per_epoch:
        return round(micro_index / ctx.batches_per_epoch, 3)
    return round(ctx.cfg.train.epochs * micro_index / max(1, len(ctx.schedule)), 3)
