"""Reload an export with plain transformers (and peft / gguf), the way its users will, and compare it with the
trained model's saved outputs. Runs as a script in a child process: `python reload_check.py ARGS.json`.

It must never import ft_desk: what it proves is that the exported files alone reproduce the trained model. It
reports the ft_desk modules it finds loaded (there must be none) along with its numbers.

ARGS.json fields:
  kind           "merged" | "gguf" | "adapter"
  model_dir      the export folder
  gguf_file      GGUF file name inside model_dir (kind gguf)
  base_dir       base model folder (kind adapter)
  quant          {"quant_type", "double_quant", "compute_dtype", "skip_modules"} to load the base in 4-bit like
                 training did (kind adapter, QLoRA runs), or null
  base_dtype     dtype to load a 16-bit base in (kind adapter)
  reference_dir  folder with reference.json and batch-NNN.safetensors (input_ids, logprobs) from the trained model
  compare_dirs   {label: folder} more saved log-probs to compare against (e.g. the merged model, for a GGUF)
  save_dir       when set, this model's own log-probs are saved there in the same layout
  dtype          dtype to run in ("float32" on CPU)
  device         "cpu" | "cuda"
  extra_eos      token ids to stop on besides the model's generation_config (GGUF: its eot token)
  result         path of the JSON result file to write
"""

import json
import math
import sys
import time
from pathlib import Path

_NOTES = []


def _load(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args["dtype"])
    kind = args["kind"]
    folder = args["model_dir"]
    if kind == "gguf":
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=args["gguf_file"])
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=args["gguf_file"], dtype=dtype)
        except (RuntimeError, ValueError) as exc:
            if not args.get("config_dir"):
                raise
            # transformers rebuilds the config from fewer GGUF keys than llama.cpp reads (e.g. Qwen3's head_dim):
            # load the file's tensors into the merged model's config instead, and say so.
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(args["config_dir"])
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=args["gguf_file"], config=config,
                                                         dtype=dtype)
            _NOTES.append(f"transformers' GGUF config reader failed ({str(exc).splitlines()[0][:160]}); the "
                          "tensors were loaded with the merged model's config")
    elif kind == "adapter":
        from peft import PeftModel

        tokenizer = AutoTokenizer.from_pretrained(folder if Path(folder, "tokenizer_config.json").is_file()
                                                  else args["base_dir"])
        kwargs = {"dtype": getattr(torch, args["base_dtype"])}
        quant = args.get("quant")
        if quant:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant["quant_type"],
                bnb_4bit_use_double_quant=quant["double_quant"],
                bnb_4bit_compute_dtype=getattr(torch, quant["compute_dtype"]),
                llm_int8_skip_modules=quant["skip_modules"] or None,
            )
            kwargs["device_map"] = {"": args["device"] if args["device"] != "cuda" else 0}
        base = AutoModelForCausalLM.from_pretrained(args["base_dir"], **kwargs)
        if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        # bitsandbytes' CPU inference repack changes numerics between train and eval; keep the training path.
        for module in base.modules():
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False
        model = PeftModel.from_pretrained(base, folder)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if kind != "adapter" or not args.get("quant"):
        model.to(args["device"])
    model.eval()
    return model, tokenizer


def _eos_ids(model, extra):
    ids = []
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for tid in ([value] if isinstance(value, int) else list(value or [])):
            if tid not in ids:
                ids.append(tid)
        if ids:
            break
    for tid in extra or []:
        if tid not in ids:
            ids.append(tid)
    return ids


def generation_record(new, expected, eos, text):
    """One greedy reply compared with the trained model's reply to the same prompt (llamacpp_check.py uses it too)."""
    stopped = bool(new) and new[-1] in eos
    same = 0
    for a, b in zip(new, expected):
        if a != b:
            break
        same += 1
    return {"output_ids": new, "stopped": stopped, "stop_id": new[-1] if stopped else None, "same_prefix": same,
            "identical": new == expected, "text": text}


def main(path):
    import torch
    from safetensors.torch import load_file, save_file

    args = json.loads(Path(path).read_text(encoding="utf-8"))
    started = time.time()
    model, tokenizer = _load(args)
    load_s = time.time() - started
    ref_dir = Path(args["reference_dir"])
    reference = json.loads((ref_dir / "reference.json").read_text(encoding="utf-8"))
    save_dir = Path(args["save_dir"]) if args.get("save_dir") else None
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)
    compare = {label: Path(folder) for label, folder in (args.get("compare_dirs") or {}).items()}

    stats = {label: {"kl_sum": 0.0, "kl_max": 0.0, "top1_same": 0, "nll_other": 0.0}
             for label in ["reference", *compare]}
    tokens = 0
    nll_self = 0.0
    token_mismatch = 0
    token_checked = 0
    with torch.no_grad():
        for batch in reference["batches"]:
            ref = load_file(str(ref_dir / batch["file"]))
            ids = ref["input_ids"].to(torch.long)
            if batch.get("text") is not None:
                mine = tokenizer(batch["text"], add_special_tokens=batch["add_special_tokens"])["input_ids"]
                mine = mine[: ids.shape[0]]
                token_checked += 1
                token_mismatch += int(mine != ids.tolist())
            logits = model(input_ids=ids.unsqueeze(0).to(args["device"])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1).cpu().double()
            n = ids.shape[0] - 1
            targets = ids[1:]
            nll_self += float(-logp[:-1].gather(1, targets.unsqueeze(1)).sum())
            tokens += n
            for label in stats:
                other_path = ref_dir / batch["file"] if label == "reference" else compare[label] / batch["file"]
                other = load_file(str(other_path))["logprobs"].double()
                width = min(other.shape[-1], logp.shape[-1])
                p = other[:, :width].exp()
                kl = (p * (other[:, :width] - logp[:, :width])).sum(-1)[:-1]
                stats[label]["kl_sum"] += float(kl.sum())
                stats[label]["kl_max"] = max(stats[label]["kl_max"], float(kl.max()))
                stats[label]["top1_same"] += int((other[:-1].argmax(-1) == logp[:-1].argmax(-1)).sum())
                stats[label]["nll_other"] += float(-other[:-1].gather(1, targets.unsqueeze(1)).sum())
            if save_dir:
                save_file({"input_ids": ref["input_ids"], "logprobs": logp.float().contiguous()},
                          str(save_dir / batch["file"]))

        eos = _eos_ids(model, args.get("extra_eos"))
        generations = []
        for prompt in reference["prompts"]:
            input_ids = torch.tensor([prompt["prompt_ids"]], dtype=torch.long, device=args["device"])
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=reference["max_new_tokens"], do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos[0] if eos else None)
            new = out[0, input_ids.shape[1]:].tolist()
            generations.append(generation_record(new, prompt["output_ids"], eos,
                                                 tokenizer.decode(new, skip_special_tokens=False)))

    result = {
        "tokens": tokens,
        "loss": nll_self / max(tokens, 1),
        "comparisons": {
            label: {
                "mean_kl": s["kl_sum"] / max(tokens, 1),
                "max_kl": s["kl_max"],
                "top1_agreement": s["top1_same"] / max(tokens, 1),
                "loss_other": s["nll_other"] / max(tokens, 1),
            }
            for label, s in stats.items()
        },
        "eos_token_ids": eos,
        "generations": generations,
        "tokenizer": {"checked": token_checked, "mismatched": token_mismatch},
        "load_seconds": load_s,
        "seconds": time.time() - started,
        "notes": _NOTES,
        "ft_desk_modules": sorted(m for m in sys.modules if m.split(".")[0] == "ft_desk"),
        "finite": all(math.isfinite(v) for v in (nll_self,)),
    }
    Path(args["result"]).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
