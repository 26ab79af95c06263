"""What each GGUF tensor type costs on real weights: the calibration behind export/verify.py's THRESHOLDS.

The real SmolLM2-135M-Instruct (tests/real_model.py) is loaded in fp32; every tensor the GGUF writer would store
at a given type (quant/gguf_tensors.choose_type, the export's own per-tensor choice) is quantized and dequantized
with the gguf package's quantizer, and the model's next-token distributions on real text are compared with the
unquantized model's: mean KL (nats per token), top-1 agreement and the loss delta. A small model is the hard
case - per-weight rounding moves its sharp distributions more than a large model's - so limits set from it hold
for the bigger models hobbyists tune.

    python bench/gguf_fidelity.py [--tokens 2048] [--types q8_0,q4_0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TYPES = ("bf16", "f16", "q8_0", "q5_0", "q4_0")
# gguf name fragments of the tensors the writer maps from HF names (enough to pick the type per tensor).
HF_TO_GGUF = {"embed_tokens": "token_embd.weight", "lm_head": "output.weight"}


def passages(tokenizer, limit: int) -> list[list[int]]:
    """Real English and WikiSQL-style rows, tokenized, about `limit` tokens in all."""
    import ft_desk.trainer.assets as assets

    text = (Path(assets.__file__).parent / "general_english.txt").read_text(encoding="utf-8")
    shared = REPO.parent / "shared" / "data" / "wikisql" / "valid.jsonl"
    lines = [line for line in text.splitlines() if line.strip()]
    if shared.is_file():
        import json

        lines += [json.loads(line)["text"] for line in shared.read_text(encoding="utf-8").splitlines()[:40]]
    out, total = [], 0
    for line in lines:
        ids = tokenizer(line)["input_ids"][:256]
        if len(ids) > 8:
            out.append(ids)
            total += len(ids)
        if total >= limit:
            break
    return out


def logprobs(model, rows):
    import torch

    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1) for ids in rows]


def round_trip(model, original: dict, tensor_type: str) -> None:
    """Load into `model` the weights as a GGUF of `tensor_type` would store them (quantized, then dequantized)."""
    import gguf
    import numpy as np
    import torch

    from ft_desk.quant.gguf_tensors import choose_type, ggml_type

    state = {}
    for name, weight in original.items():
        gguf_name = next((g for h, g in HF_TO_GGUF.items() if h in name), name)
        chosen = choose_type(gguf_name, tuple(weight.shape), tensor_type) if weight.dim() == 2 else "f32"
        if chosen == "f32":
            state[name] = weight
        elif chosen in ("f16", "bf16"):
            state[name] = weight.to(torch.float16 if chosen == "f16" else torch.bfloat16).float()
        else:
            kind = ggml_type(chosen)
            packed = gguf.quants.quantize(weight.numpy().astype(np.float32), kind)
            state[name] = torch.from_numpy(gguf.quants.dequantize(packed, kind).reshape(weight.shape).copy())
    model.load_state_dict(state, strict=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of real text to score")
    parser.add_argument("--types", default=",".join(TYPES), help=f"comma-separated, of {', '.join(TYPES)}")
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.real_model import real_model_gguf

    path = real_model_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = passages(tokenizer, args.tokens)
    reference = logprobs(model, rows)
    ref_loss = sum(-lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
                   for lp, ids in zip(reference, rows)) / sum(len(ids) - 1 for ids in rows)
    print(f"SmolLM2-135M-Instruct, {sum(len(r) for r in rows)} tokens of real text, fp32 reference loss "
          f"{ref_loss:.4f}")
    print(f"{'type':<6} {'mean KL':>10} {'top-1':>7} {'loss delta':>11} {'seconds':>8}")
    for tensor_type in args.types.split(","):
        started = time.perf_counter()
        round_trip(model, original, tensor_type)
        got = logprobs(model, rows)
        kl = sum((r.exp() * (r - g)).sum().item() for r, g in zip(reference, got)) / sum(len(r) for r in reference)
        top1 = sum((r.argmax(-1) == g.argmax(-1)).sum().item() for r, g in zip(reference, got)) / sum(
            len(r) for r in reference)
        loss = sum(-g[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
                   for g, ids in zip(got, rows)) / sum(len(ids) - 1 for ids in rows)
        print(f"{tensor_type:<6} {kl:>10.2e} {top1 * 100:>6.1f}% {loss - ref_loss:>+11.4f} "
              f"{time.perf_counter() - started:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
