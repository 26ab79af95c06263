"""Training steps/s at 1 torch thread against all cores, with other processes keeping cores busy.

A hobbyist's laptop always has other load (a browser, an IDE, another run). With more OpenMP threads than free
cores, every op waits at a barrier for a thread the scheduler has parked, so the default thread count must be
chosen for the loaded case. This script trains the embedded demo (`ft-desk train --preset demo`) for a few
optimizer steps in child processes, one after the other, while `--busy` spinning processes run alongside, and
prints steps/s for every thread count and the ratios, from one invocation. Runs alternate (1, N, 1, N, ...) so a
change in the other load hits both alike.

    python bench/threads_under_load.py                  # 1 vs all cores, 1 busy process, 2 rounds of 12 steps
    python bench/threads_under_load.py --busy 0 --rounds 3 --threads 1,2,auto
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPIN = "while True: pass"


def run_once(threads: str, steps: int, tmp: Path, tag: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", FT_DESK_HOME=str(tmp / "home"))
    env.pop("OMP_NUM_THREADS", None)  # the trainer's own choice is what is measured
    cmd = [sys.executable, "-m", "ft_desk.trainer.cli.main", "train", "--preset", "demo", "--events", "jsonl",
           "--set", f"train.threads={threads}", "--set", f"train.max_steps={steps}",
           "--set", "eval.every_steps=0", "--set", "eval.sample_prompts=0", "--set", "output.save_every=0",
           "--set", f"output.runs_dir={tmp / 'runs'}", "--set", f"output.run_name={tag}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    steps_ev = [e for e in events if e["type"] == "step"]
    if done.returncode != 0 or len(steps_ev) < 3:
        raise SystemExit(f"run {tag} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    # Skip the first step (warm-up: allocator, first dequantization) in the rate.
    first, last = steps_ev[0], steps_ev[-1]
    return {"steps": last["step"] - first["step"], "seconds": last["elapsed_s"] - first["elapsed_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = len(os.sched_getaffinity(0))
    p.add_argument("--threads", default=f"1,{cores}", help="comma-separated train.threads values to compare")
    p.add_argument("--busy", type=int, default=1, help="spinning processes run alongside (the other load)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--rounds", type=int, default=2, help="runs per thread count (alternating)")
    args = p.parse_args(argv)
    choices = args.threads.split(",")
    load = os.getloadavg()[0]
    print(f"# {cores} CPUs, load average {load:.1f} at start, {args.busy} extra busy process(es), "
          f"{args.steps} steps x {args.rounds} rounds of the demo", flush=True)
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.busy)]
    totals = {t: [0, 0.0] for t in choices}
    try:
        with tempfile.TemporaryDirectory(prefix="ft-desk-threads-") as tmp:
            for r in range(args.rounds):
                for t in choices:
                    got = run_once(t, args.steps, Path(tmp), f"r{r}-t{t}")
                    totals[t][0] += got["steps"]
                    totals[t][1] += got["seconds"]
                    print(f"#   round {r + 1} threads={t}: {got['steps'] / got['seconds']:.2f} steps/s", flush=True)
    finally:
        for s in spinners:
            s.kill()
            s.wait()
    rates = {t: n / s for t, (n, s) in totals.items()}
    base = rates[choices[0]]
    for t, rate in rates.items():
        print(f"threads={t:<5} {rate:6.2f} steps/s  x{rate / base:.2f} vs threads={choices[0]}")
    print(f"# load average at end {os.getloadavg()[0]:.1f}; {time.strftime('%H:%M:%S')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
