"""One training lever at a time on the real SmolLM2-135M-Instruct: tokens/s and peak RSS of ft-desk's own training
micro-batches (forward, backward, AdamW step) at the qlora defaults, against the defaults in the same invocation.

Each variant runs in a fresh child process (so its peak RSS is its own): it builds the run exactly as `ft-desk
train --preset qlora` does (training/run.setup: the data sized by recipe_sizing, the 4-bit base, LoRA, the same
saved-activation storage), trains --warmup micro-batches unmeasured, then --batches measured ones. Variants take
turns round after round, so a change in other load hits all of them alike. Peak RSS is the child's high-water
mark (it includes the model load, the same for every variant); "RSS at setup" is what it held before training.

    python bench/train_levers.py                                   # defaults vs fp32 activations, dropout 0.05, GC
    python bench/train_levers.py --variant train.micro_batch_tokens=512 --rounds 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/real_smollm2.py, bench/real_model.py
DEFAULT_VARIANTS = ["train.saved_activations=float32", "lora.dropout=0.05", "train.gradient_checkpointing=true"]

CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
import psutil, torch
from ft_desk.trainer.data.batching import collate
from ft_desk.trainer.events import ListSink
from ft_desk.trainer.presets import load_config
from ft_desk.trainer.training import run as R

args = json.loads(sys.argv[1])
cfg = load_config(["qlora"], [f"model.name={args['model']}", f"data.train_file={args['train']}",
                              f"data.valid_file={args['valid']}", *args["sets"]])
run = R.setup(cfg, Path(tempfile.mkdtemp()), ListSink(), resumed=False)
at_setup = psutil.Process().memory_info().rss
ctx = R.fit_context(run, ListSink(), R.StopFlag())
model, store = run.model, ctx.saved_activations
model.train()

def micro_batch(mb):
    batch = collate(run.data.train, mb, run.tokenizer.pad_token_id, run.device, run.cfg.train.packing)
    with (store or __import__("contextlib").nullcontext()):
        loss = ctx.loss_fn(model, batch, run.cfg.train.loss_chunk_tokens)
    (loss / max(1, mb.target_tokens)).backward()
    if store is not None:
        store.release()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()) / max(1, mb.target_tokens), mb.tokens

plan = run.schedule[: args["warmup"] + args["batches"]]
for mb in plan[: args["warmup"]]:
    micro_batch(mb)
started, tokens, losses = time.perf_counter(), 0, []
for mb in plan[args["warmup"]:]:
    loss, n = micro_batch(mb)
    tokens += n
    losses.append(loss)
seconds = time.perf_counter() - started
print(json.dumps({"tokens": tokens, "seconds": seconds, "threads": torch.get_num_threads(),
                  "rss_setup": at_setup, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "micro_batch": [run.fit_cfg.train.micro_batch_size, run.fit_cfg.train.row_length],
                  "last_loss": losses[-1]}))
"""


def run_variant(sets: list[str], files: dict, warmup: int, batches: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    payload = json.dumps({**files, "sets": sets, "warmup": warmup, "batches": batches})
    done = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"variant {sets or 'defaults'} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                   help="settings of one variant on top of the defaults (repeat); default: "
                   + "; ".join(DEFAULT_VARIANTS))
    p.add_argument("--rows", type=int, default=300, help="WikiSQL training rows (prompt/completion)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batches", type=int, default=12, help="measured micro-batches per variant and round")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="train.threads of every variant (one count for all, so only the lever differs; 0: auto)")
    args = p.parse_args(argv)
    from real_model import WIKISQL, split_rows, write_jsonl
    from real_smollm2 import smollm2_folder

    variants = [[]] + [v.split(",") for v in (args.variant or DEFAULT_VARIANTS)]
    threads = [f"train.threads={args.threads}"]
    totals: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ft-desk-levers-") as tmp:
        files = {"model": str(smollm2_folder()),
                 "train": str(write_jsonl(Path(tmp) / "train.jsonl", split_rows(WIKISQL / "train.jsonl", args.rows))),
                 "valid": str(write_jsonl(Path(tmp) / "valid.jsonl", split_rows(WIKISQL / "valid.jsonl", 20)))}
        for r in range(args.rounds):
            for i, sets in enumerate(variants):
                got = run_variant(threads + sets, files, args.warmup, args.batches)
                t = totals.setdefault(i, {"tokens": 0, "seconds": 0.0, "peak_rss": 0, "rss_setup": 0})
                t["tokens"] += got["tokens"]
                t["seconds"] += got["seconds"]
                t["peak_rss"] = max(t["peak_rss"], got["peak_rss"])
                t["rss_setup"] = max(t["rss_setup"], got["rss_setup"])
                t.update(threads=got["threads"], micro_batch=got["micro_batch"], last_loss=got["last_loss"])
                print(f"# round {r + 1} {' '.join(sets) or 'defaults'}: {got['tokens'] / got['seconds']:.1f} "
                      f"tokens/s, peak {got['peak_rss'] / 2**30:.2f} GiB", flush=True)
    gib = 2**30
    base = totals[0]
    rate0 = base["tokens"] / base["seconds"]
    print(f"# SmolLM2-135M-Instruct, qlora defaults, {args.rows} WikiSQL rows, micro-batch "
          f"{base['micro_batch'][0]} x {base['micro_batch'][1]} tokens, {args.batches} micro-batches x "
          f"{args.rounds} round(s), {os.cpu_count()} CPUs")
    print(f"{'variant':<40}{'threads':>8}{'tok/s':>8}{'x':>7}{'peak RSS':>10}{'x':>7}{'at setup':>10}")
    for i, sets in enumerate(variants):
        t = totals[i]
        rate = t["tokens"] / t["seconds"]
        print(f"{' '.join(sets) or 'defaults':<40}{t['threads']:>8}{rate:>8.1f}{rate / rate0:>7.2f}"
              f"{t['peak_rss'] / gib:>9.2f}G{t['peak_rss'] / base['peak_rss']:>7.2f}{t['rss_setup'] / gib:>9.2f}G")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
