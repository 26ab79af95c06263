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


# Text for the sentencepiece-style tokenizer: the demo corpus plus accented words, so that "é" and friends are
# in its alphabet while an emoji is not (it must fall back to <0xNN> byte tokens).
ACCENTED = "The café serves crème brûlée and naïve über-coffee for 3.50 each, déjà vu."
# A Mistral-style chat template whose markers are special tokens, as in Mistral v0.3.
INST_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                 "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}"
                 "{% endif %}{% endfor %}")


def build_spm_model(folder: Path, architecture: str = "mistral", **shape) -> Path:
    """A tiny model with a sentencepiece-style tokenizer, laid out as Llama 2 / Mistral ship theirs.

    BPE with byte fallback; ids 0-2 are <unk>, <s>, </s>, ids 3-258 the 256 <0xNN> byte tokens, then the learned
    pieces; a Metaspace pre-tokenizer ("▁" for spaces, prepended to the start of the input only) and decoder; BOS
    added to every encoding; [INST] / [/INST] as special tokens used by the chat template. The vocabulary is
    trained here (words split at spaces, as sentencepiece does) and comes to exactly 1024 tokens.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from ft_desk.trainer.demo import demo_data_path

    folder.mkdir(parents=True, exist_ok=True)
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    rows = [json.loads(line) for line in demo_data_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [m["content"] for row in rows for m in row["messages"]] + [ACCENTED] * 3
    learner.train_from_iterator(texts,
                                trainer=trainers.BpeTrainer(vocab_size=1024 - len(head) - 2, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: i for i, token in enumerate(head)}
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in learned["merges"]], byte_fallback=True,
                               unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False),
                                     decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["[INST]", "[/INST]"], model_max_length=4096)
    assert len(fast) == 1024, len(fast)
    fast.chat_template = INST_TEMPLATE
    fast.save_pretrained(folder)
    dims = {**SMALL, **shape}
    dims.pop("vocab_size")
    config = AutoConfig.for_model(architecture, vocab_size=1024, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                                  max_position_embeddings=1024, tie_word_embeddings=False, **dims)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


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
