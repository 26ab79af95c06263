"""Fidelity verification: does the exported model behave like the model the run trained?

1. The reference is the trained model exactly as evaluation sees it (`load_trained`: the adapter on the 4-bit
   base for QLoRA). It scores a few validation rows; the full next-token log-probabilities go to disk, one file per
   row, and it generates greedily from up to three held-out prompts, stopping at EOS or the turn-end token.
   Rows become token ids as `verify_examples` says: chat rows through the chat template (which holds its own
   BOS), other rows as plain text with the tokenizer's special tokens.
2. The export is reloaded in a child process by reload_check.py, which uses only transformers / peft / gguf (no
   ft-desk code), scores the same token ids and generates from the same prompts with its own saved stop settings.
3. The numbers: mean KL(reference || export) of next-token distributions, the validation loss delta, top-1
   agreement, greedy agreement, whether generation stops at the turn-end token, and whether the export's own
   tokenizer reproduces the token ids.

Only one model is in memory at a time in each process; the log-probs on disk are bounded by
`VERIFY_LOGPROB_BYTES`.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ft_desk.quant.device import resolve_device
from ft_desk.trainer.chat_format import apply_template, stop_token_ids, turn_end_tokens
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.export.source import RunSource, load_run_tokenizer, read_val_rows
from ft_desk.trainer.generation import generate
from ft_desk.trainer.training.model import load_base, load_trained

# Note: validation rows scored, and the token cap per row. A few hundred tokens already measure KL well; more
# only costs time.
VERIFY_ROWS = 8
VERIFY_MAX_TOKENS_PER_ROW = 256
# Note: the reference log-probs are stored in fp32 (KL at 1e-6 needs it); this caps their total size on disk,
# which for a 150k vocabulary is about 880 tokens.
VERIFY_LOGPROB_BYTES = 512 * 1024 * 1024
GENERATION_PROMPTS = 3


@dataclass(frozen=True)
class Thresholds:
    """Pass marks for one comparison."""

    mean_kl: float
    loss_delta: float


# Why these numbers (mean KL in nats per token, loss delta in nats), calibrated on real weights: the real
# SmolLM2-135M-Instruct, each tensor stored as the GGUF writer stores it, against the unquantized model on 1514
# tokens of real text (python bench/gguf_fidelity.py). A small model is the hard case: its sharp distributions
# move more per rounded weight than a large model's, so marks that pass it hold for the models hobbyists tune.
#   type   mean KL   top-1   loss delta      (measured)
#   bf16   6.8e-05   99.7%   +0.0011
#   f16    2.1e-06   100%    -0.0000
#   q8_0   1.95e-03  97.3%   -0.0013         a tuned SmolLM2's q8_0 export measured 5.2e-3 against the trained
#                                            (NF4 + adapter) model, llama.cpp's own quantizer the same
#   q5_0   0.112     84.5%   +0.160
#   q4_0   0.440     62.6%   +0.146          (token embedding and output layer kept at Q8_0, as written)
# - An export that stores the exact training-time weights (the adapter itself) can differ only by float
#   summation order: KL ~1e-9, so 1e-5 leaves four orders of margin and still catches a wrong scale or layer.
# - bf16 / f16 merges: 1e-3 is 15x the real model's bf16 cost and 10-100x below what a wrong merge costs
#   (merging into the 16-bit original instead of the NF4 weights the adapter learned against: 1e-2..1e-1).
# - Quantized GGUF types: about 3-4x what the type costs on the real model (for q8_0, 4x the tuned export's
#   5.2e-3), so FAIL means "worse than this type should be"; a broken file (wrong tensor layout, wrong
#   tokenizer) still fails, with KL of several nats. q4_k_m (llama.cpp's Q4_K/Q6_K mix) loses less than q4_0 -
#   on the hidden-256 test model 1.3e-3 against q4_0's 2.2e-3 - and gets marks between q5_0's and q4_0's.
THRESHOLDS = {
    "exact": Thresholds(mean_kl=1e-5, loss_delta=1e-3),
    "bf16": Thresholds(mean_kl=1e-3, loss_delta=2e-2),
    "fp16": Thresholds(mean_kl=1e-3, loss_delta=2e-2),
    "f16": Thresholds(mean_kl=1e-3, loss_delta=2e-2),
    "q8_0": Thresholds(mean_kl=2e-2, loss_delta=5e-2),
    "q5_0": Thresholds(mean_kl=0.35, loss_delta=0.5),
    "q4_0": Thresholds(mean_kl=1.5, loss_delta=0.5),
    "q4_k_m": Thresholds(mean_kl=0.8, loss_delta=0.5),
}

Progress = Callable[[str], None]


@dataclass
class Reference:
    folder: Path
    data: dict[str, Any]
    device: str
    stop_ids: list[int]
    turn_end_ids: list[int]


def _device(source: RunSource) -> str:
    try:
        return resolve_device(source.cfg.train.device)
    except UserError:
        return resolve_device("auto")


def _load_trained(source: RunSource, device: str):
    """(model, cfg) as evaluation loads the run. When the run's tokenizer grew (added tokens), the base is resized to
    it before the adapter goes on, since the adapter then carries the resized embedding and output layers."""
    if source.method != "full":
        grown = len(load_run_tokenizer(source))
        config = json.loads((source.base_dir / "config.json").read_text(encoding="utf-8"))
        text = config.get("text_config", config)
        if grown > int(text.get("vocab_size", grown)):
            from peft import PeftModel

            model, _, _ = load_base(source.cfg, device, source.base_dir)
            model.resize_token_embeddings(grown, mean_resizing=False)
            model = PeftModel.from_pretrained(model, str(source.weights_dir), is_trainable=False)
            model.eval()
            return model, source.cfg
    model, _, cfg = load_trained(source.run_dir, source.checkpoint, device=device)
    return model, cfg


@dataclass(frozen=True)
class VerifyExample:
    """One validation row as token ids (scored), and optionally a prompt to generate from."""

    input_ids: list[int]
    prompt_ids: list[int] | None
    text: str
    add_special_tokens: bool


def _messages(row: dict[str, Any]) -> list[dict[str, str]] | None:
    for key in ("messages", "conversations"):
        value = row.get(key)
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            out = []
            for m in value:
                role = m.get("role", m.get("from"))
                content = m.get("content", m.get("value"))
                if isinstance(role, str) and isinstance(content, str):
                    role = {"human": "user", "gpt": "assistant"}.get(role, role)
                    out.append({"role": role, "content": content})
            return out or None
    return None


def row_text(row: dict[str, Any], tokenizer) -> tuple[str, str | None]:
    """(full text, generation prompt or None) for one validation row."""
    messages = _messages(row)
    if messages is not None and getattr(tokenizer, "chat_template", None):
        full = apply_template(tokenizer, messages, tokenize=False)
        prompt = None
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last:
            prompt = apply_template(tokenizer, messages[:last], tokenize=False, add_generation_prompt=True)
        return full, prompt
    if messages is not None:
        return "\n".join(m["content"] for m in messages), None
    if isinstance(row.get("text"), str):
        return row["text"], None
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return row["prompt"] + row["completion"], row["prompt"]
    strings = [v for v in row.values() if isinstance(v, str)]
    return "\n".join(strings), None


def encode(tokenizer, text: str, templated: bool) -> list[int]:
    # A rendered chat template already holds its BOS and other specials; plain text gets the tokenizer's own.
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


def verify_examples(rows: list[dict[str, Any]], tokenizer, max_tokens_per_row: int) -> list[VerifyExample]:
    templated = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for row in rows:
        full, prompt = row_text(row, tokenizer)
        is_chat = templated and _messages(row) is not None
        ids = encode(tokenizer, full, is_chat)[:max_tokens_per_row]
        if len(ids) < 2:
            continue
        prompt_ids = encode(tokenizer, prompt, is_chat) if prompt else None
        out.append(VerifyExample(input_ids=ids, prompt_ids=prompt_ids, text=full, add_special_tokens=not is_chat))
    return out


def build_reference(source: RunSource, folder: Path, note: Progress | None = None) -> Reference:
    """Score validation rows and generate from held-out prompts with the model as trained; save to folder."""
    import torch  # heavy imports
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    device = _device(source)
    if note:
        note("loading the trained model (reference)")
    model, cfg = _load_trained(source, device)
    tokenizer = load_run_tokenizer(source)
    rows = read_val_rows(source, VERIFY_ROWS)
    examples = verify_examples(rows, tokenizer, VERIFY_MAX_TOKENS_PER_ROW)
    if not examples:
        raise UserError(f"run {source.run_name} has no usable validation rows in data/val.jsonl to verify against",
                        hint="pass --no-verify to export without the fidelity check")
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 1
    budget = max(64, VERIFY_LOGPROB_BYTES // (4 * vocab))
    stops = stop_token_ids(tokenizer)
    turn_end = [tokenizer.convert_tokens_to_ids(t) for t in turn_end_tokens(tokenizer)]
    batches = []
    used = 0
    nll = 0.0
    with torch.no_grad():
        for i, ex in enumerate(examples):
            if used >= budget:
                break
            ids = ex.input_ids[: max(2, budget - used)]
            tensor = torch.tensor([ids], dtype=torch.long, device=device)
            logp = torch.log_softmax(model(input_ids=tensor).logits[0].float(), dim=-1).cpu()
            nll += float(-logp[:-1].double().gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum())
            name = f"batch-{i:03d}.safetensors"
            save_file({"input_ids": torch.tensor(ids, dtype=torch.int64), "logprobs": logp.contiguous()},
                      str(folder / name))
            batches.append({"file": name, "tokens": len(ids) - 1, "text": ex.text,
                            "add_special_tokens": ex.add_special_tokens})
            used += len(ids)
    max_new = cfg.eval.max_new_tokens
    prompt_ids = [e.prompt_ids for e in examples if e.prompt_ids][:GENERATION_PROMPTS]
    # One prompt at a time (no padding), as reload_check.py generates from the export.
    outputs = generate(model, tokenizer, prompt_ids, max_new_tokens=max_new, stop_ids=stops, device=device)
    prompts = [{"prompt_ids": ids, "output_ids": list(out.token_ids), "stopped": out.stopped,
                "text": tokenizer.decode(list(out.token_ids), skip_special_tokens=False)}
               for ids, out in zip(prompt_ids, outputs)]
    tokens = sum(b["tokens"] for b in batches)
    data = {"batches": batches, "prompts": prompts, "max_new_tokens": max_new, "loss": nll / max(tokens, 1),
            "tokens": tokens, "stop_ids": stops, "turn_end_ids": turn_end, "device": device}
    (folder / "reference.json").write_text(json.dumps(data), encoding="utf-8")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return Reference(folder=folder, data=data, device=device, stop_ids=stops, turn_end_ids=turn_end)


def run_reload_check(args: dict[str, Any], workdir: Path, label: str) -> dict[str, Any]:
    """Run reload_check.py in a child process and return its result."""
    args = dict(args)
    args["result"] = str(workdir / f"result-{label}.json")
    args_path = workdir / f"args-{label}.json"
    args_path.write_text(json.dumps(args), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    script = Path(__file__).with_name("reload_check.py")
    proc = subprocess.run([sys.executable, str(script), str(args_path)], env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not Path(args["result"]).is_file():
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        if "No space left on device" in tail or "Disk quota exceeded" in tail:
            raise OSError(errno.ENOSPC, f"the {label} reload check ran out of disk space")
        raise UserError(f"reloading the {label} export with plain transformers failed:\n{tail}",
                        hint="the export files are not loadable as they are; pass --no-verify to keep them anyway")
    return json.loads(Path(args["result"]).read_text(encoding="utf-8"))


def judge(result: dict[str, Any], reference: Reference, thresholds: Thresholds, label: str = "reference",
          expect_stop_ids: list[int] | None = None, gate_numbers: bool = True) -> dict[str, Any]:
    """The fidelity report for one reloaded export: numbers, checks, and an overall pass.

    gate_numbers=False reports KL and loss against the limits without failing on them (a merge into the
    original weights is not expected to match the NF4-trained model exactly).
    """
    comp = result["comparisons"][label]
    loss_ref = reference.data["loss"] if label == "reference" else comp["loss_other"]
    loss_delta = result["loss"] - loss_ref
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool | None, detail: str) -> None:
        checks.append({"name": name, "ok": ok, "detail": detail})

    def gated(ok: bool) -> bool | None:
        return ok if gate_numbers else None

    check("mean_kl", gated(comp["mean_kl"] <= thresholds.mean_kl),
          f"mean KL {comp['mean_kl']:.2e} (limit {thresholds.mean_kl:.0e}) over {result['tokens']} tokens")
    check("loss_delta", gated(abs(loss_delta) <= thresholds.loss_delta),
          f"loss on {len(reference.data['batches'])} validation rows, every token (not only the trained ones, "
          f"as the run's val loss): {result['loss']:.4f} vs {loss_ref:.4f} (delta {loss_delta:+.4f}, limit "
          f"{thresholds.loss_delta})")
    tok = result["tokenizer"]
    if tok["checked"]:
        check("tokenizer", tok["mismatched"] == 0,
              f"export tokenizer reproduces the token ids of {tok['checked'] - tok['mismatched']}/"
              f"{tok['checked']} rows")
    turn_end = reference.turn_end_ids
    wanted = expect_stop_ids if expect_stop_ids is not None else turn_end
    if wanted:
        missing = [t for t in wanted if t not in result["eos_token_ids"]]
        check("stop_tokens", not missing,
              f"the export stops generating on token ids {result['eos_token_ids']}, "
              + (f"which lack the chat template's turn-end id(s) {missing}" if missing
                 else f"including the chat template's turn-end id(s) {wanted}"))
    gens = result["generations"]
    ref_prompts = reference.data["prompts"]
    if gens:
        ref_stopped = sum(1 for p in ref_prompts if p["stopped"])
        exp_stopped = sum(1 for g in gens if g["stopped"])
        identical = sum(1 for g in gens if g["identical"])
        broke = [i for i, (g, p) in enumerate(zip(gens, ref_prompts)) if p["stopped"] and not g["stopped"]]
        if ref_stopped:
            check("stops_like_trained", not broke,
                  f"trained model stopped on {ref_stopped}/{len(gens)} prompts, export on {exp_stopped}/{len(gens)}")
        else:
            check("stops_like_trained", None,
                  f"the trained model itself did not stop within {reference.data['max_new_tokens']} tokens on any "
                  f"of {len(gens)} prompts (it has not learned to end its turn), so stopping could not be observed; "
                  f"export stopped on {exp_stopped}")
        check("greedy_match", None, f"greedy output identical to the trained model on {identical}/{len(gens)} "
                                    f"prompts (shared prefix {[g['same_prefix'] for g in gens]} tokens)")
    if result.get("ft_desk_modules"):
        check("plain_reload", False, f"reload imported ft-desk code: {result['ft_desk_modules'][:3]}")
    passed = all(c["ok"] is not False for c in checks)
    return {
        "passed": passed,
        "compared_with": label,
        "mean_kl": comp["mean_kl"],
        "max_kl": comp["max_kl"],
        "top1_agreement": comp["top1_agreement"],
        "val_loss": result["loss"],
        "val_loss_reference": loss_ref,
        "val_loss_delta": loss_delta,
        "tokens": result["tokens"],
        "thresholds": {"mean_kl": thresholds.mean_kl, "loss_delta": thresholds.loss_delta},
        "checks": checks,
        "generations": [{"stopped": g["stopped"], "identical": g["identical"], "same_prefix": g["same_prefix"],
                         "text": g["text"]} for g in gens],
        "reload_seconds": result["seconds"],
    }


def describe(report: dict[str, Any], title: str) -> list[str]:
    """Readable lines for one judged comparison."""
    verdict = "PASS" if report["passed"] else "FAIL"
    if report.get("informational"):
        verdict = "for comparison"
    numbers = ""
    if "mean_kl" in report:
        numbers = (f"  mean KL {report['mean_kl']:.2e}, top-1 agreement {report['top1_agreement'] * 100:.1f}%, "
                   f"loss delta {report['val_loss_delta']:+.4f}")
    lines = [f"{title}: {verdict}{numbers}"]
    for c in report["checks"]:
        mark = {True: "ok  ", False: "FAIL", None: "note"}[c["ok"]]
        lines.append(f"  [{mark}] {c['detail']}")
    return lines
