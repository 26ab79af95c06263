"""The real question, measured: the real SmolLM2-135M-Instruct on real data (WikiSQL text-to-SQL) tuned by ft-desk
at its defaults and by the TRL QLoRA baseline at its defaults, on the same examples for the same epochs.

Per tool: wall time, training tokens/s (non-pad), peak RSS of the training process, final validation loss; and for
both tuned models and the base, on the same held-out prompts with one greedy generation path (ft-desk's): normalized
exact match of the SQL and the stop rate (the reply ends with the turn-end token).

Data: ../shared/data/wikisql/{train,valid}.jsonl ({"text": "table ... Q: ...\\nA: SELECT ..."}), split at the
last "\\nA: " into prompt and completion. ft-desk reads prompt/completion rows; TRL gets the same rows as a
conversational prompt/completion dataset, so both render them with the model's chat template and put loss on
the completion only. The model is the GGUF from tests/real_model.py, imported by ft-desk; TRL loads the imported
folder (the same weights).

    python bench/real_model.py [--train-rows 300] [--eval-rows 20] [--epochs 2] [--skip-trl] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WIKISQL = REPO.parent / "shared" / "data" / "wikisql"


def split_rows(path: Path, limit: int) -> list[dict[str, str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        prompt, _, completion = text.rpartition("\nA: ")
        if prompt and completion:
            rows.append({"prompt": prompt, "completion": completion})
        if len(rows) >= limit:
            break
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float, int]:
    """(finished process, wall seconds, peak RSS in bytes of it and its children, sampled every 0.2 s)."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = parent.memory_info().rss + sum(c.memory_info().rss for c in parent.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            done.wait(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    done.set()
    watcher.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.perf_counter() - started, peak


def ft_desk_train(gguf: Path, train: Path, valid: Path, epochs: float, home: Path, sets: list[str]) -> dict:
    env = {**os.environ, "FT_DESK_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ft_desk.trainer.cli", "train", "--preset", "qlora", "--model", str(gguf),
           "--data", str(train), "--set", f"data.valid_file={valid}", "--set", f"train.epochs={epochs}",
           "--set", "eval.sample_prompts=0", "--events", "jsonl", *(a for kv in sets for a in ("--set", kv))]
    # The GGUF import happens once, before the measured run (a user pays it once too).
    subprocess.run([sys.executable, "-m", "ft_desk.trainer.cli", "models", "import", str(gguf)], env=env,
                   capture_output=True, text=True, check=True)
    done, wall, peak = run_measured(cmd, env)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        raise SystemExit(f"ft-desk train failed:\n{done.stderr[-2000:]}")
    steps = [e for e in events if e["type"] == "step"]
    evals = [e for e in events if e["type"] == "eval"]
    first_step_at = next(e["time"] for e in events if e["type"] == "step")
    started = next(e["time"] for e in events if e["type"] == "run_started")
    finished = events[-1]
    model_dir = next(e["model_dir"] for e in events if e["type"] == "model_loaded")
    tokens = steps[-1]["tokens"]  # non-pad tokens seen so far (cumulative in step events)
    return {"tool": "ft-desk", "wall_s": wall, "peak_rss": peak, "steps": len(steps),
            "tokens_per_s": tokens / steps[-1]["elapsed_s"],
            "val_loss": evals[-1]["val_loss"] if evals else None, "first_step_s": first_step_at - started,
            "adapter": str(Path(finished["run_dir"]) / "adapter"), "model_dir": model_dir}


def trl_train(model_dir: str, train_rows, valid_rows, epochs: float, work: Path) -> dict:
    def conversational(rows):
        return [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows]

    train = write_jsonl(work / "trl-train.jsonl", conversational(train_rows))
    valid = write_jsonl(work / "trl-valid.jsonl", conversational(valid_rows))
    result = work / "trl-result.json"
    cmd = [sys.executable, str(REPO / "bench" / "baseline_trl_qlora.py"), "--defaults", "--epochs", str(epochs),
           "--model", model_dir, "--train", str(train), "--valid", str(valid), "--out", str(work / "trl-out"),
           "--result", str(result), "--max-length", "1024", "--adapter-out", str(work / "trl-adapter")]
    done, wall, peak = run_measured(cmd, {**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"TRL baseline failed:\n{done.stderr[-2000:]}")
    data = json.loads(result.read_text(encoding="utf-8"))
    steps = data.get("steps") or []
    tokens = max((s.get("num_tokens") or 0 for s in steps), default=0)  # TRL's count of non-pad tokens so far
    runtime = data.get("train_runtime") or 0
    return {"tool": "TRL SFTTrainer", "wall_s": wall, "peak_rss": peak, "steps": len(steps),
            "tokens_per_s": tokens / runtime if runtime else None, "val_loss": data.get("eval_loss"),
            "adapter": str(work / "trl-adapter")}


def score(model_dir: str, adapters: dict[str, str | None], rows, max_new_tokens: int) -> dict[str, dict]:
    """Normalized exact match and stop rate of the base and each adapter, greedy, one generation path."""
    from peft import PeftModel

    from ft_desk.trainer.chat_format import stop_token_ids
    from ft_desk.trainer.evaluate.metrics import normalized_exact_match
    from ft_desk.trainer.generation import generate
    from ft_desk.trainer.presets import load_config
    from ft_desk.trainer.training.model import load_base

    cfg = load_config(["qlora"], [f"model.name={model_dir}"])
    model, tokenizer, _ = load_base(cfg, "cpu")
    model.eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for r in rows]
    stops = stop_token_ids(tokenizer, vocabulary_fallback=True)

    def judge(m) -> dict:
        outs = generate(m, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_ids=stops, batch_size=8)
        return {"exact_match": sum(normalized_exact_match(o.text, r["completion"]) for o, r in zip(outs, rows))
                / len(rows), "stop_rate": sum(o.stopped for o in outs) / len(rows)}

    scores = {"base": judge(model)}
    for name, adapter in adapters.items():
        if adapter is None:
            continue
        tuned = PeftModel.from_pretrained(model, adapter, adapter_name=name.replace(" ", "_").replace("-", "_"))
        scores[name] = judge(tuned)
        model = tuned.unload()
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=300)
    parser.add_argument("--eval-rows", type=int, default=20, help="held-out prompts generated for exact match")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--skip-trl", action="store_true", help="only ft-desk (no trl installed)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for ft-desk's run on top of its defaults (to measure one lever)")
    args = parser.parse_args()
    from tests.real_model import real_model_gguf

    if not (WIKISQL / "train.jsonl").is_file():
        raise SystemExit(f"needs the WikiSQL sample at {WIKISQL}")
    gguf = real_model_gguf()
    train_rows = split_rows(WIKISQL / "train.jsonl", args.train_rows)
    valid_rows = split_rows(WIKISQL / "valid.jsonl", 100)
    with tempfile.TemporaryDirectory(prefix="ft-desk-real-bench-") as tmp:
        work = Path(tmp)
        train = write_jsonl(work / "train.jsonl", train_rows)
        valid = write_jsonl(work / "valid.jsonl", valid_rows)
        results = [ft_desk_train(gguf, train, valid, args.epochs, work / "home", args.set)]
        if not args.skip_trl:
            results.append(trl_train(results[0]["model_dir"], train_rows, valid_rows, args.epochs, work))
        scores = score(results[0]["model_dir"], {r["tool"]: r["adapter"] for r in results},
                       valid_rows[: args.eval_rows], args.max_new_tokens)
    gib = 1024 ** 3
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF, imported), WikiSQL {len(train_rows)} train rows x {args.epochs:g} "
          f"epochs, {len(valid_rows)} validation rows, exact match on {args.eval_rows} held-out prompts; "
          f"{os.cpu_count()} CPU cores")
    print(f"{'':<16}{'wall':>8}{'tok/s':>8}{'peak RSS':>10}{'steps':>7}{'val loss':>10}{'exact':>8}{'stops':>8}")
    base = scores["base"]
    print(f"{'base model':<16}{'':>8}{'':>8}{'':>10}{'':>7}{'':>10}{base['exact_match'] * 100:>7.0f}%"
          f"{base['stop_rate'] * 100:>7.0f}%")
    for r in results:
        s = scores.get(r["tool"], {})
        loss = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "-"
        exact = f"{s['exact_match'] * 100:.0f}%" if s else "-"
        stops = f"{s['stop_rate'] * 100:.0f}%" if s else "-"
        print(f"{r['tool']:<16}{r['wall_s']:>7.0f}s{r['tokens_per_s'] or 0:>8.0f}{r['peak_rss'] / gib:>9.2f}G"
              f"{r['steps']:>7}{loss:>10}{exact:>8}{stops:>8}")
    if len(results) == 2 and results[1]["tokens_per_s"]:
        a, b = results
        print(f"ft-desk / TRL: tokens/s {a['tokens_per_s'] / b['tokens_per_s']:.2f}x, peak RSS "
              f"{a['peak_rss'] / b['peak_rss']:.2f}x, wall {a['wall_s'] / b['wall_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
