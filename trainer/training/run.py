"""One training run from start to finish: `setup()` builds everything, `fit()` (loop.py) trains, and the run
folder records it. This is what `ft-desk train` and `ft-desk demo` execute, and what the TUI launches as a
child process.

Run folder (one per run, under paths.runs_home()):
  config.json      the fully resolved RunConfig, written before step 0
  state.json       status (running|completed|stopped|failed), pid, progress, best checkpoint; rewritten atomically
  events.jsonl     every event (events.py), appended and flushed line by line
  run.log          diagnostics and tracebacks
  data/val.jsonl   the validation examples (for eval and export verification)
  checkpoints/     step-NNNNNN folders (checkpoint.py)
  adapter/         the final weights (best checkpoint) in peft format with the tokenizer; model/ for full runs
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ft_desk.trainer.chat_format import stop_token_ids
from ft_desk.trainer.config import RunConfig
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.events import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_STOPPED, EventSink, make_event
from ft_desk.trainer.generation import generate
from ft_desk.trainer.paths import runs_home

log = logging.getLogger("ft_desk")

STATE = "state.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def slug(text: str) -> str:
    base = text.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-").lower()[:40] or "model"


def new_run_dir(cfg: RunConfig) -> Path:
    home = runs_home(cfg.output.runs_dir)
    home.mkdir(parents=True, exist_ok=True)
    name = cfg.output.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{slug(cfg.model.name)}-{cfg.train.method}"
    if "/" in name or name.startswith("."):
        raise UserError(f"output.run_name must be a plain folder name, got {name!r}")
    path = home / name
    n = 1
    while path.exists():
        n += 1
        path = home / f"{name}-{n}"
    path.mkdir(parents=True)
    return path


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_state(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def update_state(run_dir: Path, **changes: Any) -> dict[str, Any]:
    state = read_state(run_dir)
    state.update(changes, updated=_now())
    write_json_atomic(run_dir / STATE, state)
    return state


class _RedactingFormatter(logging.Formatter):
    """Log lines with any Hugging Face token masked: a token must never reach a run folder."""

    def format(self, record: logging.LogRecord) -> str:
        from ft_desk.trainer.hub.credentials import redact

        return redact(super().format(record))


def setup_logging(run_dir: Path) -> logging.Handler:
    """Diagnostics (ours and the libraries') go to RUN_DIR/run.log."""
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
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


def _explain_failure(exc: BaseException) -> tuple[str, str]:
    """(error sentence, hint) for an exception that escaped the run."""
    name = type(exc).__name__
    text = str(exc)
    if name == "OutOfMemoryError" or "out of memory" in text.lower():
        return (
            "the device ran out of memory",
            "lower train.micro_batch_size (raise train.grad_accum to keep the batch), lower data.max_length, "
            "or turn on train.gradient_checkpointing; `ft-desk plan` shows what fits",
        )
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        return ("the disk is full", "free some space or set output.runs_dir to a folder on a larger disk")
    return (f"internal error: {name}: {text.splitlines()[0] if text else ''}".rstrip(": "),
            "see run.log in the run folder for the traceback")


def train(cfg: RunConfig | None, sink: EventSink, resume_dir: Path | None = None,
          stop: StopFlag | None = None) -> tuple[int, Path | None]:
    """Run (or resume) a training run; every outcome ends with a run_finished event. Returns (exit code, run dir)."""
    from ft_desk.trainer.training.model import load_run_config

    started = time.time()
    stop = stop or StopFlag()
    if resume_dir is not None:
        run_dir = Path(resume_dir).expanduser().resolve()
        cfg = load_run_config(run_dir)
        previous = read_state(run_dir)
        if previous.get("status") == "running" and pid_alive(previous.get("pid")):
            raise UserError(f"{run_dir} is still running (pid {previous.get('pid')})",
                            hint="attach to it in the app, or stop it first")
    else:
        assert cfg is not None
        run_dir = new_run_dir(cfg)
        (run_dir / "config.json").write_text(cfg.to_json(), encoding="utf-8")
        write_json_atomic(run_dir / STATE, {
            "status": "running", "pid": os.getpid(), "step": 0, "total_steps": None, "best_step": None,
            "best_val_loss": None, "model_name": cfg.model.name, "method": cfg.train.method,
            "created": _now(), "updated": _now(), "run_name": run_dir.name,
        })
    from ft_desk.trainer.events import FanOut, FileSink

    file_sink = FileSink(run_dir / "events.jsonl")
    sinks = FanOut(file_sink, sink)
    handler = setup_logging(run_dir)
    update_state(run_dir, status="running", pid=os.getpid())
    outcome: dict[str, Any] = {"status": "failed", "exit_code": EXIT_FAILED, "error": None, "hint": None}
    result = None
    try:
        result = _train(cfg, run_dir, sinks, stop, resumed=resume_dir is not None)
        status = result["status"]
        outcome = {"status": "stopped" if status == "stopped" else "completed",
                   "exit_code": EXIT_STOPPED if status == "stopped" else EXIT_OK, "error": None, "hint": None}
    except UserError as err:
        log.info("run failed: %s", err.full())
        outcome = {"status": "failed", "exit_code": EXIT_BAD_INPUT, "error": err.message, "hint": err.hint or None}
    except KeyboardInterrupt:
        outcome = {"status": "stopped", "exit_code": EXIT_STOPPED, "error": "interrupted twice: stopped without "
                   "a final checkpoint", "hint": "resume from the last checkpoint with ft-desk train --resume"}
    except BaseException as exc:  # noqa: BLE001 - every failure must end as an event, and the log gets the trace
        log.error("run crashed:\n%s", traceback.format_exc())
        error, hint = _explain_failure(exc)
        outcome = {"status": "failed", "exit_code": EXIT_FAILED, "error": error, "hint": hint}
    from ft_desk.trainer.hub.credentials import redact

    for key in ("error", "hint"):
        if outcome[key]:
            outcome[key] = redact(outcome[key])
    state = read_state(run_dir)
    sinks.emit(make_event(
        "run_finished", status=outcome["status"], exit_code=outcome["exit_code"], error=outcome["error"],
        hint=outcome["hint"], best_val_loss=state.get("best_val_loss"), best_step=state.get("best_step"),
        final_step=state.get("step"), adapter_path=state.get("final_adapter"), run_dir=str(run_dir),
        elapsed_s=time.time() - started,
    ))
    update_state(run_dir, status=outcome["status"], error=outcome["error"], hint=outcome["hint"],
                 exit_code=outcome["exit_code"])
    file_sink.close()
    logging.getLogger().removeHandler(handler)
    handler.close()
    return outcome["exit_code"], run_dir


def pid_alive(pid: Any) -> bool:
    """Whether `pid` is a live (not zombie) ft-desk process: a stale state.json may name a reused pid."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        command = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - the process went away meanwhile, or its details are hidden
        return True
    return "ft_desk" in command or "ft-desk" in command


def _train(cfg: RunConfig, run_dir: Path, sink: EventSink, stop: StopFlag, resumed: bool) -> dict[str, Any]:
    import torch  # heavy imports: a run really starts here

    from ft_desk.quant.device import resolve_device

    from ft_desk.trainer.training import checkpoint as ckpt
    from ft_desk.trainer.data.batching import schedule
    from ft_desk.trainer.data.prepare import generation_prompt, prepare_data, write_examples_jsonl
    from ft_desk.trainer.training.loop import FitContext, LoopState, fit, memory_in_use
    from ft_desk.trainer.training.model import load_base, prepare_for_training, save_weights

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
    (run_dir / "data").mkdir(exist_ok=True)
    write_examples_jsonl(data.val_examples, run_dir / "data" / "val.jsonl")

    plan = schedule(data.train, max_length=cfg.data.max_length, micro_batch_size=cfg.train.micro_batch_size,
                    packing=cfg.train.packing, seed=cfg.train.seed, epochs=cfg.train.epochs)
    if cfg.train.max_steps:
        # Repeat the epoch schedule as needed to reach exactly max_steps optimizer steps.
        need = cfg.train.max_steps * cfg.train.grad_accum
        epochs = 1.0
        while len(plan) < need:
            epochs += 1
            plan = schedule(data.train, max_length=cfg.data.max_length, micro_batch_size=cfg.train.micro_batch_size,
                            packing=cfg.train.packing, seed=cfg.train.seed, epochs=epochs)
        plan = plan[:need]
    val_plan = schedule(data.val, max_length=cfg.data.max_length, micro_batch_size=cfg.train.micro_batch_size,
                        packing=cfg.train.packing, seed=cfg.train.seed, epochs=1.0)
    if cfg.eval.max_batches:
        val_plan = val_plan[: cfg.eval.max_batches]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    state = LoopState()
    resumed_from = 0
    if resumed:
        folder = ckpt.latest(run_dir)
        if folder is not None:
            state = ckpt.load_checkpoint(folder, model, optimizer, cfg)
            resumed_from = state.step
    total_steps = -(-len(plan) // cfg.train.grad_accum)

    sink.emit(make_event("run_started", run_dir=str(run_dir), run_name=run_dir.name, model=cfg.model.name,
                         method=cfg.train.method, device=device, total_steps=total_steps,
                         resumed_from_step=resumed_from, config=cfg.to_dict()))
    sink.emit(make_event("data_ready", train_rows=len(data.train), val_rows=len(data.val),
                         train_tokens=sum(len(e.input_ids) for e in data.train), format=data.format,
                         truncated=data.stats.get("truncated", 0),
                         duplicates_dropped=data.stats.get("duplicates_dropped", 0),
                         skipped_rows=data.stats.get("skipped_rows", 0)))
    sink.emit(make_event("model_loaded", params=info.params, trainable_params=trainable, dtype=info.dtype,
                         quantized=info.quantized, load_seconds=info.load_seconds,
                         memory_bytes=memory_in_use(device), model_dir=info.model_dir))
    update_state(run_dir, total_steps=total_steps, model_dir=info.model_dir, device=device)

    stop_ids = stop_token_ids(tokenizer, vocabulary_fallback=True)
    prompts = [generation_prompt(ex, tokenizer, cfg.data) for ex in data.val_examples[: cfg.eval.sample_prompts]]

    def emit_samples(phase: str) -> None:
        if not prompts:
            return
        outputs = generate(model, tokenizer, [ids for ids, _ in prompts], max_new_tokens=cfg.eval.max_new_tokens,
                           stop_ids=stop_ids, device=device)
        for index, ((ids, reference), output) in enumerate(zip(prompts, outputs)):
            sink.emit(make_event("sample", phase=phase, index=index, output=output.text, reference=reference,
                                 prompt=tokenizer.decode(ids, skip_special_tokens=False)))

    if not resumed or resumed_from == 0:
        emit_samples("before")

    def save(loop_state: LoopState, is_best: bool) -> str:
        folder = ckpt.save_checkpoint(run_dir, model, optimizer, cfg, loop_state)
        ckpt.prune(run_dir, cfg.output.keep_last, loop_state.best_step)
        sink.emit(make_event("checkpoint", step=loop_state.step, path=str(folder), is_best=is_best))
        update_state(run_dir, step=loop_state.step, best_step=loop_state.best_step,
                     best_val_loss=loop_state.best_val_loss)
        return str(folder)

    last_progress = [0.0]

    def progress(loop_state: LoopState) -> None:
        if time.monotonic() - last_progress[0] > 5:
            last_progress[0] = time.monotonic()
            update_state(run_dir, step=loop_state.step, best_step=loop_state.best_step,
                         best_val_loss=loop_state.best_val_loss)

    autocast = None
    if cfg.train.method == "full" and device != "cpu":
        from ft_desk.quant.policy import torch_dtype

        def autocast():
            return torch.autocast(device_type=device, dtype=torch_dtype(info.dtype))

    ctx = FitContext(model=model, optimizer=optimizer, cfg=cfg, train_examples=data.train,
                     val_examples=data.val, schedule=plan, val_batches=val_plan, pad_id=tokenizer.pad_token_id,
                     device=device, sink=sink, save_checkpoint=save, should_stop=lambda: stop.requested,
                     autocast=autocast, on_progress=progress)
    state, status = fit(ctx, state)
    if status == "stopped":
        sink.emit(make_event("log", level="info", message=f"stopped by {stop.signal_name or 'request'} at step "
                             f"{state.step}; resume with: ft-desk train --resume {run_dir}"))
        update_state(run_dir, step=state.step)
        return {"status": "stopped"}

    # Final weights = the best checkpoint when validation picked one, else the last step.
    if state.best_step is not None and state.best_step != state.step:
        best = ckpt.step_folder(run_dir, state.best_step)
        if best.is_dir():
            from ft_desk.trainer.training.model import load_weights

            load_weights(model, cfg, best)
            sink.emit(make_event("log", level="info",
                                 message=f"final weights are the best checkpoint (step {state.best_step}, "
                                         f"val loss {state.best_val_loss:.4f})"))
    final = run_dir / ("model" if cfg.train.method == "full" else "adapter")
    tmp = run_dir / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model, cfg, tmp)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    emit_samples("after")
    update_state(run_dir, step=state.step, best_step=state.best_step, best_val_loss=state.best_val_loss,
                 final_adapter=str(final))
    return {"status": status}


def stdout_for_events():
    """The real stdout for JSON-lines events; sys.stdout is pointed at stderr so stray prints from libraries
    cannot corrupt the event stream."""
    real = sys.stdout
    sys.stdout = sys.stderr
    return real
