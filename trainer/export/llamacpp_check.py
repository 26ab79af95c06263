"""llama.cpp itself, through llama-cpp-python, on an exported GGUF. Runs as a script in a child process:
`python llamacpp_check.py ARGS.json`, so llama.cpp's log lines never reach the export's stdout (which carries
JSON events) and a crash inside llama.cpp cannot take the export down with it.

Like reload_check.py it never imports ft_desk: it proves what llama.cpp does with the file alone.

ARGS.json fields:
  mode           "quantize" | "score"
  result         path of the JSON result file to write
  quantize:  src (an F16 GGUF), dst (the file to write), ftype (a llama_ftype constant name, e.g.
             "MOSTLY_Q4_K_M")
  score:     model (the GGUF), reference_dir (reference.json and batch-NNN.safetensors with input_ids and
             logprobs from the trained model)
Thread counts are llama.cpp's and llama-cpp-python's defaults (all cores to quantize, half of them to run).

The score result has the layout reload_check.py writes (tokens, loss, comparisons.reference, eos_token_ids,
generations, tokenizer), so the exporter judges both with the same code.
"""

import ctypes
import json
import sys
import time
from pathlib import Path


def quantize(args):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_" + args["ftype"])
    started = time.time()
    code = llama_cpp.llama_model_quantize(str(args["src"]).encode(), str(args["dst"]).encode(),
                                          ctypes.byref(params))
    if code != 0 or not Path(args["dst"]).is_file():
        raise SystemExit(f"llama_model_quantize returned {code}")
    return {"seconds": time.time() - started, "llama_cpp_version": llama_cpp.__version__}


def score(args):
    import llama_cpp
    import numpy as np
    from reload_check import generation_record  # the sibling script (this folder is on sys.path), no ft_desk code
    from safetensors.numpy import load_file

    started = time.time()
    ref_dir = Path(args["reference_dir"])
    reference = json.loads((ref_dir / "reference.json").read_text(encoding="utf-8"))
    longest = max([b["tokens"] + 1 for b in reference["batches"]]
                  + [len(p["prompt_ids"]) + reference["max_new_tokens"] for p in reference["prompts"]])
    llm = llama_cpp.Llama(model_path=str(args["model"]), n_ctx=longest + 8, n_batch=max(512, longest + 8),
                          logits_all=True, verbose=False)
    load_s = time.time() - started
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    spm = llm.metadata.get("tokenizer.ggml.model") == "llama"

    kl_sum = kl_max = nll_self = nll_ref = 0.0
    tokens = top1 = checked = mismatched = 0
    for batch in reference["batches"]:
        ref = load_file(str(ref_dir / batch["file"]))
        ids = ref["input_ids"].astype(np.int64).tolist()
        ref_lp = ref["logprobs"].astype(np.float64)
        if batch.get("text") is not None:
            mine = llm.tokenize(batch["text"].encode("utf-8"), add_bos=batch["add_special_tokens"], special=True)
            checked += 1
            mismatched += int(list(mine[: len(ids)]) != ids)
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        width = min(logits.shape[-1], ref_lp.shape[-1])
        top = logits.max(-1, keepdims=True)
        lp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        p = np.exp(ref_lp[:, :width])
        kl = (p * (ref_lp[:, :width] - lp[:, :width])).sum(-1)[:-1]
        targets = np.asarray(ids[1:])
        rows = np.arange(len(ids) - 1)
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        nll_self += float(-lp[rows, targets].sum())
        nll_ref += float(-ref_lp[rows, targets].sum())
        top1 += int((ref_lp[:-1].argmax(-1) == lp[:-1].argmax(-1)).sum())
        tokens += len(ids) - 1

    generations = []
    for prompt in reference["prompts"]:
        # Greedy decoding, token by token, so the ids can be compared with the trained model's own reply.
        llm.reset()
        llm.eval(prompt["prompt_ids"])
        new = []
        for _ in range(reference["max_new_tokens"]):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            new.append(nxt)
            if nxt in eog:
                break
            llm.eval([nxt])
        text = llm.detokenize(new, special=True).decode("utf-8", errors="replace")
        generations.append(generation_record(new, prompt["output_ids"], eog, text))
    llm.close()
    n = max(tokens, 1)
    return {
        "tokens": tokens,
        "loss": nll_self / n,
        "comparisons": {"reference": {"mean_kl": kl_sum / n, "max_kl": kl_max, "top1_agreement": top1 / n,
                                      "loss_other": nll_ref / n}},
        "eos_token_ids": eog,
        "generations": generations,
        "tokenizer": {"checked": checked, "mismatched": mismatched, "sentencepiece": spm},
        "load_seconds": load_s,
        "seconds": time.time() - started,
        "notes": [],
        "ft_desk_modules": sorted(m for m in sys.modules if m.split(".")[0] == "ft_desk"),
        "llama_cpp_version": llama_cpp.__version__,
    }


def main(path):
    args = json.loads(Path(path).read_text(encoding="utf-8"))
    result = quantize(args) if args["mode"] == "quantize" else score(args)
    Path(args["result"]).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
