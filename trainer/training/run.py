"""One training run from start to finish, litgpt-style plain functions that read top to bottom:

  train()   start a new run folder or resume one, then always end with a run_finished event and the final state
  setup()   device, model, data, schedule, optimizer and the resumed checkpoint -> a `RunSetup`
  fit()     the training loop (training/loop.py), with checkpoints and progress recorded in the run folder
  finish()  the best weights become the final weights (written atomically), after-samples, final state

This is what `ft-desk train` and `ft-desk demo` execute, and what the TUI launches as a child process. What the
run folder holds, and how state.json is written, is run_folder.py's contract.
"""

from __future__ import annotations

import dataclasses
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

from ft_desk.quant.device import TRAINING_CAPS_CPU_ALLOCATOR, cap_cpu_allocator, probe_facts, resolve_device
from ft_desk.quant.mps_probe import watch_cpu_fallbacks
from ft_desk.quant.policy import torch_dtype
from ft_desk.trainer import run_folder
from ft_desk.trainer.atomic import fsync_folder, fsync_tree, write_text
from ft_desk.trainer.chat_format import stop_token_ids
from ft_desk.trainer.config import RunConfig
from ft_desk.trainer.config import replace as replace_config
from ft_desk.trainer.data.batching import MicroBatch, schedule
from ft_desk.trainer.data.prepare import PreparedData, generation_prompt, write_examples_jsonl
from ft_desk.trainer.data.render import text_split_notes
from ft_desk.trainer.data.token_cache import prepare_data_cached
from ft_desk.trainer.errors import (
    MPS_OOM_LEVER,
    DiskFull,
    OutOfMemory,
    UserError,
    device_failure,
    is_disk_full,
    mps_out_of_memory,
)
from ft_desk.trainer.events import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    EventSink,
    FanOut,
    FileSink,
    format_bytes,
    make_event,
)
from ft_desk.trainer.generation import generate
from ft_desk.trainer.hub.credentials import redact
from ft_desk.trainer.hub.resolve import resolve_model_dir
from ft_desk.trainer.limits import MAX_MICRO_BATCHES
from ft_desk.trainer.paths import runs_home
from ft_desk.trainer.planning import SAME_RESULT_KEYS, four_bit_likely, plan_run
from ft_desk.trainer.recipe_sizing import row_length, size_batches, token_limit
from ft_desk.trainer.training import checkpoint as ckpt
from ft_desk.trainer.training import replan
from ft_desk.trainer.training.awake import keep_awake
from ft_desk.trainer.training.loop import FitContext, LoopState, fit, memory_in_use
from ft_desk.trainer.training.model import (
    LoadedInfo,
    load_base,
    load_run_config,
    load_tokenizer,
    load_weights,
    prepare_for_training,
    read_model_config,
    save_weights,
)
from ft_desk.trainer.training.saved_activations import (
    BF16SavedActivations,
    feature_widths,
    saved_activations_dtype,
)
from ft_desk.trainer.training.threads import ThreadFollower, apply_threads

log = logging.getLogger("ft_desk")

OOM_HINT = ("lower train.micro_batch_size (raise train.grad_accum to keep the batch), lower data.max_length, "
            "or turn on train.gradient_checkpointing; `ft-desk plan` shows what fits")
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


class _RunLogHandler(logging.FileHandler):
    """RUN_DIR/run.log. A line that cannot be written (the disk is full) is dropped: logging's default would print
    a traceback on the user's terminal."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass

    def close(self) -> None:
        try:
            super().close()
        except OSError:
            pass


def setup_logging(run_dir: Path) -> logging.Handler:
    """Diagnostics (ours and the libraries') go to RUN_DIR/run.log."""
    handler = _RunLogHandler(run_folder.log_path(run_dir), encoding="utf-8")
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
                _say_now("ft-desk: stopping now, without a checkpoint; resume from the last one with "
                         "ft-desk train --resume RUN_DIR\n")
                raise KeyboardInterrupt
            self.requested = True
            self.signal_name = signal.Signals(signum).name
            _say_now(f"ft-desk: {self.signal_name} received: stopping after the current step and saving a "
                     "checkpoint (Ctrl-C again stops at once, without one)\n")

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        if hasattr(signal, "SIGHUP"):
            # A closed terminal must not kill a detached run.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _say_now(text: str) -> None:
    """Write to stderr from a signal handler: os.write, never print (the handler may interrupt a print)."""
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


# ------------------------------------------------------------------ failures

def as_out_of_memory(exc: BaseException) -> OutOfMemory | None:
    """An OutOfMemory for an allocator failure (torch's OutOfMemoryError, MemoryError, or a CUDA / MPS / CPU
    allocator error that says so, see replan.is_out_of_memory), None for anything else."""
    if isinstance(exc, OutOfMemory):
        return exc
    mac = mps_out_of_memory(str(exc))  # an Apple GPU's own numbers and levers
    if mac is not None:
        return OutOfMemory(mac, hint=f"{OOM_HINT}; {MPS_OOM_LEVER}")
    if replan.is_out_of_memory(exc):
        return OutOfMemory("the device ran out of memory", hint=OOM_HINT)
    return None


def as_disk_full(exc: BaseException, run_dir: Path | None = None, needed: int | None = None) -> DiskFull | None:
    """A DiskFull for a write that ran out of space (the checkpoint writer says how much it needed; anything else
    is told the run folder's free space and what a checkpoint of this run takes), None for anything else."""
    if isinstance(exc, DiskFull):
        return exc
    if not is_disk_full(exc):
        return None
    free = ""
    if run_dir is not None:
        try:
            free = f" ({format_bytes(shutil.disk_usage(run_dir).free)} free in {run_dir})"
        except OSError:
            pass
    need = f"; a checkpoint of this run needs about {format_bytes(needed)}" if needed else ""
    resume = f", then resume with: ft-desk train --resume {run_dir}" if run_dir is not None else ""
    return DiskFull(f"the disk is full{free}{need}; the checkpoints already written are intact",
                    hint=f"free some space or move the run folder to a larger disk{resume}")


def _explain_failure(exc: BaseException) -> tuple[str, str]:
    """(error sentence, hint) for an unexpected exception that escaped the run."""
    known = device_failure(str(exc))  # the GPU watchdog, an op the Apple GPU lacks
    if known is not None:
        return known
    name = type(exc).__name__
    text = str(exc)
    return (f"internal error: {name}: {text.splitlines()[0] if text else ''}".rstrip(": "),
            "see run.log in the run folder for the traceback")


def failure_outcome(exc: BaseException, run_dir: Path | None = None, needed: int | None = None) -> dict[str, Any]:
    """How a run that raised ends: status, exit code and the sentence + hint the user sees. Out of memory and a
    full disk are failures of the environment (exit 1), not bad input: the same settings fit elsewhere."""
    if isinstance(exc, KeyboardInterrupt):
        return {"status": "stopped", "exit_code": EXIT_STOPPED, "error": "interrupted twice: stopped without "
                "a final checkpoint", "hint": "resume from the last checkpoint with ft-desk train --resume"}
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    oom = as_out_of_memory(exc)
    if oom is not None:
        # Not bad input: the same settings may fit another device, so it exits as a failure, trace in run.log.
        log.error("run ran out of memory:\n%s", trace)
        return {"status": "failed", "exit_code": EXIT_FAILED, "error": oom.message, "hint": oom.hint}
    full = as_disk_full(exc, run_dir, needed)
    if full is not None:
        log.error("run stopped on a full disk:\n%s", trace)
        return {"status": "failed", "exit_code": EXIT_FAILED, "error": full.message, "hint": full.hint}
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
        previous = run_folder.read_state(run_dir)
        if run_folder.judged_status(previous, run_dir) == run_folder.RUNNING:
            raise UserError(f"{run_dir} is still running (pid {previous.get('pid')})",
                            hint="attach to it in the app, or stop it first")
        cfg = load_run_config(run_dir)  # a damaged config.json is said first, whatever the run's state
        if already_complete(run_dir, previous):
            return report_complete(run_dir, previous, sink), run_dir
        lock = run_folder.lock_run(run_dir)
    else:
        assert cfg is not None
        run_dir, lock = start_run_folder(cfg)
    run_folder.reserve_space(run_dir)
    file_sink = FileSink(run_folder.events_path(run_dir))
    sinks = FanOut(file_sink, sink)
    handler = setup_logging(run_dir)
    awake = keep_awake()  # macOS: no idle sleep while this process trains (caffeinate -i -w PID)
    if awake.message:
        sinks.emit(make_event("log", level="info" if awake.active else "warning", message=awake.message))
    checkpoint_bytes: list[int] = []  # known once the model is loaded, for a disk-full message
    try:
        run_folder.update_state(run_dir, status="running", pid=os.getpid())
        run = setup(cfg, run_dir, sinks, resumed=resume_dir is not None)
        checkpoint_bytes.append(ckpt.estimate_bytes(run.model, run.optimizer))
        if run.start.step == 0:  # a resumed run showed its before-samples the first time
            emit_samples(run, sinks, "before")
        state, status = fit_run(run, sinks, stop)
        finish(run, sinks, state, status, stop)
        outcome = {"status": "stopped" if status == "stopped" else "completed",
                   "exit_code": EXIT_STOPPED if status == "stopped" else EXIT_OK, "error": None, "hint": None}
    except BaseException as exc:  # noqa: BLE001 - every failure must end as an event, and the log gets the trace
        outcome = failure_outcome(exc, run_dir, checkpoint_bytes[-1] if checkpoint_bytes else None)
        if as_disk_full(exc) is not None:
            run_folder.release_space(run_dir)  # room for the last event, log lines and state.json
    for key in ("error", "hint"):
        if outcome[key]:
            outcome[key] = redact(outcome[key])
    state_now = run_folder.read_state(run_dir)
    finished = make_event(
        "run_finished", status=outcome["status"], exit_code=outcome["exit_code"], error=outcome["error"],
        hint=outcome["hint"], best_val_loss=state_now.get("best_val_loss"), best_step=state_now.get("best_step"),
        final_step=state_now.get("step"), adapter_path=state_now.get("final_adapter"), run_dir=str(run_dir),
        elapsed_s=time.time() - started,
    )
    # Written to the run folder and told to the caller separately: a full disk must not keep it from the caller.
    try:
        file_sink.emit(finished)
    except OSError as exc:
        log.error("cannot append the final event to %s: %s", run_folder.events_path(run_dir), exc)
    sink.emit(finished)
    run_folder.settle_state(run_dir, status=outcome["status"], error=outcome["error"], hint=outcome["hint"],
                            exit_code=outcome["exit_code"])
    run_folder.release_space(run_dir)
    awake.stop()
    try:
        file_sink.close()
    except OSError:
        pass
    logging.getLogger().removeHandler(handler)
    handler.close()
    lock.release()
    return outcome["exit_code"], run_dir


def start_run_folder(cfg: RunConfig):
    """(run folder, its lock): a new run folder with its config.json and first state.json, held by this process;
    on a full disk, nothing is left behind."""
    run_dir: Path | None = None
    lock = None
    try:
        run_dir = new_run_dir(cfg)
        lock = run_folder.lock_run(run_dir)
        write_text(run_folder.config_path(run_dir), redact(cfg.to_json()))
        now = run_folder.now_iso()
        run_folder.write_state(run_dir, {
            "status": "running", "pid": os.getpid(), "step": 0, "total_steps": None, "best_step": None,
            "best_val_loss": None, "model_name": cfg.model.name, "method": cfg.train.method,
            "created": now, "updated": now, "run_name": run_dir.name,
        })
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        home = runs_home(cfg.output.runs_dir)
        if lock is not None:
            lock.release()
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise DiskFull(f"the disk holding {home} is full: a new run cannot even write its settings",
                       hint="free some space (a run needs room for a few checkpoints), or set output.runs_dir "
                            "to a folder on a larger disk") from None
    return run_dir, lock


def already_complete(run_dir: Path, state: dict[str, Any]) -> bool:
    """A run that finished and still has its final weights: resuming it has nothing to do."""
    if state.get("status") != "completed":
        return False
    return any((folder / run_folder.ADAPTER_WEIGHTS).is_file() or (folder / run_folder.FULL_WEIGHTS).is_file()
               for folder in run_folder.final_weight_dirs(run_dir))


def report_complete(run_dir: Path, state: dict[str, Any], sink: EventSink) -> int:
    """`--resume` on a completed run: say so, to the caller only - the run folder is not touched at all."""
    weights = state.get("final_adapter") or next(
        (str(f) for f in run_folder.final_weight_dirs(run_dir) if f.is_dir()), "")
    sink.emit(make_event("log", level="info",
                         message=f"{run_dir.name} is already complete ({state.get('step')} steps, final weights in "
                                 f"{weights}); nothing to resume. Evaluate or export it, or start a new run to "
                                 f"train further"))
    sink.emit(make_event(
        "run_finished", status="completed", exit_code=EXIT_OK, error=None, hint=None,
        best_val_loss=state.get("best_val_loss"), best_step=state.get("best_step"), final_step=state.get("step"),
        adapter_path=state.get("final_adapter"), run_dir=str(run_dir), elapsed_s=0.0,
    ))
    return EXIT_OK


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
    identity: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What the checkpoints record about the run (config, data hash, base model) and a resume compares."""
    batch_split: int = 1
    """Pieces each scheduled micro-batch is cut into after running out of memory (replan.py); 1 normally."""
    fit_cfg: RunConfig | None = None
    """The config the loop trains with: `cfg` with the split's micro-batch and accumulation."""
    full_schedule: Sequence[MicroBatch] = ()
    full_val_batches: Sequence[MicroBatch] = ()
    """The schedules before any split, which every split is cut from."""


def setup(cfg: RunConfig, run_dir: Path, sink: EventSink, resumed: bool) -> RunSetup:
    """Load and build everything, and tell the sink what the run is (run_started, data_ready, model_loaded)."""
    import torch  # heavy import: a run really starts here

    device = resolve_device(cfg.train.device)
    if device == "cpu" and TRAINING_CAPS_CPU_ALLOCATOR:
        cap_cpu_allocator()  # freed activations go back to the OS instead of piling up (quant/device.py)
    threads = apply_threads(cfg.train.threads)  # 0: the cores other work leaves free (training/threads.py)
    log.info("torch uses %d CPU thread(s) (train.threads=%d)", threads, cfg.train.threads)
    torch.manual_seed(cfg.train.seed)

    watch_cpu_fallbacks(device, lambda text: sink.emit(make_event("log", level="warning", message=text)))
    # Data before weights: a bad file fails in seconds, and the batch is sized from it before the model loads.
    # A GGUF or Ollama base is imported here on first use; its progress goes to the run's events.
    model_dir = resolve_model_dir(cfg.model, on_event=sink.emit)
    tokenizer = load_tokenizer(model_dir, cfg.model)
    model_config = read_model_config(model_dir)
    context = model_config.get("max_position_embeddings")
    limit = token_limit(cfg.data.max_length, context if isinstance(context, int) else None)
    # A second run on the same data reuses the tokens (data/token_cache.py).
    prepared = prepare_data_cached(dataclasses.replace(cfg.data, max_length=limit), tokenizer)
    data = prepared.data
    if not data.train:
        raise UserError("no training examples are left after reading and cleaning the data",
                        hint="check the file with: ft-desk data check FILE")
    cfg, notes = size_to_data(cfg, data, device, model_config, run_dir, resumed)
    write_examples_jsonl(data.val_examples, run_folder.val_path(run_dir))

    model, tokenizer, info = load_base(cfg, device, model_dir=model_dir, tokenizer=tokenizer)
    model = prepare_for_training(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    full_plan = train_schedule(cfg, data.train)
    full_val = schedule(data.val, max_length=row_length(cfg), micro_batch_size=cfg.train.micro_batch_size,
                        packing=cfg.train.packing, seed=cfg.train.seed, epochs=1.0)
    if cfg.eval.max_batches:
        full_val = full_val[: cfg.eval.max_batches]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    identity = ckpt.run_identity(cfg, data.train, data.val, info.model_dir)
    start = LoopState()
    split = 1
    point = None
    if resumed:
        point = ckpt.resume_point(run_dir, model, optimizer, cfg, identity)
        split = max(replan.recorded_split(run_dir), point.batch_split)
        start = point.state
        start.micro_index = start.micro_index * split // point.batch_split
    plan = replan.split_batches(data.train, full_plan, split)
    val_plan = replan.split_batches(data.val, full_val, split)
    total_steps = -(-len(full_plan) // cfg.train.grad_accum)

    sink.emit(make_event("run_started", run_dir=str(run_dir), run_name=run_dir.name, model=cfg.model.name,
                         method=cfg.train.method, device=device, total_steps=total_steps,
                         resumed_from_step=start.step, config=cfg.to_dict()))
    sink.emit(make_event("data_ready", train_rows=len(data.train), val_rows=len(data.val),
                         train_tokens=sum(len(e.input_ids) for e in data.train), format=data.format,
                         truncated=data.stats.get("truncated", 0),
                         duplicates_dropped=data.stats.get("duplicates_dropped", 0),
                         skipped_rows=data.stats.get("skipped_rows", 0),
                         tokenize_seconds=prepared.seconds, tokens_cached=prepared.cached,
                         **({"columns_note": data.stats["columns_note"]} if data.stats.get("columns_note") else {})))
    for note in notes:
        sink.emit(note)
    startup = startup_seconds()
    log.info("ready to train %.1f s after the process started (model load %.1f s, data %.1f s%s)", startup,
             info.load_seconds, prepared.seconds, ", tokens from the cache" if prepared.cached else "")
    sink.emit(make_event("model_loaded", params=info.params, trainable_params=trainable, dtype=info.dtype,
                         quantized=info.quantized, load_seconds=info.load_seconds,
                         memory_bytes=memory_in_use(device), model_dir=info.model_dir, startup_seconds=startup))
    if point is not None:
        emit_resume_report(sink, run_dir, point, cfg, split)
    run_folder.update_state(run_dir, total_steps=total_steps, model_dir=info.model_dir, device=device)

    prompts = [generation_prompt(ex, tokenizer, cfg.data) for ex in data.val_examples[: cfg.eval.sample_prompts]]
    return RunSetup(cfg=cfg, run_dir=run_dir, device=device, model=model, tokenizer=tokenizer, info=info, data=data,
                    schedule=plan, val_batches=val_plan, optimizer=optimizer, start=start, prompts=prompts,
                    identity=identity, batch_split=split, fit_cfg=replan.effective_config(cfg, split),
                    full_schedule=full_plan, full_val_batches=full_val)


def emit_resume_report(sink: EventSink, run_dir: Path, point: ckpt.ResumePoint, cfg: RunConfig, split: int) -> None:
    """Where a resumed run continues from, said as events: each damaged checkpoint passed over, a start from
    step 0 when none was written, and a micro-batch still cut after running out of memory."""
    where = f"step {point.state.step}" if point.folder is not None else "step 0"
    for folder, reason, moved in point.rejected:
        aside = f"; moved aside to {moved} (deleted at the next checkpoint)" if moved else ""
        message = f"checkpoint {folder.name} cannot be used: {reason}{aside}; resuming from {where} instead"
        sink.emit(make_event("checkpoint_rejected", step=run_folder.step_of(folder) or 0, path=str(folder),
                             reason=reason, moved_to=str(moved) if moved else None, message=message))
        sink.emit(make_event("log", level="warning", message=message))
    if point.folder is None:
        sink.emit(make_event("log", level="warning", message=f"{run_dir.name} has no checkpoint yet (it stopped "
                             "before its first one): training starts again from step 0"))
    else:
        sink.emit(make_event("log", level="info", message=f"resuming from checkpoint {point.folder.name}"))
    if split > 1:
        eff = replan.effective_config(cfg, split)
        sink.emit(make_event("log", level="info", message=(
            f"training with micro-batches of {eff.train.micro_batch_size} and accumulation {eff.train.grad_accum} "
            f"(re-planned after running out of memory; the effective batch is unchanged)")))


def size_to_data(cfg: RunConfig, data: PreparedData, device: str, model_config: dict, run_dir: Path,
                 resumed: bool = False) -> tuple[RunConfig, list[dict]]:
    """(the run's config as it trains, log events that say so): `auto` batching sized from the data
    (recipe_sizing.py), then the memory plan's first fitting suggestion that keeps the result, when the plan does
    not fit. Saved as the run's config.json so a resume trains exactly the same batches; a resumed run's config
    is that saved one, sized already, and is only described (a resume never changes what the run computes)."""
    context = model_config.get("max_position_embeddings")
    cfg, sizing = size_batches(cfg, [len(e.input_ids) for e in data.train], device,
                               context if isinstance(context, int) else None)
    cfg, memory_note = (cfg, "") if resumed else fit_memory(cfg, model_config, device)
    notes = [make_event("log", level="info", message=f"recipe: {sizing.summary()}")]
    if sizing.warning:
        notes.append(make_event("log", level="warning", message=sizing.warning))
    if memory_note:
        notes.append(make_event("log", level="warning" if "does not fit" in memory_note else "info",
                                message=memory_note))
    if not resumed:
        write_text(run_folder.config_path(run_dir), redact(cfg.to_json()))
        run_folder.update_state(run_dir, recipe=sizing.to_dict())
    return cfg, notes


def fit_memory(cfg: RunConfig, model_config: dict, device: str) -> tuple[RunConfig, str]:
    """(config, note): when the memory plan does not fit, the planner's first fitting suggestion that changes
    only SAME_RESULT_KEYS is applied; when none does, the config is kept and the note says what would fit."""
    try:
        plan = plan_run(model_config, cfg, probe_facts(device), four_bit_ok=four_bit_likely(device),
                        model_name=cfg.model.name)
    except Exception:  # noqa: BLE001 - an unplannable model still trains; the plan is advice
        log.warning("memory plan failed", exc_info=True)
        return cfg, ""
    if plan.verdict != "does not fit":
        return cfg, ""
    gib = 1024 ** 3
    for suggestion in plan.suggestions:
        keys = {o.split("=", 1)[0] for o in suggestion.overrides}
        if suggestion.fits and keys <= SAME_RESULT_KEYS:
            changed = cfg
            for override in suggestion.overrides:
                dotted, value = override.split("=", 1)
                section, key = dotted.split(".")
                changed = replace_config(changed, section, **{key: value})
            return changed, (f"memory: the plan ({plan.total_bytes / gib:.1f} GiB) is over this {device}'s budget, "
                             f"so {suggestion.description.split(' (')[0]} ({suggestion.total_bytes / gib:.1f} GiB; "
                             "same result)")
    levers = "; ".join(f"{s.description} ({' '.join('--set ' + o for o in s.overrides)})"
                       for s in plan.suggestions[:2])
    return cfg, (f"memory: the plan ({plan.total_bytes / gib:.1f} GiB) does not fit this {device}"
                 + (f"; what would: {levers}" if levers else ""))


def startup_seconds() -> float:
    """Seconds since this process started (interpreter start, imports, model load, quantization, data)."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


def epoch_schedule(cfg: RunConfig, examples: Sequence, epochs: float) -> list[MicroBatch]:
    """The micro-batches of `epochs` passes over `examples` with the run's batching settings."""
    return schedule(examples, max_length=row_length(cfg), micro_batch_size=cfg.train.micro_batch_size,
                    packing=cfg.train.packing, seed=cfg.train.seed, epochs=epochs)


def train_schedule(cfg: RunConfig, examples: Sequence) -> list[MicroBatch]:
    """The micro-batches of the whole run: cfg.train.epochs of them, or exactly max_steps optimizer steps."""
    def epochs_of(epochs: float) -> list[MicroBatch]:
        return epoch_schedule(cfg, examples, epochs)

    per_epoch = max(1, len(epochs_of(1.0)))
    if cfg.train.max_steps:
        # Repeat the epoch schedule as needed to reach exactly max_steps optimizer steps: the number of epochs is
        # computed up front (a loop adding one epoch at a time was quadratic in max_steps).
        need = cfg.train.max_steps * cfg.train.grad_accum
        _check_run_length(need, cfg)
        epochs = float(max(1, -(-need // per_epoch)))
        plan = epochs_of(epochs)
        while len(plan) < need:
            epochs += 1
            plan = epochs_of(epochs)
        return plan[:need]
    _check_run_length(int(per_epoch * cfg.train.epochs), cfg)
    return epochs_of(cfg.train.epochs)


def _check_run_length(micro_batches: int, cfg: RunConfig) -> None:
    """Refuse a run whose schedule alone would not fit in memory, before it is built."""
    if micro_batches > MAX_MICRO_BATCHES:
        raise UserError(f"the run would take {micro_batches:,} micro-batches; ft-desk plans at most "
                        f"{MAX_MICRO_BATCHES:,} in one run (train.epochs {cfg.train.epochs:g}, train.max_steps "
                        f"{cfg.train.max_steps}, train.grad_accum {cfg.train.grad_accum})",
                        hint="lower train.epochs or train.max_steps, or raise train.micro_batch_size")


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
    folder = ckpt.save_checkpoint(run.run_dir, run.model, run.optimizer, run.cfg, loop_state,
                                  identity=run.identity, batch_split=run.batch_split)
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


def progress_hook(run: RunSetup) -> Callable[[LoopState], None]:
    """What the loop calls after every step: state.json's progress, and on a CPU an auto thread count kept at the
    cores other work leaves free (training/threads.py)."""
    import torch  # heavy import, already loaded by setup

    recorder = ProgressRecorder(run.run_dir)
    follower = ThreadFollower(run.cfg.train.threads, torch.get_num_threads()) if run.device == "cpu" else None

    def on_progress(loop_state: LoopState) -> None:
        recorder(loop_state)
        if follower is not None:
            follower()

    return on_progress


def saved_activations_for(run: RunSetup) -> BF16SavedActivations | None:
    """bf16 storage of the activations kept for backward where the model computes in fp32 (train.saved_activations)."""
    wanted = saved_activations_dtype(run.cfg.train.saved_activations, run.info.dtype)
    if wanted != "bfloat16" or run.info.dtype != "float32":
        return None
    base = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    return BF16SavedActivations(widths=feature_widths(config))


def autocast_for(run: RunSetup) -> Callable | None:
    """Mixed precision: a full fine-tune on an accelerator (fp32 master weights), and bf16 matmuls on a CPU with
    native bf16 (cpu_bf16_autocast); None elsewhere."""
    import torch  # heavy import, already loaded by setup

    if run.device == "cpu":
        if not cpu_bf16_autocast(run.cfg):
            return None
        log.info("this CPU has native bf16: matmuls run in bf16 under autocast (quant.compute_dtype=float32 or "
                 "model.dtype=float32 turns it off)")
        return functools.partial(torch.autocast, device_type="cpu", dtype=torch.bfloat16)
    if run.cfg.train.method != "full":
        return None
    return functools.partial(torch.autocast, device_type=run.device, dtype=torch_dtype(run.info.dtype))


def fit_context(run: RunSetup, sink: EventSink, stop: StopFlag) -> FitContext:
    return FitContext(model=run.model, optimizer=run.optimizer, cfg=run.fit_cfg or run.cfg,
                      train_examples=run.data.train, val_examples=run.data.val, schedule=run.schedule,
                      val_batches=run.val_batches, pad_id=run.tokenizer.pad_token_id, device=run.device, sink=sink,
                      save_checkpoint=functools.partial(save_checkpoint, run, sink),
                      should_stop=lambda: stop.requested, autocast=autocast_for(run),
                      saved_activations=saved_activations_for(run),
                      on_progress=progress_hook(run),
                      batches_per_epoch=len(epoch_schedule(run.cfg, run.data.train, 1.0)) * run.batch_split)


# Note: whether CPU runs with native bf16 use bf16 autocast (cpu_bf16_autocast). Off: it measured 1.25x on the
# 11M shape, but the eval tests' memorized tiny model trained under it no longer ended its answers within 12
# tokens. On a 2-core Xeon with AMX and the real SmolLM2-135M it learned as well (val loss 1.6887 against 1.6875
# after 96 WikiSQL rows) and ran 1.52x at micro-batches of 4 x 192, but at the 1 x 192 rows ft-desk picks for
# those 96 rows it gained nothing per CPU-second and raised the training peak from 1158 to 1514 MiB.
CPU_BF16_AUTOCAST = False


def cpu_bf16_autocast(cfg: RunConfig, features: dict[str, bool] | None = None) -> bool:
    """Whether a CPU run computes its matmuls in bf16 under autocast (weights, LoRA and optimizer stay fp32).

    Only where the CPU has native bf16 (AVX512-BF16, AMX or Arm BF16, as `ft-desk doctor` reports) and the run
    left its compute dtype on auto: an explicit float32 keeps every op in fp32. Measured on a 2-core AMD EPYC with
    AVX512-BF16 (no AMX), QLoRA forward + backward of the 11M Llama shape on 2 x 512 tokens, 3 alternating
    rounds: fp32 64.0 s, bf16 autocast 51.2 s (1.25x), first-step loss 10.44317 vs 10.44310.
    """
    requested = cfg.quant.compute_dtype if cfg.train.method == "qlora" else cfg.model.dtype
    if not CPU_BF16_AUTOCAST or requested != "auto":
        return False
    if features is None:
        from ft_desk.quant.device import cpu_features

        features = cpu_features()
    return bool(features.get("bf16"))


def fit_run(run: RunSetup, sink: EventSink, stop: StopFlag) -> tuple[LoopState, str]:
    """Train with loop.fit from `run.start`; returns (final loop state, "completed" | "stopped" | ...). A step
    that runs out of memory is re-planned (`replan_after_oom`) and training goes on, until a micro-batch is one row."""
    state = run.start
    while True:
        try:
            return fit(fit_context(run, sink, stop), state)
        except Exception as exc:  # noqa: BLE001 - only an allocator failure is handled; anything else re-raises
            if not replan.is_out_of_memory(exc):
                raise
            words = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            log.warning("step %d ran out of memory:\n%s", state.step + 1,
                        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        # Outside the except block: the failed step's frames (and the activations they hold) are freed now.
        run, state = replan_after_oom(run, sink, state, redact(words))


def replan_after_oom(run: RunSetup, sink: EventSink, state: LoopState, words: str) -> tuple[RunSetup, LoopState]:
    """Halve the micro-batch and double the accumulation, record it in state.json, and continue from the last
    checkpoint (or from the start of the failed step when there is none). Raises OutOfMemory, naming the next
    setting to change, when a micro-batch is already one row."""
    failed_step = state.step + 1
    run.optimizer.zero_grad(set_to_none=True)
    replan.free_memory(run.device)
    cfg = run.cfg
    old = replan.effective_config(cfg, run.batch_split)
    if old.train.micro_batch_size <= 1:
        raise replan.at_the_limit(cfg, run.batch_split, run.device, run.info.model_dir)
    split = run.batch_split * 2
    new = replan.effective_config(cfg, split)
    if run_folder.checkpoint_folders(run.run_dir):
        point = ckpt.resume_point(run.run_dir, run.model, run.optimizer, cfg, run.identity)
        state = point.state
        state.micro_index = state.micro_index * split // point.batch_split
        if point.rejected:
            emit_resume_report(sink, run.run_dir, point, cfg, 1)
        where = f"the checkpoint at step {state.step}"
    else:
        state.micro_index = state.micro_index * split // run.batch_split
        where = f"the start of step {failed_step}"
    replan.record_split(run.run_dir, cfg, split)
    message = (f"step {failed_step} ran out of memory ({words}); micro-batch {old.train.micro_batch_size} -> "
               f"{new.train.micro_batch_size}, accumulation {old.train.grad_accum} -> {new.train.grad_accum} "
               f"(effective batch unchanged); continuing from {where}")
    sink.emit(make_event("batch_replanned", step=failed_step, resumed_from_step=state.step,
                         micro_batch_size=new.train.micro_batch_size, grad_accum=new.train.grad_accum,
                         previous_micro_batch_size=old.train.micro_batch_size,
                         previous_grad_accum=old.train.grad_accum, error=words, message=message))
    sink.emit(make_event("log", level="warning", message=message))
    run = dataclasses.replace(run, batch_split=split, fit_cfg=new, start=state,
                              schedule=replan.split_batches(run.data.train, run.full_schedule, split),
                              val_batches=replan.split_batches(run.data.val, run.full_val_batches, split))
    return run, state


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
        damaged = ckpt.check_checkpoint(best, cfg) if best.is_dir() else None
        if damaged:
            sink.emit(make_event("log", level="warning",
                                 message=f"the best checkpoint ({best.name}) cannot be used: {damaged}; the final "
                                         f"weights are the last step's ({state.step})"))
        elif best.is_dir():
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
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_weights(run.model, run.cfg, tmp)
        run.tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            needed = sum(p.numel() * p.element_size() for p in run.model.parameters() if p.requires_grad)
            try:
                free = f" and {format_bytes(shutil.disk_usage(run.run_dir).free)} is free"
            except OSError:
                free = ""
            raise DiskFull(f"the disk is full: the final weights need about {format_bytes(needed + (4 << 20))}"
                           f"{free} in {run.run_dir}; the partial files were removed and the checkpoints are "
                           f"intact", hint=f"free some space, then resume with: ft-desk train --resume "
                                           f"{run.run_dir} (it only writes the final weights)") from None
        raise
    if final.exists():  # a resumed run that had finished once already
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_folder(run.run_dir)
    return final
