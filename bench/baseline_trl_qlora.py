"""The baseline ft-desk is measured against: a plain QLoRA fine-tune with TRL's SFTTrainer + peft + bitsandbytes,
written the way a typical hobbyist script is (load the model 4-bit, hand SFTTrainer a LoraConfig and an SFTConfig,
train, evaluate). Nothing here is tuned: TRL's defaults stand (no packing, per-batch padding, its own loss and
optimizer choice) except where the comparison needs the same setting as ft-desk (see bench/train_vs_trl.py).

The only additions are for measuring: a callback that stamps the time at the start of training and the end of every
optimizer step, and a JSON result file (per-step loss, TRL's count of non-pad tokens, step times, eval loss). Needs the
`bench` extra (trl, datasets).

    python bench/baseline_trl_qlora.py --model DIR --train train.jsonl --valid valid.jsonl \
        --out OUT_DIR --result result.json --steps 30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local model folder (weights + tokenizer)")
    p.add_argument("--train", required=True, help='training JSONL with {"text": ...} rows')
    p.add_argument("--valid", required=True, help='validation JSONL with {"text": ...} rows')
    p.add_argument("--out", required=True, help="output folder for the trainer")
    p.add_argument("--result", required=True, help="where to write the JSON result")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--defaults", action="store_true",
                   help="TRL's own SFTConfig defaults (batch 8, lr 2e-5, bf16 autocast, gradient checkpointing, "
                        "fused AdamW) for --epochs passes; only --max-length and --epochs are set")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data with --defaults")
    p.add_argument("--adapter-out", default=None, help="save the trained LoRA adapter here (for scoring it)")
    return p.parse_args(argv)


def like_for_like(args, measuring: dict):
    """SFTConfig with the settings train_vs_trl.py gives ft-desk too (see its docstring); TRL's defaults otherwise."""
    from trl import SFTConfig

    return SFTConfig(
        **measuring,
        dataset_text_field="text",
        max_length=args.max_length,
        per_device_train_batch_size=args.micro_batch,
        per_device_eval_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        gradient_checkpointing=args.gradient_checkpointing,
        learning_rate=args.lr,
        max_steps=args.steps,
        bf16=False,
        fp16=False,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_dataset("json", data_files={"train": args.train, "validation": args.valid})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,  # CPU: fp32 compute
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.model, quantization_config=bnb, dtype=torch.float32, device_map={"": "cpu"}
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")

    measuring = dict(output_dir=args.out, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
                     use_cpu=True, seed=args.seed)
    if args.defaults:  # what a user gets from SFTConfig: only the length and the number of passes chosen
        config = SFTConfig(**measuring, dataset_text_field="text", max_length=args.max_length,
                           num_train_epochs=args.epochs)
    else:
        config = like_for_like(args, measuring)

    class StepClock(TrainerCallback):
        """Time stamps: training start, and the end of every optimizer step (measurement only)."""

        def __init__(self) -> None:
            self.stamps: list[tuple[float, float]] = []  # (perf_counter, unix time)

        def on_train_begin(self, args, state, control, **kwargs):
            self.stamps = [(time.perf_counter(), time.time())]

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append((time.perf_counter(), time.time()))

    clock = StepClock()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[clock],
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    train_output = trainer.train()
    if args.adapter_out:
        trainer.model.save_pretrained(args.adapter_out)
    metrics = trainer.evaluate()

    steps = [
        {"step": e["step"], "loss": e["loss"], "num_tokens": e.get("num_tokens")}
        for e in trainer.state.log_history
        if "loss" in e and "eval_loss" not in e
    ]
    stamps = [perf for perf, _ in clock.stamps]
    result = {
        "steps": steps,
        "step_seconds": [b - a for a, b in zip(stamps, stamps[1:])],
        "train_window_unix": [clock.stamps[0][1], clock.stamps[-1][1]],
        "train_runtime": train_output.metrics.get("train_runtime"),
        "eval_loss": metrics.get("eval_loss"),
        "trainable_params": trainable,
        "adapter_dtype": str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad)),
        "optimizer": type(trainer.optimizer).__name__,
        "optim": str(getattr(config.optim, "value", config.optim)),
        "settings": {"batch": config.per_device_train_batch_size, "grad_accum": config.gradient_accumulation_steps,
                     "lr": config.learning_rate, "bf16": config.bf16,
                     "gradient_checkpointing": config.gradient_checkpointing, "max_length": config.max_length},
    }
    Path(args.result).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
