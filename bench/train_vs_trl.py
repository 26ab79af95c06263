"""ft-desk against a plain TRL QLoRA script: tokens/s, peak memory and loss from one invocation.

For each model the script builds (random weights, bf16 on disk like Hub checkpoints, a byte-level BPE tokenizer
trained on the WikiSQL text itself), it trains in child processes, one after the other, never in parallel:
  (a) ft-desk: `python -m ft_desk.trainer.cli.main train --preset qlora --events jsonl --set ...`, read from its events;
  (b) bench/baseline_trl_qlora.py: TRL's SFTTrainer + peft + bitsandbytes as a hobbyist writes it.
Same settings where they correspond: NF4 + double quant, fp32 compute on CPU, LoRA r=16 alpha=32 dropout 0.05 on
all linear layers, AdamW at lr 2e-4 with a linear decay and no warmup, gradient clipping at 1.0, the same grad
accumulation and optimizer steps, gradient checkpointing off (or on for both), the same torch thread count.
Each keeps its own defaults otherwise: TRL pads each batch of examples to its longest, keeps the LoRA weights in
bf16 for quantized models and uses fused AdamW; ft-desk packs examples into rows (block-diagonal attention).
ft-desk runs with eval.sample_prompts=0 (TRL generates no samples); it evaluates at step 0 and at the end, TRL
at the end.

Because ft-desk's micro-batch counts packed rows, not examples, ft-desk runs in two layouts against one TRL run
(micro-batch 4 examples, max length 512):
  same    ft-desk micro-batch 4 rows x max length 512: the same numbers, but ~7x the tokens per step.
  tokens  ft-desk micro-batch 1 row x L, L = max(longest example, 4 x mean example length) rounded up to 32:
          about the tokens per step TRL sees, so memory and loss after N steps compare like for like.

Measured, the same way for both:
  tokens/s     non-pad tokens that went through the model / training seconds. Tokens: ft-desk's step events
               (lengths of the packed examples), TRL's own `num_tokens` log (attention_mask sums per batch).
               Training seconds: the sum of optimizer-step durations (ft-desk's step events, which exclude eval
               and checkpoints; for TRL the gaps between on_step_end callbacks, from on_train_begin).
  tok/CPU-s    the same tokens / CPU seconds (user + system) the child's process tree used in that training
               window, from the psutil samples below. On a shared machine wall time depends on the other load,
               CPU time much less, so this ratio is the steadier one (it still counts OpenMP spin-waiting).
  peak RSS     max of (psutil sampling of the child and its children from this process every 50 ms, the
               child's ru_maxrss from wait4 at exit). Nothing is subtracted in "peak"; "above idle" subtracts
               the same idle baseline from both: the peak RSS of a child that only imports torch,
               transformers, peft and bitsandbytes. "train MiB" is the highest sample inside the training
               window alone: it tells whether the peak came from training or from loading, eval or saving.
  train loss   mean of the last 5 step losses (per-token mean of each step, as each trainer logs it).
  val loss     ft-desk: token-weighted mean over the validation rows; TRL: its eval_loss (mean of batch means).
  wall         the child's whole life: imports, model load, data preparation, training, eval, saving.

    python bench/train_vs_trl.py --quick --threads 1     # smoke run: 11M model, 4 steps (~5 min on a busy box)
    python bench/train_vs_trl.py --threads 1             # 11M (30 steps, both layouts), 135M shape (4 steps)
    python bench/train_vs_trl.py --models llama-11m --gc both --json out.json
    python bench/train_vs_trl.py --defaults --model smollm2        # both tools at their own defaults (below)

--defaults: each tool as a user runs it, on the same model, the same first --examples training rows and the
same validation rows, for one pass (epoch) over them, at each of --max-lengths (512 and 1024). ft-desk:
`ft-desk train --preset qlora` with only the model, data files, max length, epochs and a run folder set
(threads, micro-batch, packing, evaluation and samples, checkpoints are its own). TRL: SFTConfig's defaults
(batch 8, lr 2e-5, bf16 autocast, gradient checkpointing, fused AdamW, torch's thread count) with the same
QLoRA model load and LoRA as the baseline script. "ready s" is the time from the child's start to its first
training step (imports, model load, quantization, tokenization): ft-desk's model_loaded `startup_seconds`,
TRL's on_train_begin. `smollm2` is the real SmolLM2-135M-Instruct (bench/real_smollm2.py: the GGUF that
tests/real_model.py fetches, read with transformers' gguf_file support and saved once as bf16 safetensors).

On a machine shared with other work use --threads 1: with more threads than free cores, OpenMP barriers stall
every op and the many small ops of short padded batches suffer far more than large packed ones.
Needs the `bench` extra (trl, datasets). Data is read from ../shared/data/wikisql, never copied.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ft_desk.trainer.demo import TinyShape  # stdlib-only module: no torch import here

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/real_smollm2.py

MIB = 1024**2
HERE = Path(__file__).resolve().parent
DATA_DIR = HERE.parent.parent / "shared" / "data" / "wikisql"
BASELINE = HERE / "baseline_trl_qlora.py"
# Note: psutil sampling period; ru_maxrss from wait4 covers any spike between samples.
SAMPLE_SECONDS = 0.05
LAST_LOSSES = 5
LAYOUTS = ("same", "tokens")


@dataclass(frozen=True)
class BenchModel:
    key: str
    about: str
    shape: TinyShape | None  # Llama architecture, random weights (None: the real model)
    steps: int  # optimizer steps of a full run
    layouts: tuple[str, ...]  # ft-desk layouts of a full run
    val_rows: int | None = None  # validation rows used by both (None: all of valid.jsonl)
    examples: int = 400  # training rows of a --defaults run


def _llama(vocab: int, hidden: int, mlp: int, layers: int, heads: int, kv_heads: int) -> TinyShape:
    return TinyShape(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                     tie_word_embeddings=True)


MODELS = {
    m.key: m
    for m in (
        # Llama-shaped, 32K vocabulary, tied embeddings: 8.2M embedding + 2.9M in 4 layers = ~11M.
        BenchModel("llama-11m", "Llama-shaped, 32K vocab", _llama(32000, 256, 704, 4, 8, 4), steps=30,
                   layouts=LAYOUTS),
        # SmolLM2-135M's shape: 30 layers, 576 wide, GQA 9/3 heads, 1536 MLP, 49152 vocab, tied embeddings.
        # Slow on 2 CPU cores: few steps, the tokens-matched layout only, 20 validation rows.
        BenchModel("smollm2-135m", "SmolLM2-135M-shaped", _llama(49152, 576, 1536, 30, 9, 3), steps=4,
                   layouts=("tokens",), val_rows=20, examples=96),
        # The real SmolLM2-135M-Instruct (pretrained weights, its own tokenizer).
        BenchModel("smollm2", "real SmolLM2-135M-Instruct", None, steps=4, layouts=("tokens",), val_rows=20,
                   examples=96),
    )
}


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def build_model(spec: BenchModel, folder: Path, texts: list[str]) -> dict:
    """Random-weight model + tokenizer in folder: its parameter count, real tokenizer size and the token length
    of every training row as both trainers tokenize it (text + EOS)."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from ft_desk.trainer.demo import build_tiny_model

    if spec.shape is None:
        from real_smollm2 import smollm2_folder

        folder = smollm2_folder()
    else:
        build_tiny_model(folder, spec.shape, texts=texts, dtype="bfloat16")
    params = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            n = 1
            for d in f.get_slice(name).get_shape():
                n *= d
            params += n
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lengths = [len(ids) for ids in tokenizer([t + tokenizer.eos_token for t in texts])["input_ids"]]
    return {"params": params, "tokenizer_tokens": len(tokenizer), "lengths": lengths, "folder": str(folder)}


def matched_row_length(lengths: list[int], micro_batch: int) -> int:
    """Row length for one packed ft-desk row that carries about what TRL's micro-batch of examples carries."""
    need = max(max(lengths), micro_batch * sum(lengths) / len(lengths))
    return int(-(-need // 32) * 32)


@dataclass
class ChildRun:
    exit_code: int
    wall_s: float
    peak_sampled: int
    peak_maxrss: int
    samples: list[tuple[float, float, int]]  # (unix time, CPU seconds of the process tree so far, its RSS)
    start_unix: float = 0.0

    @property
    def peak(self) -> int:
        return max(self.peak_sampled, self.peak_maxrss)

    def cpu_seconds(self, start: float, end: float) -> float:
        """CPU seconds the child spent between two unix times (linear between samples)."""
        return _cpu_at(self.samples, end) - _cpu_at(self.samples, start)

    def peak_between(self, start: float, end: float) -> int:
        """Highest sampled RSS between two unix times (no ru_maxrss here: it has no time)."""
        return max((rss for t, _, rss in self.samples if start <= t <= end), default=0)


def _cpu_at(samples: list[tuple[float, float, int]], when: float) -> float:
    if not samples:
        return 0.0
    if when <= samples[0][0]:
        return samples[0][1]
    for (t0, c0, _), (t1, c1, _) in zip(samples, samples[1:]):
        if when <= t1:
            return c0 + (c1 - c0) * (when - t0) / max(t1 - t0, 1e-9)
    return samples[-1][1]


def run_child(cmd: list[str], env: dict, stdout: Path, stderr: Path) -> ChildRun:
    """Run cmd to the end, sampling the resident set and CPU time of it and its children, reaping it with wait4."""
    import psutil

    started, start_unix = time.perf_counter(), time.time()
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=str(HERE.parent))
        watched = psutil.Process(proc.pid)
        peak = 0
        samples: list[tuple[float, float, int]] = []
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                rss, used = 0, 0.0
                for member in [watched, *watched.children(recursive=True)]:
                    rss += member.memory_info().rss
                    times = member.cpu_times()
                    used += times.user + times.system
                peak = max(peak, rss)
                samples.append((time.time(), used, rss))
            except psutil.Error:
                pass  # exiting between the poll and the read
            time.sleep(SAMPLE_SECONDS)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    return ChildRun(proc.returncode, time.perf_counter() - started, peak, usage.ru_maxrss * 1024, samples,
                    start_unix)


def child_env(threads: int | None, tmp: Path) -> dict:
    env = dict(os.environ)
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    else:  # --defaults: each tool's own thread choice
        env.pop("OMP_NUM_THREADS", None)
        env.pop("MKL_NUM_THREADS", None)
    env.update({
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(tmp / "hf-home"),
        "FT_DESK_HOME": str(tmp / "ft-desk-home"),
        "PYTHONUNBUFFERED": "1",
    })
    return env


IDLE_CHILD = "import torch, transformers, peft, bitsandbytes"


@dataclass
class Job:
    """One model's runs: where its files are and the settings both trainers share."""

    key: str
    model_dir: Path
    valid_file: Path
    steps: int
    gc: bool
    tmp: Path
    env: dict
    idle: int
    train_file: Path = DATA_DIR / "train.jsonl"

    @property
    def tag(self) -> str:
        return f"{self.key}-gc{int(self.gc)}"


@dataclass
class Result:
    model: str
    trainer: str
    gc: bool
    batch: str  # what one micro-batch is
    steps: int
    tokens: int
    train_s: float
    tokens_per_s: float
    train_cpu_s: float
    tokens_per_cpu_s: float
    peak: int
    train_peak: int  # highest sampled RSS while training (the rest of the peak is load / eval / save)
    peak_sampled: int
    peak_maxrss: int
    above_idle: int
    train_loss: float | None
    val_loss: float | None
    wall_s: float
    note: str = ""
    ready_s: float | None = None  # child start to its first training step


def _result(job: Job, trainer: str, batch: str, steps: int, tokens: int, train_s: float,
            window: tuple[float, float], child: ChildRun, losses: list[float], val_loss: float | None,
            note: str, ready_s: float | None = None) -> Result:
    tail = [v for v in losses if v is not None][-LAST_LOSSES:]
    cpu_s = child.cpu_seconds(*window)
    return Result(job.key, trainer, job.gc, batch, steps, tokens, train_s, tokens / train_s, cpu_s,
                  tokens / cpu_s if cpu_s > 0 else float("nan"), child.peak, child.peak_between(*window),
                  child.peak_sampled,
                  child.peak_maxrss, child.peak - job.idle, sum(tail) / len(tail) if tail else None, val_loss,
                  child.wall_s, note, ready_s)


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def run_ftdesk(job: Job, args, layout: str, row_length: int) -> Result:
    rows, length = (args.micro_batch, args.max_length) if layout == "same" else (1, row_length)
    if layout == "defaults":
        sets = {"model.name": job.model_dir, "data.train_file": job.train_file, "data.valid_file": job.valid_file,
                "data.max_length": args.max_length, "train.epochs": args.epochs, "train.device": "cpu",
                "output.runs_dir": job.tmp / "runs", "output.run_name": f"{job.tag}-defaults-{args.max_length}"}
        return _ftdesk_child(job, sets, f"defaults-{args.max_length}", "defaults")
    sets = {
        "model.name": job.model_dir,
        "data.train_file": job.train_file,
        "data.valid_file": job.valid_file,
        "data.max_length": length,
        "train.row_length": length,
        "train.method": "qlora",
        "train.device": "cpu",
        "train.max_steps": job.steps,
        "train.micro_batch_size": rows,
        "train.grad_accum": args.grad_accum,
        "train.gradient_checkpointing": str(job.gc).lower(),
        "train.threads": args.threads,
        "train.log_every": 1,
        "quant.quant_type": "nf4",
        "quant.double_quant": "true",
        "quant.compute_dtype": "float32",
        "lora.r": 16,
        "lora.alpha": 32,
        "lora.dropout": 0.05,
        "lora.target_modules": "all-linear",
        "optim.lr": 2e-4,
        "optim.schedule": "linear",
        "optim.warmup_ratio": 0.0,
        "optim.max_grad_norm": 1.0,
        "eval.every_steps": 0,
        "eval.sample_prompts": 0,
        "output.runs_dir": job.tmp / "runs",
        "output.run_name": f"{job.tag}-{layout}",
        "output.save_every": 0,
    }
    return _ftdesk_child(job, sets, layout, f"{rows}x{length} packed")


def _ftdesk_child(job: Job, sets: dict, layout: str, batch: str) -> Result:
    cmd = [sys.executable, "-m", "ft_desk.trainer.cli.main", "train", "--preset", "qlora", "--events", "jsonl"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    out, err = job.tmp / f"ftdesk-{job.tag}-{layout}.jsonl", job.tmp / f"ftdesk-{job.tag}-{layout}.log"
    child = run_child(cmd, job.env, out, err)
    events = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.startswith("{")]
    steps = [e for e in events if e["type"] == "step"]
    evals = [e for e in events if e["type"] == "eval"]
    finished = next((e for e in events if e["type"] == "run_finished"), {})
    loaded = next((e for e in events if e["type"] == "model_loaded"), {})
    started = next((e for e in events if e["type"] == "run_started"), {})
    if child.exit_code != 0 or not steps:
        raise SystemExit(f"ft-desk run failed (exit {child.exit_code}): {finished.get('error')}\n{_tail(err)}")
    last = steps[-1]
    # The training window in unix time: the first step began elapsed_s before its event; the last ended at its.
    window = (steps[0]["time"] - steps[0]["elapsed_s"], last["time"])
    train_cfg = started.get("config", {}).get("train", {})
    if layout.startswith("defaults"):
        batch = (f"{train_cfg.get('micro_batch_size')}x{train_cfg.get('row_length')} "
                 f"{'packed' if train_cfg.get('packing') else 'padded'}")
    return _result(job, "ft-desk", batch, last["step"], last["tokens"], last["elapsed_s"], window,
                   child, [s["loss"] for s in steps], evals[-1]["val_loss"] if evals else None,
                   f"layout {layout}; {last['tokens'] // last['step']} tok/step; accum {train_cfg.get('grad_accum')}"
                   f"; gc {train_cfg.get('gradient_checkpointing')}", loaded.get("startup_seconds"))


def run_trl(job: Job, args) -> Result:
    result_path = job.tmp / f"trl-{job.tag}.json"
    cmd = [sys.executable, str(BASELINE), "--model", str(job.model_dir), "--train", str(job.train_file),
           "--valid", str(job.valid_file), "--out", str(job.tmp / f"trl-out-{job.tag}"),
           "--result", str(result_path), "--max-length", str(args.max_length), "--threads", str(args.threads or 0)]
    if args.defaults:
        cmd += ["--defaults", "--epochs", str(args.epochs)]
    else:
        cmd += ["--steps", str(job.steps), "--micro-batch", str(args.micro_batch), "--grad-accum",
                str(args.grad_accum), "--lr", "2e-4"]
    if job.gc and not args.defaults:
        cmd.append("--gradient-checkpointing")
    err = job.tmp / f"trl-{job.tag}.log"
    child = run_child(cmd, job.env, job.tmp / f"trl-{job.tag}.out", err)
    if child.exit_code != 0 or not result_path.is_file():
        raise SystemExit(f"TRL baseline failed (exit {child.exit_code}):\n{_tail(err)}")
    data = json.loads(result_path.read_text(encoding="utf-8"))
    steps = data["steps"]
    tokens = int(steps[-1]["num_tokens"])
    settings = data.get("settings", {})
    batch = f"{settings.get('batch', args.micro_batch)}x{settings.get('max_length', args.max_length)} padded"
    return _result(job, "trl", batch, steps[-1]["step"], tokens, sum(data["step_seconds"]),
                   tuple(data["train_window_unix"]), child, [s["loss"] for s in steps], data["eval_loss"],
                   f"{tokens // steps[-1]['step']} tok/step; LoRA {data['adapter_dtype'].replace('torch.', '')}; "
                   f"{data['optim']}; bf16 {settings.get('bf16')}; gc {settings.get('gradient_checkpointing')}",
                   data["train_window_unix"][0] - child.start_unix)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(rows: list[Result], out=sys.stdout) -> None:
    head = (f"{'model':<13} {'gc':<3} {'trainer':<8} {'micro-batch':<15} {'steps':>5} {'tokens':>7} {'train s':>8} "
            f"{'tok/s':>7} {'cpu s':>7} {'tok/cpu-s':>9} {'peak MiB':>8} {'>idle MiB':>9} {'train MiB':>9} "
            f"{'train loss':>10} {'val loss':>8} {'ready s':>7} {'wall s':>7}  note")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        print(f"{r.model:<13} {'on' if r.gc else 'off':<3} {r.trainer:<8} {r.batch:<15} {r.steps:>5} {r.tokens:>7} "
              f"{r.train_s:>8.1f} {r.tokens_per_s:>7.1f} {r.train_cpu_s:>7.1f} {r.tokens_per_cpu_s:>9.1f} "
              f"{r.peak / MIB:>8.0f} {r.above_idle / MIB:>9.0f} {r.train_peak / MIB:>9.0f} "
              f"{_fmt(r.train_loss):>10} {_fmt(r.val_loss):>8} {_secs(r.ready_s):>7} {r.wall_s:>7.1f}  {r.note}",
              file=out)


def ratios(ours: Result, base: Result) -> dict:
    return {
        "model": ours.model, "gc": ours.gc, "ft_desk_batch": ours.batch,
        "tokens_per_s": ours.tokens_per_s / base.tokens_per_s,
        "tokens_per_cpu_s": ours.tokens_per_cpu_s / base.tokens_per_cpu_s,
        "peak_memory": ours.peak / base.peak,
        "peak_above_idle": ours.above_idle / base.above_idle if base.above_idle > 0 else float("nan"),
        "train_peak": ours.train_peak / base.train_peak if base.train_peak > 0 else float("nan"),
        "wall": ours.wall_s / base.wall_s,
        "ready": ours.ready_s / base.ready_s if ours.ready_s and base.ready_s else float("nan"),
        "val_loss": (ours.val_loss, base.val_loss),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ft-desk vs a plain TRL QLoRA script on CPU (tokens/s, peak RSS, loss)")
    p.add_argument("--quick", action="store_true", help="smoke run: the 11M model, 4 steps, both layouts")
    p.add_argument("--models", "--model", default=None,
                   help=f"comma-separated subset of {', '.join(MODELS)} (default: llama-11m and smollm2-135m; "
                        "--quick: llama-11m; --defaults: llama-11m and smollm2)")
    p.add_argument("--defaults", action="store_true",
                   help="both tools at their own defaults, one pass over --examples rows (see the docstring)")
    p.add_argument("--examples", type=int, default=None, help="training rows of a --defaults run (default: per model)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the rows in --defaults mode")
    p.add_argument("--max-lengths", default="512,1024", help="comma-separated max lengths of a --defaults run")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps for every model (default: per model)")
    p.add_argument("--layouts", default=None,
                   help="ft-desk layouts, comma-separated from: same, tokens (default: per model; see the docstring)")
    p.add_argument("--micro-batch", type=int, default=4, help="TRL examples / ft-desk rows (layout same) per pass")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--gc", choices=["off", "on", "both"], default="off", help="gradient checkpointing for both")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both children (default: the CPUs this process may use; with --defaults "
                        "each tool's own choice)")
    p.add_argument("--json", type=Path, help="also write every row and ratio as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (models, logs, run folders)")
    args = p.parse_args(argv)
    default_models = "llama-11m" if args.quick else "llama-11m,smollm2" if args.defaults else "llama-11m,smollm2-135m"
    args.model_keys = (args.models or default_models).split(",")
    if args.threads is None and not args.defaults:
        args.threads = len(os.sched_getaffinity(0))
    unknown = [k for k in args.model_keys if k not in MODELS]
    if unknown:
        p.error(f"--models takes {', '.join(MODELS)}; got {', '.join(unknown)}")
    if args.layouts:
        args.layouts = tuple(args.layouts.split(","))
        if any(layout not in LAYOUTS for layout in args.layouts):
            p.error(f"--layouts takes {', '.join(LAYOUTS)}; got {','.join(args.layouts)}")
    elif args.quick:
        args.layouts = LAYOUTS
    if args.quick and args.steps is None:
        args.steps = 4
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("train.jsonl", "valid.jsonl"):
        if not (DATA_DIR / name).is_file():
            raise SystemExit(f"missing {DATA_DIR / name}: the bench reads the shared WikiSQL sample from there")
    try:
        import datasets  # noqa: F401  (the baseline's dependencies; fail before building anything)
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("the TRL baseline needs the bench extra: pip install -e '.[bench]'") from None
    import importlib.metadata as md

    versions = {n: md.version(n) for n in ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets")}
    tmp = Path(tempfile.mkdtemp(prefix="ft-desk-bench-"))
    env = child_env(args.threads, tmp)
    cpus = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    threads = args.threads or "each tool's default"
    print(f"# {platform.machine()}, {cpus} CPUs, threads={threads}, load average at start {load:.1f}; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    if args.defaults:
        print(f"# --defaults: both tools at their own defaults, {args.epochs:g} pass(es) over the same rows, max "
              f"length {args.max_lengths}; temp folder {tmp}", flush=True)
    elif args.threads > 1 and load > cpus:
        print(f"# warning: the machine is busy (load {load:.1f} on {cpus} CPUs); with {args.threads} threads "
              "OpenMP stalls distort tokens/s, consider --threads 1", flush=True)
    if not args.defaults:
        print(f"# TRL micro-batch {args.micro_batch} examples, max length {args.max_length}, grad accum "
              f"{args.grad_accum}; temp folder {tmp}", flush=True)

    texts = read_texts(DATA_DIR / "train.jsonl")
    valid_rows = (DATA_DIR / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    rows: list[Result] = []
    report: dict = {"versions": versions, "threads": args.threads, "load_at_start": load, "models": {},
                    "rows": [], "ratios": []}
    try:
        idle = run_child([sys.executable, "-c", IDLE_CHILD], env, tmp / "idle.out", tmp / "idle.log").peak
        report["idle_bytes"] = idle
        print(f"# idle baseline (python + torch, transformers, peft, bitsandbytes imported): {idle / MIB:.0f} MiB",
              flush=True)
        for key in args.model_keys:
            spec = MODELS[key]
            info = build_model(spec, tmp / "models" / key, texts)
            lengths = info.pop("lengths")
            model_dir = Path(info["folder"])
            row_length = matched_row_length(lengths, args.micro_batch)
            valid_file = DATA_DIR / "valid.jsonl"
            if spec.val_rows and spec.val_rows < len(valid_rows):
                valid_file = tmp / f"valid-first-{spec.val_rows}.jsonl"  # a temporary subset, used by both
                valid_file.write_text("\n".join(valid_rows[: spec.val_rows]) + "\n", encoding="utf-8")
            steps = args.steps or spec.steps
            layouts = args.layouts or spec.layouts
            if args.defaults:
                examples = args.examples or spec.examples
                train_file = tmp / f"train-first-{examples}.jsonl"  # a temporary subset, used by both
                train_rows = (DATA_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines()[:examples]
                train_file.write_text("\n".join(train_rows) + "\n", encoding="utf-8")
                lengths = lengths[:examples]
            report["models"][key] = {**asdict(spec), **info, "matched_row_length": row_length, "steps_run": steps}
            shape = spec.shape
            layers = (f"{shape.num_hidden_layers} layers x {shape.hidden_size}; tokenizer uses "
                      f"{info['tokenizer_tokens']} of {shape.vocab_size} vocabulary rows") if shape else "pretrained"
            amount = f"{len(lengths)} rows x {args.epochs:g} epoch(s)" if args.defaults else f"{steps} steps"
            print(f"# {key}: {spec.about}, {info['params'] / 1e6:.2f}M parameters ({layers}); rows of "
                  f"{min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.1f}); {amount}; "
                  f"validation {spec.val_rows or len(valid_rows)} rows", flush=True)
            if args.defaults:
                for max_length in [int(v) for v in args.max_lengths.split(",")]:
                    args.max_length = max_length
                    job = Job(f"{key}-L{max_length}", model_dir, valid_file, steps, False, tmp, env, idle,
                              train_file)
                    ours = run_ftdesk(job, args, "defaults", 0)
                    print(f"#   L{max_length} ft-desk {ours.batch}: {ours.tokens_per_s:.0f} tok/s, "
                          f"{ours.peak / MIB:.0f} MiB, {ours.wall_s:.0f} s wall", flush=True)
                    base = run_trl(job, args)
                    print(f"#   L{max_length} trl {base.batch}: {base.tokens_per_s:.0f} tok/s, "
                          f"{base.peak / MIB:.0f} MiB, {base.wall_s:.0f} s wall", flush=True)
                    rows += [ours, base]
                    report["ratios"].append({**ratios(ours, base), "max_length": max_length})
                continue
            for gc in {"off": [False], "on": [True], "both": [False, True]}[args.gc]:
                job = Job(key, model_dir, valid_file, steps, gc, tmp, env, idle)
                ours = []
                for layout in layouts:
                    ours.append(run_ftdesk(job, args, layout, row_length))
                    print(f"#   ft-desk {ours[-1].batch}: {ours[-1].tokens_per_s:.0f} tok/s, "
                          f"{ours[-1].wall_s:.0f} s wall", flush=True)
                base = run_trl(job, args)
                print(f"#   trl {base.batch}: {base.tokens_per_s:.0f} tok/s, {base.wall_s:.0f} s wall", flush=True)
                rows += [*ours, base]
                report["ratios"] += [ratios(r, base) for r in ours]
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print_table(rows)
    print()
    for r in report["ratios"]:
        length = f" L{r['max_length']}" if r.get("max_length") else ""
        ours_val, base_val = r["val_loss"]
        gc = "" if args.defaults else f" gc {'on ' if r['gc'] else 'off'}"
        print(f"ft-desk/TRL  {r['model']:<13}{length}{gc} ft-desk "
              f"{r['ft_desk_batch']:<15} tokens/s x{r['tokens_per_s']:.2f}  tokens/CPU-s x{r['tokens_per_cpu_s']:.2f}  "
              f"peak RSS x{r['peak_memory']:.2f}  above idle x{r['peak_above_idle']:.2f}  "
              f"training peak x{r['train_peak']:.2f}  ready x{r['ready']:.2f}  wall x{r['wall']:.2f}  "
              f"val loss {_fmt(ours_val)} vs {_fmt(base_val)}")
    if args.json:
        report["rows"] = [asdict(r) for r in rows]
        args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
