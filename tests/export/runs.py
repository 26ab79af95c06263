"""Hand-made run folders for export tests, in the layout `ft-desk train` writes (see trainer/run.py).

A tiny model is built locally, loaded the way a QLoRA run loads it (NF4, double quant, fp32 compute on CPU, CPU
repack off), given a LoRA adapter whose B matrices are perturbed so the update is not zero, and saved as the run's
final adapter with its tokenizer, config.json, state.json and data/val.jsonl.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SMALL = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)

VAL_ROWS = [
    {"messages": [{"role": "user", "content": "Where is my order 1182?"},
                  {"role": "assistant", "content": "It left our warehouse today and arrives in two days."}]},
    {"messages": [{"role": "system", "content": "You are the Cog & Compass help desk."},
                  {"role": "user", "content": "Can I return a compass after thirty days?"},
                  {"role": "assistant", "content": "Yes, within sixty days with the receipt."}]},
    {"messages": [{"role": "user", "content": "Do you ship to Norway?"},
                  {"role": "assistant", "content": "We do, in five to seven working days."}]},
    {"text": "The compass needle points north because of the Earth's magnetic field."},
]


@dataclass
class FakeRun:
    run_dir: Path
    model_dir: Path
    extra: dict = field(default_factory=dict)


def build_model(folder: Path, **shape) -> Path:
    from ft_desk.trainer.demo import TinyShape, build_tiny_model

    return build_tiny_model(folder, TinyShape(**{**SMALL, **shape}))


def make_run(root: Path, model_dir: Path, method: str = "qlora", *, added_token: str | None = None,
             lora_targets: str | list[str] = "all-linear", use_dora: bool = False, seed: int = 0,
             modules_to_save: list[str] | None = None, scale: float = 0.05) -> FakeRun:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ft_desk.quant.policy import bnb_config, disable_cpu_repack
    from ft_desk.trainer.presets import load_config

    run_dir = root / f"run-{method}-{seed}"
    run_dir.mkdir(parents=True)
    cfg = load_config(["demo"], [f"model.name={model_dir}", f"train.method={method}", "train.device=cpu",
                                 f"lora.use_dora={str(use_dora).lower()}"])
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2), encoding="utf-8")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs: dict = {"dtype": torch.float32}
    if method == "qlora":
        kwargs["quantization_config"] = bnb_config("nf4", True, "float32", list(cfg.quant.skip_modules))
        kwargs["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    disable_cpu_repack(model)
    if added_token:
        tokenizer.add_special_tokens({"additional_special_tokens": [added_token]})
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    torch.manual_seed(seed)
    if method == "full":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
        out = run_dir / "model"
        out.mkdir()
        from safetensors.torch import save_model

        save_model(model, str(out / "model.safetensors"))
        model.config.save_pretrained(out)
    else:
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=lora_targets, use_dora=use_dora,
                          modules_to_save=modules_to_save, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or "lora_embedding_B" in name:
                    p.normal_(0.0, scale)
                elif "lora_magnitude_vector" in name:
                    p.mul_(1.0 + 0.1 * torch.rand_like(p))
                elif "modules_to_save" in name:
                    p.add_(torch.randn_like(p) * scale)
        out = run_dir / "adapter"
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (run_dir / "data").mkdir()
    with open(run_dir / "data" / "val.jsonl", "w", encoding="utf-8") as f:
        for row in VAL_ROWS:
            f.write(json.dumps(row) + "\n")
    state = {"status": "completed", "step": 4, "total_steps": 4, "best_step": 4, "best_val_loss": 3.0,
             "model_dir": str(model_dir), "model_name": str(model_dir), "method": method, "device": "cpu",
             "final_adapter": str(out)}
    (run_dir / "state.json").write_text(json.dumps(state), encoding="utf-8")
    return FakeRun(run_dir=run_dir, model_dir=model_dir)
