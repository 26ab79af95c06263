"""Kill anywhere, resume, and compare: SIGKILLs at random moments of real `ft-desk train` and `ft-desk export`
child processes, against an uninterrupted run measured in the same session.

Training: a tiny Llama (random weights, built here) is trained once straight through, then again in trials, each
killed 1-4 times - half the kills after a random delay anywhere in the process's life (imports, model load, data,
steps, checkpoint writes, pruning, the final rename), half a few milliseconds after a random `step` or `checkpoint`
event (inside a checkpoint write or the pruning after it) - and resumed with `ft-desk train --resume` until it
completes. After every kill the run folder must be whole: state.json parses, every checkpoint passes the resume
checks, events.jsonl has at most one torn line. A trial is bit-exact when its final adapter, last checkpoint's
optimizer and RNG state and every step's loss equal the straight run's.

Export: `ft-desk export --force` into a folder holding a file of the user's, killed at a random moment, then run
again to completion: the user's file must be untouched, the folder must never show a half export, and the second
export must be complete.

    python bench/fault_soak.py                 # 24 training kills, 6 export kills (~10-20 minutes on 1 thread)
    python bench/fault_soak.py --kills 3 --export-kills 1   # the short version CI runs (tests/trainer/training)

It prints the figures: kills, trials resumed bit-exact, checkpoints damaged, files lost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLI = [sys.executable, "-m", "ft_desk.trainer.cli.main"]
STEPS = 8


@dataclass
class Figures:
    trials: int = 0
    kills: int = 0
    resumes: int = 0
    restarts_before_run_folder: int = 0
    bit_exact: int = 0
    damaged_checkpoints: int = 0
    unreadable_states: int = 0
    torn_event_lines: int = 0
    export_kills: int = 0
    user_files_lost: int = 0
    half_exports_seen: int = 0
    exports_completed_after_kill: int = 0
    stale_staging_folders: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def files_lost(self) -> int:
        return self.damaged_checkpoints + self.unreadable_states + self.user_files_lost + self.half_exports_seen


def _env(home: Path, threads: int) -> dict[str, str]:
    return dict(os.environ, FT_DESK_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")


def train_args(model_dir: Path, name: str, threads: int) -> list[str]:
    return ["train", "--events", "jsonl", "--set", f"model.name={model_dir}", "--set", f"train.max_steps={STEPS}",
            "--set", "output.save_every=2", "--set", "eval.every_steps=0", "--set", "eval.sample_prompts=0",
            "--set", "lora.dropout=0.1", "--set", "train.micro_batch_size=2", "--set", "train.grad_accum=2",
            "--set", "data.max_length=128", "--set", f"train.threads={threads}", "--set", f"output.run_name={name}"]


def run_killed(cmd: list[str], env: dict[str, str], rng: random.Random, span: float,
               on_events: bool = True) -> tuple[bool, int | None]:
    """Run `cmd`, SIGKILLing it at a random moment: within `span` seconds of its start, or (half the time, with
    `on_events`) just after a random step or checkpoint event. Returns (killed, exit code if it ended itself)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    killed = threading.Event()

    def kill() -> None:
        if proc.poll() is None:
            killed.set()
            proc.send_signal(signal.SIGKILL)

    timer = None
    on_event = on_events and rng.random() < 0.5
    target = rng.choice(["step", "checkpoint"])
    skip = rng.randrange(0, 4)
    if not on_event:
        timer = threading.Timer(rng.uniform(0.2, span), kill)
        timer.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        if on_event and not killed.is_set() and f'"type": "{target}"' in line:
            if skip:
                skip -= 1
                continue
            time.sleep(rng.uniform(0.0, 0.05))  # inside the checkpoint write, the pruning, or the next step
            kill()
    code = proc.wait()
    if timer is not None:
        timer.cancel()
    return killed.is_set(), None if killed.is_set() else code


def check_run_folder(run_dir: Path, figures: Figures) -> None:
    """What a SIGKILL must never leave: an unreadable state.json, a checkpoint that fails the resume checks, more
    than one torn line in events.jsonl."""
    from ft_desk.trainer import run_folder
    from ft_desk.trainer.training import checkpoint as ckpt
    from ft_desk.trainer.training.model import load_run_config

    try:
        json.loads(run_folder.state_path(run_dir).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except ValueError:
        figures.unreadable_states += 1
        figures.problems.append(f"{run_dir.name}: state.json unreadable after a kill")
    if not run_folder.config_path(run_dir).is_file():
        return  # killed before the run wrote its config: nothing to check yet
    cfg = load_run_config(run_dir)
    for folder in run_folder.checkpoint_folders(run_dir):
        problem = ckpt.check_checkpoint(folder, cfg)
        if problem:
            figures.damaged_checkpoints += 1
            figures.problems.append(f"{run_dir.name}/{folder.name}: {problem}")
    torn = 0
    for line in run_folder.events_path(run_dir).read_text(encoding="utf-8").splitlines():
        try:
            json.loads(line)
        except ValueError:
            torn += 1
    figures.torn_event_lines += torn
    if torn > 1:
        figures.problems.append(f"{run_dir.name}: {torn} torn lines in events.jsonl")


def fingerprint(run_dir: Path) -> dict:
    """What must be bit-identical to the straight run: final adapter, last checkpoint's optimizer and RNG state,
    the loss of every step (a resumed run repeats steps after its checkpoint: the last one counts)."""
    from safetensors.torch import load_file

    from ft_desk.trainer import run_folder
    from ft_desk.trainer.events import read_events

    last = run_folder.step_folder(run_dir, STEPS)
    tensors = {}
    for label, path in (("adapter", run_dir / "adapter" / run_folder.ADAPTER_WEIGHTS),
                        ("optimizer", last / "optimizer.safetensors"), ("rng", last / "rng.safetensors")):
        for key, value in load_file(str(path)).items():
            tensors[f"{label}:{key}"] = value
    losses = {e["step"]: e["loss"] for e in read_events(run_folder.events_path(run_dir)) if e["type"] == "step"}
    return {"tensors": tensors, "losses": losses}


def same(a: dict, b: dict) -> bool:
    return (a["losses"] == b["losses"] and a["tensors"].keys() == b["tensors"].keys()
            and all(a["tensors"][k].equal(b["tensors"][k]) for k in a["tensors"]))


def soak_training(work: Path, model_dir: Path, kills: int, rng: random.Random, threads: int, figures: Figures,
                  say) -> Path:
    home = work / "home"
    env = _env(home, threads)
    started = time.monotonic()
    straight = subprocess.run(CLI + train_args(model_dir, "straight", threads), env=env, capture_output=True,
                              text=True)
    span = time.monotonic() - started
    if straight.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{straight.stderr[-3000:]}")
    straight_dir = home / "runs" / "straight"
    reference = fingerprint(straight_dir)
    say(f"uninterrupted run: {span:.1f} s, {STEPS} steps")

    trial = 0
    while figures.kills < kills:
        trial += 1
        figures.trials += 1
        name = f"trial-{trial}"
        run_dir = home / "runs" / name
        budget = min(rng.randint(1, 4), kills - figures.kills)
        killed_here = 0
        first = True
        while True:
            resume = not first and (run_dir / "state.json").is_file() and (run_dir / "config.json").is_file()
            if not first and not resume:
                shutil.rmtree(run_dir, ignore_errors=True)  # killed before the run folder held a run
                figures.restarts_before_run_folder += 1
            cmd = CLI + (["train", "--resume", str(run_dir), "--events", "jsonl"] if resume
                         else train_args(model_dir, name, threads))
            figures.resumes += int(resume)
            first = False
            if killed_here < budget:
                killed, code = run_killed(cmd, env, rng, span)
            else:
                killed, code = False, subprocess.run(cmd, env=env, capture_output=True, text=True).returncode
            if killed:
                killed_here += 1
                figures.kills += 1
                check_run_folder(run_dir, figures)
                continue
            if code != 0:
                figures.problems.append(f"{name}: a run ended with exit code {code}")
                break
            break
        exact = code == 0 and same(fingerprint(run_dir), reference)
        figures.bit_exact += int(exact)
        say(f"trial {trial}: {killed_here} kill(s), {'bit-exact' if exact else 'DIFFERENT'}")
    return straight_dir


def soak_export(work: Path, run_dir: Path, kills: int, rng: random.Random, threads: int, figures: Figures,
                say) -> None:
    env = _env(work / "home", threads)
    for k in range(kills):
        fmt = ("adapter", "merged")[k % 2]
        out = work / "exports" / f"{fmt}-{k}"
        out.mkdir(parents=True)
        mine = out / "notes.txt"
        mine.write_text("the user's own notes", encoding="utf-8")
        cmd = CLI + ["export", str(run_dir), "--format", fmt, "--out", str(out), "--force", "--json"]
        started = time.monotonic()
        subprocess.run(cmd + ["--no-verify"], env=env, capture_output=True, text=True)  # to time it
        span = time.monotonic() - started
        for p in list(out.iterdir()):
            if p != mine:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        # The timed export skipped verification, so a kill within its span lands before the verified one ends.
        killed, code = run_killed(cmd, env, rng, span, on_events=False)
        figures.export_kills += int(killed)
        if not mine.is_file() or mine.read_text(encoding="utf-8") != "the user's own notes":
            figures.user_files_lost += 1
        figures.half_exports_seen += int(not _export_whole(out, mine))
        again = subprocess.run(cmd, env=env, capture_output=True, text=True)
        done = again.returncode == 0 and _export_whole(out, mine) and len(list(out.iterdir())) > 2
        figures.exports_completed_after_kill += int(done)
        if not done:
            figures.problems.append(f"export {fmt}-{k}: the export after the kill did not complete "
                                    f"(exit {again.returncode}): {again.stderr[-500:]}")
        figures.stale_staging_folders += sum(1 for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
        say(f"export {k + 1} ({fmt}): {'killed' if killed else 'finished before the kill'}, "
            f"then {'completed' if done else 'FAILED'}")


def _export_whole(out: Path, mine: Path) -> bool:
    """The folder holds the user's file alone, or with a complete export (every file its manifest lists)."""
    entries = [p for p in out.iterdir() if p != mine]
    if not entries:
        return True
    manifest = out / ".ft-desk-export.json"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((out / f).is_file() for f in files)


def soak(work: Path, kills: int = 24, export_kills: int = 6, seed: int = 0, threads: int = 1,
         say=print) -> Figures:
    from ft_desk.trainer.demo import TinyShape, build_tiny_model

    rng = random.Random(seed)
    figures = Figures()
    model_dir = build_tiny_model(work / "model", TinyShape(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    straight_dir = soak_training(work, model_dir, kills, rng, threads, figures, say)
    if export_kills:
        soak_export(work, straight_dir, export_kills, rng, threads, figures, say)
    return figures


def report(f: Figures) -> str:
    lines = [
        f"training: {f.kills} SIGKILLs over {f.trials} trials ({f.resumes} resumes, "
        f"{f.restarts_before_run_folder} restarts of runs killed before their folder held a run)",
        f"  resumed bit-exact (adapter, optimizer, RNG, every step's loss): {f.bit_exact}/{f.trials}",
        f"  checkpoints failing the resume checks after a kill: {f.damaged_checkpoints}; unreadable state.json: "
        f"{f.unreadable_states}; torn events.jsonl lines: {f.torn_event_lines}",
        f"export: {f.export_kills} SIGKILLs; user files lost: {f.user_files_lost}; half exports visible: "
        f"{f.half_exports_seen}; completed when run again: {f.exports_completed_after_kill}; hidden staging "
        f"folders a SIGKILL left behind: {f.stale_staging_folders}",
        f"files lost: {f.files_lost}",
    ]
    lines += [f"problem: {p}" for p in f.problems]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=24, help="SIGKILLs of training runs (default 24)")
    parser.add_argument("--export-kills", type=int, default=6, help="SIGKILLs of exports (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="ft-desk-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        figures = soak(work, args.kills, args.export_kills, args.seed, args.threads)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(report(figures))
    ok = figures.files_lost == 0 and figures.bit_exact == figures.trials and not figures.problems
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
