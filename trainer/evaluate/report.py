"""The report of `ft-desk eval`: per-example rows sorted by the size of the change, the retention verdict, and the
three ways it is shown - report.json (everything, for tools), report.md (for people and for sharing) and the
terminal table. Stdlib + numpy only; no model code.

Per-example rows are ordered by how much the tuned answer differs from the base answer on one score (the first
available of ROUGE-L, chrF, semantic similarity, BLEU, normalized exact match, exact match, schema/JSON/regex
adherence, then loss), biggest first, so the clearest wins and losses lead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ft_desk.trainer.atomic import write_text
from ft_desk.trainer.evaluate import metrics as em

# Row score used to sort examples, in order of preference; "loss" counts lower as better.
SORT_KEYS = ("rouge_l", "chrf", "semantic", "bleu", "norm_exact", "exact", "schema", "json", "regex", "loss")
SORT_LABELS = {"rouge_l": "ROUGE-L", "chrf": "chrF", "semantic": "similarity", "bleu": "BLEU",
               "norm_exact": "normalized exact match", "exact": "exact match", "schema": "schema valid",
               "json": "JSON parses", "regex": "regex match", "loss": "loss"}
_HIDDEN = ("loss_sum", "loss_tokens")


def build_rows(items, outputs: dict, per_example: dict[str, dict[str, list]]) -> list[dict[str, Any]]:
    """One row per example - prompt, reference, base and tuned output with their per-example metrics - sorted by
    the absolute change of the sort score (biggest first)."""
    keys = [k for k in SORT_KEYS if k in per_example["base"]]
    sort_key = keys[0] if keys else None
    rows = []
    for i, item in enumerate(items):
        sides = {}
        for side in ("base", "tuned"):
            gen = outputs[side][i] if outputs.get(side) else None  # None: only loss/retention were asked for
            values = {k: v[i] for k, v in per_example[side].items() if k not in _HIDDEN}
            if gen is not None:
                values["stopped"] = bool(gen.stopped)
            sides[side] = {"output": gen.text if gen is not None else None, **values}
        delta = 0.0
        if sort_key is not None:
            b, t = sides["base"].get(sort_key), sides["tuned"].get(sort_key)
            if b is not None and t is not None:
                delta = (b - t) if sort_key == "loss" else (t - b)
        change = "win" if delta > 1e-9 else ("loss" if delta < -1e-9 else "same")
        rows.append({"index": item.index, "where": item.where, "prompt": item.prompt_text,
                     "reference": item.reference, "reference_tokens": item.ref_tokens,
                     "base": sides["base"], "tuned": sides["tuned"],
                     "sort_metric": sort_key, "delta": round(delta, 6), "change": change})
    rows.sort(key=lambda r: (-abs(r["delta"]), r["index"]))
    return rows


def _suggestions(cfg) -> list[str]:
    """What to try against forgetting, with values derived from the run's own settings."""
    tries = [f"a lower learning rate: --set optim.lr={cfg.optim.lr / 2:g} (now {cfg.optim.lr:g})"]
    if cfg.train.max_steps:
        tries.append(f"fewer steps: --set train.max_steps={max(1, cfg.train.max_steps // 2)} "
                     f"(now {cfg.train.max_steps})")
    else:
        tries.append(f"fewer epochs: --set train.epochs={max(cfg.train.epochs / 2, 0.25):g} "
                     f"(now {cfg.train.epochs:g}), or evaluate an earlier checkpoint with --checkpoint STEP")
    if cfg.train.method == "full":
        tries.append("adapters instead of training every weight: --preset qlora (or lora)")
    else:
        tries.append(f"a smaller LoRA rank: --set lora.r={max(1, cfg.lora.r // 2)} --set "
                     f"lora.alpha={max(1, cfg.lora.alpha // 2)} (now r={cfg.lora.r})")
    tries.append("mixing some general instruction data into the training file")
    return tries


def retention_result(probe: dict[str, list[tuple[float, int]]], cfg, vocab_size: int, threshold: float,
                     chance_share: float, probe_path: str) -> dict[str, Any]:
    """Base vs tuned perplexity on the general-text probe, the relative rise with its paired 95% interval, and
    the forgetting verdict with what to try."""
    import numpy as np

    b_sum = [s for s, _ in probe["base"]]
    b_tok = [c for _, c in probe["base"]]
    t_sum = [s for s, _ in probe["tuned"]]
    t_tok = [c for _, c in probe["tuned"]]
    n = len(b_sum)
    base_agg = em.exp_of(em.ratio_of(b_sum, b_tok))
    tuned_agg = em.exp_of(em.ratio_of(t_sum, t_tok))
    row = em.compare("retention_perplexity", "general-English perplexity", base_agg, tuned_agg, n,
                     better="lower", scale="ppl", unit="passages")
    base_ppl, tuned_ppl = row.base, row.tuned
    rise = tuned_ppl / base_ppl - 1.0
    rise_ci = None
    if n >= 2:
        idx = np.random.default_rng(em.BOOTSTRAP_SEED).integers(0, n, size=(em.BOOTSTRAP_SAMPLES, n))
        ratios = tuned_agg(idx) / base_agg(idx) - 1.0
        rise_ci = [round(float(np.percentile(ratios, 2.5)), 6), round(float(np.percentile(ratios, 97.5)), 6)]
    flagged = rise > threshold
    change = f"{em.format_value(base_ppl, 'ppl')} -> {em.format_value(tuned_ppl, 'ppl')} ({rise_text(rise)})"
    if flagged:
        message = (f"forgetting: general-English perplexity rose {change}, above the {threshold * 100:.0f}% "
                   f"threshold; the tuned model predicts everyday text worse than its base")
    elif rise > 0:
        message = (f"general-English perplexity {change}, within the {threshold * 100:.0f}% allowed: "
                   "no sign of forgetting")
    else:
        message = f"general-English perplexity {change}: nothing measurable was forgotten"
    notes = []
    if vocab_size and base_ppl > chance_share * vocab_size:
        notes.append(f"the base model predicts this text about as well as chance (perplexity "
                     f"{em.format_value(base_ppl, 'ppl')} with a vocabulary of {vocab_size:,}), so it had no general "
                     f"English to lose and this check says little")
    if row.few:
        notes.append(row.note)
    return {"probe": probe_path, "passages": n, "tokens": int(sum(b_tok)),
            "base_ppl": round(base_ppl, 6), "tuned_ppl": round(tuned_ppl, 6), "rise": round(rise, 6),
            "rise_ci95": rise_ci, "threshold": threshold, "flagged": flagged, "message": message,
            "try": _suggestions(cfg) if flagged else [], "note": "; ".join(notes)}


def rise_text(rise: float) -> str:
    """+12.3% for ordinary changes; x15 or x2.1e+12 once perplexity has grown more than tenfold."""
    if rise >= 9.0:
        return f"x{rise + 1:.3g}"
    return f"{rise * 100:+.1f}%"


# ------------------------------------------------------------------ writing

def write_report(report: dict[str, Any], folder: Path, top_k: int) -> None:
    write_text(folder / "report.json", json.dumps(report, indent=1, ensure_ascii=False, default=str) + "\n")
    write_text(folder / "report.md", markdown(report, top_k))


def _cell(text: Any, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|") or " "


def _fence(text: str) -> str:
    """A fenced block that the text cannot close early."""
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}\n{text}\n{ticks}"


def _metric_cells(m: dict[str, Any]) -> list[str]:
    scale = m["scale"]
    return [m["label"], em.format_value(m["base"], scale), em.format_value(m["tuned"], scale),
            em.format_value(m["delta"], scale, signed=True), m["verdict"], m["note"]]


def _header_lines(report: dict[str, Any]) -> list[str]:
    ck = report["checkpoint"]
    gen = report["generation"]
    step = f", step {ck['step']}" if ck.get("step") is not None else ""
    mode = ("greedy decoding" if gen["mode"] == "greedy"
            else f"sampling (temperature {gen['temperature']}, top-p {gen['top_p']}, seed {gen['seed']})")
    return [f"checkpoint {ck['requested']} ({ck['folder']}{step}) of {report['model']} ({report['method']}) "
            f"on {report['device']}",
            f"{report['data']['examples']} examples from {report['data']['path']}; {mode}, up to "
            f"{gen['max_new_tokens']} new tokens, batch {gen['batch_size']}"]


def _side_metrics(side: dict[str, Any]) -> str:
    parts = []
    for key, value in side.items():
        if key == "output" or value is None:
            continue
        if isinstance(value, bool):
            parts.append(f"{key} {'yes' if value else 'no'}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.3g}")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def _example_md(n: int, row: dict[str, Any]) -> list[str]:
    label = SORT_LABELS.get(row["sort_metric"], row["sort_metric"] or "")
    lines = [f"### {n}. {row['where']} ({label} change {row['delta']:+.3g})", "", "Prompt, as the model saw it:", "",
             _fence(row["prompt"]), "", "Reference:", "", _fence(row["reference"]), ""]
    for side in ("base", "tuned"):
        lines += [f"{side.capitalize()} ({_side_metrics(row[side])}):", "", _fence(row[side]["output"] or ""), ""]
    return lines


def markdown(report: dict[str, Any], top_k: int) -> str:
    lines = [f"# Evaluation of {report['run_name']}", "", *[f"{x}  " for x in _header_lines(report)],
             f"created {report['created']}", ""]
    if report["metrics"]:
        lines += ["## Metrics", "", "| metric | base | tuned | change | verdict | note |",
                  "|---|---:|---:|---:|---|---|"]
        for m in report["metrics"]:
            lines.append("| " + " | ".join(_cell(c, 200) for c in _metric_cells(m)) + " |")
        lines += ["", f"Intervals (95%) for every number are in report.json. A change is called better or worse only "
                  f"when its paired bootstrap interval excludes zero and there are at least "
                  f"{em.MIN_VERDICT_EXAMPLES} examples; otherwise it is unclear.", ""]
    ret = report.get("retention")
    if ret:
        lines += ["## Retention (general English)", "",
                  f"{ret['passages']} passages, {ret['tokens']:,} tokens from {ret['probe']}.", "",
                  ("**" + ret["message"] + "**") if ret["flagged"] else ret["message"], ""]
        if ret.get("rise_ci95"):
            lo, hi = ret["rise_ci95"]
            lines += [f"95% interval of the change: {rise_text(lo)} to {rise_text(hi)} "
                      f"(threshold {ret['threshold'] * 100:.0f}%).", ""]
        if ret["try"]:
            lines += ["What to try:", ""] + [f"- {t}" for t in ret["try"]] + [""]
        if ret["note"]:
            lines += [f"Note: {ret['note']}", ""]
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    rows = report["rows"]
    wins = sorted((r for r in rows if r["change"] == "win"), key=lambda r: -r["delta"])[:top_k]
    losses = sorted((r for r in rows if r["change"] == "loss"), key=lambda r: r["delta"])[:top_k]
    lines += ["## Biggest wins", ""]
    if not wins:
        lines += ["No example got better.", ""]
    for n, row in enumerate(wins, start=1):
        lines += _example_md(n, row)
    lines += ["## Biggest losses", ""]
    if not losses:
        lines += ["No example got worse.", ""]
    for n, row in enumerate(losses, start=1):
        lines += _example_md(n, row)
    key = rows[0]["sort_metric"] if rows else None
    label = SORT_LABELS.get(key, key or "score")
    lines += ["## All examples", "", f"Sorted by the size of the {label} change.", "",
              f"| # | where | {label} base | tuned | change | reference | base output | tuned output |",
              "|---:|---|---:|---:|---:|---|---|---|"]
    for row in rows:
        b, t = row["base"].get(key), row["tuned"].get(key)
        lines.append("| " + " | ".join([
            str(row["index"]), _cell(row["where"], 60), f"{b:.3g}" if b is not None else "-",
            f"{t:.3g}" if t is not None else "-", f"{row['delta']:+.3g}", _cell(row["reference"], 60),
            _cell(row["base"]["output"] or "", 60), _cell(row["tuned"]["output"] or "", 60)]) + " |")
    timings = report["timings"]
    lines += ["", "## Timings", ""]
    for side in ("base", "tuned"):
        for phase, t in timings.get(side, {}).items():
            rate = f", {t['tokens_per_s']} tokens/s" if t.get("tokens_per_s") else ""
            lines.append(f"- {side} {phase}: {t['seconds']} s, {t['tokens']} tokens{rate}")
    lines.append(f"- total: {timings.get('total_seconds')} s (model load {timings.get('load_seconds')} s)")
    return "\n".join(lines) + "\n"


def terminal(report: dict[str, Any], top_k: int = 3) -> str:
    """The report as plain text for a terminal: header, metrics table, retention, notes, top examples."""
    out = [f"Evaluation of {report['run_name']}", *[f"  {x}" for x in _header_lines(report)], ""]
    table = [["metric", "base", "tuned", "change", "verdict", "note"]] + [_metric_cells(m) for m in report["metrics"]]
    widths = [max(len(r[c]) for r in table) for c in range(5)]
    for r, cells in enumerate(table if report["metrics"] else []):
        line = "  ".join(cells[c].ljust(widths[c]) if c in (0, 4) else cells[c].rjust(widths[c]) for c in range(5))
        out.append((line + ("  " + cells[5] if cells[5] else "")).rstrip())
        if r == 0:
            out.append("  ".join("-" * w for w in widths))
    ret = report.get("retention")
    if ret:
        out += ["", f"retention ({ret['passages']} general-English passages): {ret['message']}"]
        if ret.get("rise_ci95"):
            lo, hi = ret["rise_ci95"]
            out.append(f"  95% interval of the change {rise_text(lo)} to {rise_text(hi)}, "
                       f"threshold {ret['threshold'] * 100:.0f}%")
        out += [f"  try: {t}" for t in ret["try"]]
        if ret["note"]:
            out.append(f"  note: {ret['note']}")
    if report["notes"]:
        out += ["", "notes:"] + [f"  - {n}" for n in report["notes"]]
    rows = report["rows"]
    wins = sorted((r for r in rows if r["change"] == "win"), key=lambda r: -r["delta"])[:top_k]
    losses = sorted((r for r in rows if r["change"] == "loss"), key=lambda r: r["delta"])[:top_k]
    for title, chosen in (("biggest wins", wins), ("biggest losses", losses)):
        if not chosen:
            continue
        out += ["", f"{title}:"]
        for row in chosen:
            label = SORT_LABELS.get(row["sort_metric"], "")
            out.append(f"  {row['where']}  {label} {row['delta']:+.3g}")
            out.append(f"    expected: {_cell(row['reference'], 100)}")
            out.append(f"    base:     {_cell(row['base']['output'] or '', 100)}")
            out.append(f"    tuned:    {_cell(row['tuned']['output'] or '', 100)}")
    out += ["", f"report: {Path(report['report_dir']) / 'report.md'}"]
    return "\n".join(out)
