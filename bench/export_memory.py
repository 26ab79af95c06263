"""Peak memory of ft-desk's streaming merge vs peft's merge_and_unload + save_pretrained, from one invocation.

Builds a random-weight Llama-shaped model of about 500M parameters (bf16 safetensors, like a downloaded model) and a
rank-16 LoRA adapter on every linear layer, in a fake QLoRA run folder. Then, each in a fresh subprocess so peaks
do not mix, it measures peak resident memory (ru_maxrss) of:
  baseline   load the base in bf16, PeftModel.from_pretrained, merge_and_unload, save_pretrained
  streaming  ft-desk's merge into the NF4 weights the adapter trained against (the export default), bf16 out
  original   ft-desk's streaming merge into the original bf16 weights (same work as the baseline)
and prints each peak and the ratios. Imports are part of every peak (torch alone is a few hundred MB).

    python bench/export_memory.py [--layers 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(root: Path, layers: int) -> tuple[Path, Path]:
    """(model dir, run dir): a Llama (16 layers: ~500M parameters) in bf16 and a run with a random LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ft_desk.trainer.demo import train_tokenizer
    from ft_desk.trainer.presets import load_config

    model_dir = root / "model"
    model_dir.mkdir()
    train_tokenizer(["hello world, a small corpus for a bench tokenizer"] * 8, 512, model_dir)
    config = LlamaConfig(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=layers,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir, max_shard_size="1GB")
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    run_dir = root / "run"
    (run_dir / "data").mkdir(parents=True)
    peft_model.save_pretrained(run_dir / "adapter")
    cfg = load_config(["qlora"], [f"model.name={model_dir}", "train.device=cpu"])
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    (run_dir / "state.json").write_text(json.dumps({"status": "completed", "model_dir": str(model_dir),
                                                     "device": "cpu", "step": 1, "best_step": 1}))
    print(f"model: {params / 1e6:.0f}M parameters, {layers} layers, bf16 in {model_dir}", flush=True)
    return model_dir, run_dir


def _peak_mb() -> float:
    """This process's peak resident memory in MB.

    Linux carries ru_maxrss across exec, so a child forked from a big parent would report the parent's size;
    VmHWM belongs to the process's own address space and starts fresh at exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_baseline(model_dir: str, run_dir: str, out: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, f"{run_dir}/adapter").merge_and_unload()
    merged.save_pretrained(out)


def child_streaming(run_dir: str, out: str, merge_into: str) -> None:
    from ft_desk.trainer.export.merged import plan_merge, write_weights
    from ft_desk.trainer.export.source import open_run

    plan = plan_merge(open_run(Path(run_dir)), "bf16", merge_into)
    Path(out).mkdir()
    write_weights(plan, Path(out))


def measure(kind: str, model_dir: Path, run_dir: Path, root: Path) -> tuple[float, float]:
    out = root / f"out-{kind}"
    started = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(model_dir), str(run_dir), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    peak = float(proc.stdout.strip().splitlines()[-1])
    return peak, time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (16 gives about 500M parameters)")
    parser.add_argument("--keep", type=Path, default=None, help="build in this folder and keep it")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(Path(args.build[0]), int(args.build[1]))
        return
    if args.child:
        kind, model_dir, run_dir, out = args.child
        if kind == "baseline":
            child_baseline(model_dir, run_dir, out)
        else:
            child_streaming(run_dir, out, "quantized" if kind == "streaming" else "original")
        print(_peak_mb())
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = args.keep or Path(tempfile.mkdtemp(prefix="ft-desk-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    # The model is built in a child too, so this process stays small while the measured children run.
    subprocess.run([sys.executable, __file__, "--build", str(root), str(args.layers)], check=True)
    model_dir, run_dir = root / "model", root / "run"
    shard = max(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20
    total = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20
    results = {kind: measure(kind, model_dir, run_dir, root) for kind in ("baseline", "streaming", "original")}
    print(f"base weights: {total:.0f} MB in bf16, largest shard {shard:.0f} MB")
    for kind, (peak, seconds) in results.items():
        print(f"{kind:>9}: peak RSS {peak:7.0f} MB  ({seconds:.0f} s)")
    base = results["baseline"][0]
    print(f"ratio streaming (NF4-exact) / peft baseline: {results['streaming'][0] / base:.2f}")
    print(f"ratio streaming (original)  / peft baseline: {results['original'][0] / base:.2f}")
    if args.keep is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
