"""Generation tokens/s on CPU: ft-desk's generate on its 4-bit QLoRA model against transformers' own `generate`
on the same model in 16-bit (bf16), from one invocation.

For each model the same prompts (the first rows of the WikiSQL validation sample, cut to --prompt-tokens) are
continued greedily for exactly --new-tokens tokens, one prompt at a time:
  transformers bf16   AutoModelForCausalLM in bfloat16, `model.generate` (min_new_tokens = max_new_tokens);
  ft-desk             the base loaded as a qlora run loads it (NF4 4-bit, fp32 compute on CPU) with a LoRA
                      adapter on top (peft, as after training), through ft_desk.trainer.generation.generate:
                      the 4-bit weights are dequantized once per call, the adapter merged (`inference_weights`);
  ft-desk per-token   the same model with the dense copy turned off: every token dequantizes every weight
                      (ft-desk before this change; --skip-per-token to leave it out, it is slow).
Models: `tiny` (the demo's Llama shape, random weights) and `smollm2` (the real SmolLM2-135M-Instruct, from the
GGUF tests/real_model.py fetches, see bench/real_smollm2.py).

    python bench/generate_speed.py                      # both models, 32 new tokens, 2 prompts, 3 rounds
    python bench/generate_speed.py --models smollm2 --threads 1 --skip-per-token
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/real_smollm2.py
DATA = HERE.parent.parent / "shared" / "data" / "wikisql" / "valid.jsonl"


def model_folder(key: str, tmp: Path) -> Path:
    if key == "smollm2":
        from real_smollm2 import smollm2_folder

        return smollm2_folder()
    from ft_desk.trainer.demo import DEMO_SHAPE, build_tiny_model

    return build_tiny_model(tmp / "tiny", DEMO_SHAPE)


def prompts_for(tokenizer, count: int, length: int) -> list[list[int]]:
    rows = [json.loads(line)["text"] for line in DATA.read_text(encoding="utf-8").splitlines()[:count]]
    return [tokenizer(text)["input_ids"][:length] for text in rows]


def time_generation(fn, prompts) -> tuple[float, int]:
    """(seconds, new tokens) over all prompts."""
    started, tokens = time.perf_counter(), 0
    for ids in prompts:
        tokens += fn(ids, None)
    return time.perf_counter() - started, tokens


def bench_model(key: str, args, tmp: Path) -> dict:
    """tokens/s of every mode; the modes take turns, round after round, so a change in the load hits all."""
    import torch
    from transformers import AutoModelForCausalLM

    from ft_desk.trainer import generation
    from ft_desk.trainer.presets import load_config
    from ft_desk.trainer.training.model import attach_lora, load_base

    folder = model_folder(key, tmp)
    cfg = load_config(["qlora"], [f"model.name={folder}", "train.device=cpu"])
    ours, tokenizer, _ = load_base(cfg, "cpu")
    ours = attach_lora(ours, cfg).eval()
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    prompts = prompts_for(tokenizer, args.prompts, args.prompt_tokens)
    new = args.new_tokens

    def run_ours(ids, limit):
        (out,) = generation.generate(ours, tokenizer, [ids], max_new_tokens=limit or new, stop_ids=[])
        return out.tokens

    def run_per_token(ids, limit):
        share = generation.DENSE_RAM_SHARE
        generation.DENSE_RAM_SHARE = 0.0  # no dense copy: every token dequantizes every weight
        try:
            return run_ours(ids, limit)
        finally:
            generation.DENSE_RAM_SHARE = share

    def run_plain(ids, limit):
        with torch.no_grad():
            out = plain.generate(input_ids=torch.tensor([ids]),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=limit or new, min_new_tokens=limit or new, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or 0)
        return out.shape[1] - len(ids)

    modes = {"ft-desk": run_ours, "transformers bf16": run_plain}
    if not args.skip_per_token:
        modes["ft-desk per-token"] = run_per_token
    for fn in modes.values():
        fn(prompts[0][:4], 2)  # warm-up, untimed
    totals = {name: [0.0, 0] for name in modes}
    for _ in range(args.rounds):
        for name, fn in modes.items():
            seconds, tokens = time_generation(fn, prompts)
            totals[name][0] += seconds
            totals[name][1] += tokens
    return {name: tokens / seconds for name, (seconds, tokens) in totals.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="turns each mode takes (they alternate)")
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: ft-desk's default, the free cores)")
    p.add_argument("--skip-per-token", action="store_true", help="leave out the slow per-token dequantizing path")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ft_desk.trainer.quiet import quiet_libraries
    from ft_desk.trainer.training.threads import apply_threads

    quiet_libraries()
    threads = apply_threads(args.threads)
    print(f"# {len(os.sched_getaffinity(0))} CPUs, {threads} torch thread(s), load average {os.getloadavg()[0]:.1f}; "
          f"{args.prompts} prompts of <= {args.prompt_tokens} tokens, {args.new_tokens} new tokens each, "
          f"{args.rounds} rounds", flush=True)
    with tempfile.TemporaryDirectory(prefix="ft-desk-gen-") as tmp:
        for key in args.models.split(","):
            results = bench_model(key, args, Path(tmp))
            base = results["transformers bf16"]
            for name, rate in results.items():
                print(f"{key:<8} {name:<18} {rate:7.1f} tok/s  x{rate / base:.2f} vs transformers bf16", flush=True)
    print(f"# load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
