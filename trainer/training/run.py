"""One training run from start to finish, litgpt-style plain functions that read top to bottom:

  train()   start a new run folder or resume one, then always end with a run_finished event and the final state
  setup()   device, model, data, schedule, optimizer and the resumed checkpoint -> a `RunSetup`
  fit()     the training loop (training/loop.py), with checkpoints and progress recorded in the run folder
  finish()  the best weights become the final weights (written atomically), after-samples, final state

This is what `ft-desk train` and `ft-desk demo` execute, and what the TUI launches as a child process. What the
run folder holds, and how state.json is written, is run_folder.py's contract.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ft_desk.quant.device import resolve_device
from ft_desk.quant.policy import torch_dtype
from ft_desk.trainer import run_folder
from ft_desk.trainer.atomic import fsync_folder, fsync_tree, write_text
from ft_desk.trainer.chat_format import stop_token_ids
from ft_desk.trainer.config import RunConfig
from ft_desk.trainer.data.batching import MicroBatch, schedule
from ft_desk.trainer.data.prepare import PreparedData, generation_prompt, prepare_data, write_examples_jsonl
from ft_desk.trainer.data.render import text_split_notes
from ft_desk.trainer.errors import OutOfMemory, UserError
from ft_desk.trainer.events import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    EventSink,
    FanOut,
    FileSink,
    make_event,
)
from ft_desk.trainer.generation import generate
from ft_desk.trainer.hub.credentials import redact
from ft_desk.trainer.paths import runs_home
from ft_desk.trainer.training import checkpoint as ckpt
from ft_desk.trainer.training.loop import FitContext, LoopState, fit, memory_in_use
from ft_desk.trainer.training.model import (
    LoadedInfo,
    load_base,
    load_run_config,
    load_weights,
    prepare_for_training,
    save_weights,
)

log = logging.getLogger("ft_desk")

OOM_HINT = ("lower train.micro_batch_size (raise train.grad_accum to keep the batch), lower data.max_length, "
            "or turn on train.gradient_checkpointing; `ft-desk plan` shows what fits")
OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory")
"""How allocators say it: CUDA and MPS "out of memory", torch's CPU allocator "can't allocate memory"."""
PROGRESS_EVERY_S = 5.0
"""Note: how often state.json's step is rewritten between checkpoints (an fsynced write each time)."""


def new_run_dir(cfg: RunConfig) -> Path:
    """A new, empty run folder named by output.run_name or after the model and method."""
    name = cfg.output.run_name or run_folder.default_run_name(cfg.model.name, cfg.train.method)
    return run_folder.create_run_dir(runs_home(cfg.output.runs_dir), name)


class _RedactingFormatter(logging.Formatter):
    """Log lines with any Hugging Face token masked: a token must never reach a run folder."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(run_dir: Path) -> logging.Handler:
    """Diagnostics (ours and the libraries') go to RUN_DIR/run.log."""
    handler = logging.FileHandler(run_folder.log_path(run_dir), encoding="utf-8")
    handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return handler


@dataclass
class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, saves a checkpoint and returns."""

    requested: bool = False
    signal_name: str = ""

    def install(self) -> None:
        def handler(signum, _frame):
            if self.requested:  # a second Ctrl-C: stop right now
                raise KeyboardInterrupt
            self.requested = True
            self.signal_name = signal.Signals(signum).name

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        if hasattr(signal, "SIGHUP"):
            # A closed terminal must not kill a detached run.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)


# ------------------------------------------------------------------ failures

def as_out_of_memory(exc: BaseException) -> OutOfMemory | None:
    """An OutOfMemory for an allocator failure (torch's OutOfMemoryError, or a CUDA / MPS / CPU allocator error
    that says "out of memory"), None for anything else."""
    if isinstance(exc, OutOfMemory):
        return exc
    if isinstance(exc, UserError):
        return None  # our own sentence already; it may quote a setting that mentions memory
    text = str(exc).lower()
    if type(exc).__name__ == "OutOfMemoryError" or any(words in text for words in OOM_WORDS):
        return OutOfMemory("the device ran out of memory", hint=OOM_HINT)
    return None


def _explain_failure(exc: BaseException) -> tuple[str, str]:
    """(error sentence, hint) for an unexpected exception that escaped the run."""
    name = type(exc).__name__
    text = str(exc)
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        return ("the disk is full", "free some space or set output.runs_dir to a folder on a larger disk")
    return (f"internal error: {name}: {text.splitlines()[0] if text else ''}".rstrip(": "),
            "see run.log in the run folder for the traceback")


def failure_outcome(exc: BaseException) -> dict[str, Any]:
    """How a run that raised ends: status, exit code and the sentence + hint the user sees."""
    if isinstance(exc, KeyboardInterrupt):
        return {"status": "stopped", "exit_code": EXIT_STOPPED, "error": "interrupted twice: stopped without "
                "a final checkpoint", "hint": "resume from the last checkpoint with ft-desk train --resume"}
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    oom = as_out_of_memory(exc)
    if oom is not None:
        # Not bad input: the same settings may fit another device, so it exits as a failure, trace in run.log.
        log.error("run ran out of memory:\n%s", trace)
        return {"status": "failed", "exit_code": EXIT_FAILED, "error": oom.message, "hint": oom.hint}
    if isinstance(exc, UserError):
        log.info("run failed: %s", exc.full())
        return {"status": "failed", "exit_code": EXIT_BAD_INPUT, "error": exc.message, "hint": exc.hint or None}
    log.error("run crashed:\n%s", trace)
    error, hint = _explain_failure(exc)
    return {"status": "failed", "exit_code": EXIT_FAILED, "error": error, "hint": hint}


# ------------------------------------------------------------------ start / resume -> setup -> fit -> finish

def train(cfg: RunConfig | None, sink: EventSink, resume_dir: Path | None = None,
          stop: StopFlag | None = None) -> tuple[int, Path | None]:
    """Run (or resume) a training run; every outcome ends with a run_finished event. Returns (exit code, run dir)."""
    started = time.time()
    stop = stop or StopFlag()
    if resume_dir is not None:
        run_dir = Path(resume_dir).expanduser().resolve()
        cfg = load_run_config(run_dir)
        previous = run_folder.read_state(run_dir)
        if run_folder.judged_status(previous) == run_folder.RUNNING:
            raise UserError(f"{run_dir} is still running (pid {previous.get('pid')})",
                            hint="attach to it in the app, or stop it first")
    else:
        assert cfg is not None
        run_dir = new_run_dir(cfg)
        write_text(run_folder.config_path(run_dir), cfg.to_json())
        now = run_folder.now_iso()
        run_folder.write_state(run_dir, {
            "status": "running", "pid": os.getpid(), "step": 0, "total_steps": None, "best_step": None,
            "best_val_loss": None, "model_name": cfg.model.name, "method": cfg.train.method,
            "created": now, "updated": now, "run_name": run_dir.name,
        })
    file_sink = FileSink(run_folder.events_path(run_dir))
    sinks = FanOut(file_sink, sink)
    handler = setup_logging(run_dir)
    run_folder.update_state(run_dir, status="running", pid=os.getpid())
    try:
        run = setup(cfg, run_dir, sinks, resumed=resume_dir is not None)
        if run.start.step == 0:  # a resumed run showed its before-samples the first time
            emit_samples(run, sinks, "before")
        state, status = fit_run(run, sinks, stop)
        finish(run, sinks, state, status, stop)
        outcome = {"status": "stopped" if status == "stopped" else "completed",
                   "exit_code": EXIT_STOPPED if status == "stopped" else EXIT_OK, "error": None, "hint": None}
    except BaseException as exc:  # noqa: BLE001 - every failure must end as an event, and the log gets the trace
        outcome = failure_outcome(exc)
    for key in ("error", "hint"):
        if outcome[key]:
            outcome[key] = redact(outcome[key])
    state_now = run_folder.read_state(run_dir)
    sinks.emit(make_event(
        "run_finished", status=outcome["status"], exit_code=outcome["exit_code"], error=outcome["error"],
        hint=outcome["hint"], best_val_loss=state_now.get("best_val_loss"), best_step=state_now.get("best_step"),
        final_step=state_now.get("step"), adapter_path=state_now.get("final_adapter"), run_dir=str(run_dir),
        elapsed_s=time.time() - started,
    ))
    run_folder.update_state(run_dir, status=outcome["status"], error=outcome["error"], hint=outcome["hint"],
                            exit_code=outcome["exit_code"])
    file_sink.close()
    logging.getLogger().removeHandler(handler)
    handler.close()
    return outcome["exit_code"], run_dir


@dataclass(frozen=True)
class RunSetup:
    """Everything `setup` built for one run; fit and finish only read it."""

    cfg: RunConfig
    run_dir: Path
    device: str
    model: Any
    tokenizer: Any
    info: LoadedInfo
    data: PreparedData
    schedule: Sequence[MicroBatch]
    val_batches: Sequence[MicroBatch]
    optimizer: Any
    start: LoopState
    """The loop state to continue from: step 0, or the resumed checkpoint's."""
    prompts: Sequence[tuple[list[int], str]]
    """(prompt ids, reference) of the validation examples sampled before and after training."""


def setup(cfg: RunConfig, run_dir: Path, sink: EventSink, resumed: bool) -> RunSetup:
    """Load and build everything, and tell the sink what the run is (run_started, data_ready, model_loaded)."""
    import torch  # heavy import: a run really starts here

    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)

    model, tokenizer, info = load_base(cfg, device)
    model = prepare_for_training(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = prepare_data(cfg.data, tokenizer)
    if not data.train:
        raise UserError("no training examples are left after reading and cleaning the data",
                        hint="check the file with: ft-desk data check FILE")
    write_examples_jsonl(data.val_examples, run_folder.val_path(run_dir))

    plan = train_schedule(cfg, data.train)
    val_plan = schedule(data.val, max_length=cfg.data.max_length, micro_batch_size=cfg.train.micro_batch_size,
                        packing=cfg.train.packing, seed=cfg.train.seed, epochs=1.0)
    if cfg.eval.max_batches:
        val_plan = val_plan[: cfg.eval.max_batches]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    start = LoopState()
    if resumed:
        folder = ckpt.latest(run_dir)
        if folder is not None:
            start = ckpt.load_checkpoint(folder, model, optimizer, cfg)
    total_steps = -(-len(plan) // cfg.train.grad_accum)

    sink.emit(make_event("run_started", run_dir=str(run_dir), run_name=run_dir.name, model=cfg.model.name,
                         method=cfg.train.method, device=device, total_steps=total_steps,
                         resumed_from_step=start.step, config=cfg.to_dict()))
    sink.emit(make_event("data_ready", train_rows=len(data.train), val_rows=len(data.val),
                         train_tokens=sum(len(e.input_ids) for e in data.train), format=data.format,
                         truncated=data.stats.get("truncated", 0),
                         duplicates_dropped=data.stats.get("duplicates_dropped", 0),
                         skipped_rows=data.stats.get("skipped_rows", 0)))
    sink.emit(make_event("model_loaded", params=info.params, trainable_params=trainable, dtype=info.dtype,
                         quantized=info.quantized, load_seconds=info.load_seconds,
                         memory_bytes=memory_in_use(device), model_dir=info.model_dir))
    run_folder.update_state(run_dir, total_steps=total_steps, model_dir=info.model_dir, device=device)

    prompts = [generation_prompt(ex, tokenizer, cfg.data) for ex in data.val_examples[: cfg.eval.sample_prompts]]
    return RunSetup(cfg=cfg, run_dir=run_dir, device=device, model=model, tokenizer=tokenizer, info=info, data=data,
                    schedule=plan, val_batches=val_plan, optimizer=optimizer, start=start, prompts=prompts)


def epoch_schedule(cfg: RunConfig, examples: Sequence, epochs: float) -> list[MicroBatch]:
    """The micro-batches of `epochs` passes over `examples` with the run's batching settings."""
    return schedule(examples, max_length=cfg.data.max_length, micro_batch_size=cfg.train.micro_batch_size,
                    packing=cfg.train.packing, seed=cfg.train.seed, epochs=epochs)


def train_schedule(cfg: RunConfig, examples: Sequence) -> list[MicroBatch]:
    """The micro-batches of the whole run: cfg.train.epochs of them, or exactly max_steps optimizer steps."""
    def epochs_of(epochs: float) -> list[MicroBatch]:
        return epoch_schedule(cfg, examples, epochs)

    plan = epochs_of(cfg.train.epochs)
    if cfg.train.max_steps:
        # Repeat the epoch schedule as needed to reach exactly max_steps optimizer steps.
        need = cfg.train.max_steps * cfg.train.grad_accum
        epochs = 1.0
        while len(plan) < need:
            epochs += 1
            plan = epochs_of(epochs)
        plan = plan[:need]
    return plan


def sample_outputs(run: RunSetup, prompts: Sequence[tuple[list[int], str]]) -> list[str]:
    """The model's greedy continuation of each prompt, stopping at the chat template's turn end."""
    stop_ids = stop_token_ids(run.tokenizer, vocabulary_fallback=True)
    outputs = generate(run.model, run.tokenizer, [ids for ids, _ in prompts],
                       max_new_tokens=run.cfg.eval.max_new_tokens, stop_ids=stop_ids, device=run.device)
    return [output.text for output in outputs]


def emit_samples(run: RunSetup, sink: EventSink, phase: str) -> None:
    """One `sample` event per sampled validation prompt: what the model writes `before` or `after` training."""
    if not run.prompts:
        return
    n = len(run.prompts)
    when = "before step 1" if phase == "before" else "training done"
    sink.emit(make_event("log", level="info", message=(
        f"{when}: the model answers {n} held-out prompt{'s' if n != 1 else ''} (up to "
        f"{run.cfg.eval.max_new_tokens} tokens each; eval.sample_prompts=0 skips this)…")))
    if phase == "before":
        for note in text_split_notes(run.data.val_examples[: run.cfg.eval.sample_prompts]):
            sink.emit(make_event("log", level="info", message=f"samples: {note}"))
    outputs = sample_outputs(run, run.prompts)
    for index, ((ids, reference), output) in enumerate(zip(run.prompts, outputs)):
        sink.emit(make_event("sample", phase=phase, index=index, output=output, reference=reference,
                             prompt=run.tokenizer.decode(ids, skip_special_tokens=False)))


def save_checkpoint(run: RunSetup, sink: EventSink, loop_state: LoopState, is_best: bool) -> str:
    """The loop's save hook: write the checkpoint, prune old ones, and record it in events and state.json."""
    folder = ckpt.save_checkpoint(run.run_dir, run.model, run.optimizer, run.cfg, loop_state)
    ckpt.prune(run.run_dir, run.cfg.output.keep_last, loop_state.best_step)
    sink.emit(make_event("checkpoint", step=loop_state.step, path=str(folder), is_best=is_best))
    run_folder.update_state(run.run_dir, step=loop_state.step, best_step=loop_state.best_step,
                            best_val_loss=loop_state.best_val_loss)
    return str(folder)


class ProgressRecorder:
    """The loop's progress hook: state.json's step, best step and loss, at most every PROGRESS_EVERY_S seconds
    (`ft-desk runs` and a re-attaching app read it)."""

    def __init__(self, run_dir: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.run_dir, self.clock, self.last = run_dir, clock, 0.0

    def __call__(self, loop_state: LoopState) -> None:
        if self.clock() - self.last > PROGRESS_EVERY_S:
            self.last = self.clock()
            run_folder.update_state(self.run_dir, step=loop_state.step, best_step=loop_state.best_step,
                                    best_val_loss=loop_state.best_val_loss)


def autocast_for(run: RunSetup) -> Callable | None:
    """Mixed precision for a full fine-tune on an accelerator (fp32 master weights); None elsewhere."""
    if run.cfg.train.method != "full" or run.device == "cpu":
        return None
    import torch  # heavy import, already loaded by setup

    return functools.partial(torch.autocast, device_type=run.device, dtype=torch_dtype(run.info.dtype))


def fit_run(run: RunSetup, sink: EventSink, stop: StopFlag) -> tuple[LoopState, str]:
    """Train with loop.fit from `run.start`; returns (final loop state, "completed" | "stopped" | ...)."""
    ctx = FitContext(model=run.model, optimizer=run.optimizer, cfg=run.cfg, train_examples=run.data.train,
                     val_examples=run.data.val, schedule=run.schedule, val_batches=run.val_batches,
                     pad_id=run.tokenizer.pad_token_id, device=run.device, sink=sink,
                     save_checkpoint=functools.partial(save_checkpoint, run, sink),
                     should_stop=lambda: stop.requested, autocast=autocast_for(run),
                     on_progress=ProgressRecorder(run.run_dir),
                     batches_per_epoch=len(epoch_schedule(run.cfg, run.data.train, 1.0)))
    return fit(ctx, run.start)


def finish(run: RunSetup, sink: EventSink, state: LoopState, status: str, stop: StopFlag) -> None:
    """A stopped run just records its step. A finished one: the best checkpoint's weights (when validation picked
    one) become the final weights in adapter/ (model/ for full), then after-samples and the final state."""
    cfg, run_dir = run.cfg, run.run_dir
    if status == "stopped":
        sink.emit(make_event("log", level="info", message=f"stopped by {stop.signal_name or 'request'} at step "
                             f"{state.step}; resume with: ft-desk train --resume {run_dir}"))
        run_folder.update_state(run_dir, step=state.step)
        return

    if state.best_step is not None and state.best_step != state.step:
        best = run_folder.step_folder(run_dir, state.best_step)
        if best.is_dir():
            load_weights(run.model, cfg, best)
            sink.emit(make_event("log", level="info",
                                 message=f"final weights are the best checkpoint (step {state.best_step}, "
                                         f"val loss {state.best_val_loss:.4f})"))
    final = write_final_weights(run)
    emit_samples(run, sink, "after")
    run_folder.update_state(run_dir, step=state.step, best_step=state.best_step, best_val_loss=state.best_val_loss,
                            final_adapter=str(final))


def write_final_weights(run: RunSetup) -> Path:
    """The model's trained weights and the tokenizer, staged in a hidden folder, fsynced, then renamed in place."""
    final = run_folder.final_weights_dir(run.run_dir, run.cfg.train.method)
    tmp = run.run_dir / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(run.model, run.cfg, tmp)
    run.tokenizer.save_pretrained(tmp)
    fsync_tree(tmp)
    if final.exists():  # a resumed run that had finished once already
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_folder(run.run_dir)
    return final
