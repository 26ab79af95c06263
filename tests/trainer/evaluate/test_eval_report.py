"""The retention verdict, the order of per-example rows, and what report.md and the terminal table show."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from ft_desk.trainer.config import RunConfig
from ft_desk.trainer.evaluate import report as eval_report
from ft_desk.trainer.generation import Generation


def _probe(per_token_losses: list[float], tokens: int = 20) -> list[tuple[float, int]]:
    return [(loss * tokens, tokens) for loss in per_token_losses]


def _retention(base_loss: float, tuned_loss: float, threshold: float = 0.10, vocab: int = 32000):
    passages = 40
    jitter = [0.01 * ((i % 5) - 2) for i in range(passages)]
    probe = {"base": _probe([base_loss + j for j in jitter]), "tuned": _probe([tuned_loss + j for j in jitter])}
    return eval_report.retention_result(probe, RunConfig(), vocab, threshold, 0.5, "probe.txt")


def test_a_perplexity_rise_beyond_the_threshold_is_flagged_with_what_to_try():
    result = _retention(2.0, 2.0 + math.log(1.25))  # perplexity x1.25
    assert result["flagged"] and result["rise"] == pytest.approx(0.25, abs=1e-3)
    assert result["message"].startswith("forgetting:") and "+25.0%" in result["message"]
    tries = " ".join(result["try"])
    cfg = RunConfig()
    assert f"optim.lr={cfg.optim.lr / 2:g}" in tries
    assert f"train.epochs={cfg.train.epochs / 2:g}" in tries
    assert f"lora.r={cfg.lora.r // 2}" in tries
    lo, hi = result["rise_ci95"]
    assert lo <= 0.25 <= hi
    assert result["note"] == ""


def test_a_small_rise_or_a_fall_is_not_forgetting():
    small = _retention(2.0, 2.0 + math.log(1.04))
    assert not small["flagged"] and small["try"] == [] and "within the 10% allowed" in small["message"]
    fall = _retention(2.0, 1.5)
    assert not fall["flagged"] and "nothing measurable was forgotten" in fall["message"]


def test_the_threshold_is_what_decides():
    assert not _retention(2.0, 2.0 + math.log(1.25), threshold=0.30)["flagged"]
    assert _retention(2.0, 2.0 + math.log(1.04), threshold=0.02)["flagged"]


def test_a_base_model_at_chance_level_is_called_out():
    result = _retention(math.log(30000), math.log(20000), vocab=32000)
    assert "as well as chance" in result["note"]


def test_huge_rises_read_as_multiples():
    assert eval_report.rise_text(0.123) == "+12.3%"
    assert eval_report.rise_text(-0.05) == "-5.0%"
    assert eval_report.rise_text(2.0e12) == "x2e+12"
    assert eval_report.rise_text(14.0) == "x15"


@dataclass
class _Item:
    index: int
    where: str
    reference: str
    ref_tokens: int
    prompt_text: str


def _items_and_outputs():
    refs = ["blue", "two", "water", "ice"]
    items = [_Item(i, f"f.jsonl:{i + 1}", r, 1, f"<|im_start|>user\nq{i}<|im_end|>\n") for i, r in enumerate(refs)]
    base = [Generation("blue", 2, True), Generation("zzz", 16, False), Generation("wat", 3, True),
            Generation("ice", 2, True)]
    tuned = [Generation("blue", 2, True), Generation("two", 2, True), Generation("nope", 2, True),
             Generation("ice", 2, True)]
    per = {"base": {"rouge_l": [1.0, 0.0, 0.4, 1.0], "loss": [1.0, 5.0, 2.0, 1.0]},
           "tuned": {"rouge_l": [1.0, 1.0, 0.0, 1.0], "loss": [0.5, 0.2, 3.0, 0.9]}}
    return items, {"base": base, "tuned": tuned}, per


def test_rows_lead_with_the_biggest_changes():
    items, outputs, per = _items_and_outputs()
    rows = eval_report.build_rows(items, outputs, per)
    assert [r["where"] for r in rows[:2]] == ["f.jsonl:2", "f.jsonl:3"]  # +1.0 then -0.4
    assert [r["change"] for r in rows] == ["win", "loss", "same", "same"]
    assert rows[0]["sort_metric"] == "rouge_l" and rows[0]["delta"] == pytest.approx(1.0)
    first = rows[0]
    assert first["reference"] == "two" and first["base"]["output"] == "zzz" and first["tuned"]["output"] == "two"
    assert first["base"]["stopped"] is False and first["tuned"]["rouge_l"] == 1.0
    assert first["prompt"].startswith("<|im_start|>user")


def test_rows_sort_by_loss_when_nothing_was_generated():
    items, _, per = _items_and_outputs()
    per = {side: {"loss": values["loss"]} for side, values in per.items()}
    rows = eval_report.build_rows(items, {}, per)
    assert rows[0]["where"] == "f.jsonl:2" and rows[0]["delta"] == pytest.approx(4.8)  # lower loss is a win
    assert rows[1]["change"] == "loss" and rows[0]["tuned"]["output"] is None


def _report(rows, metrics, retention=None, notes=()):
    return {
        "run_name": "r1", "model": "tiny", "method": "qlora", "device": "cpu", "created": "2026-01-01T00:00:00",
        "checkpoint": {"requested": "best", "folder": "adapter", "step": 100, "label": "best"},
        "data": {"path": "f.jsonl", "examples": len(rows)},
        "generation": {"mode": "greedy", "max_new_tokens": 16, "batch_size": 8},
        "metrics": metrics, "retention": retention, "notes": list(notes), "rows": rows,
        "timings": {"base": {"generate": {"seconds": 1.0, "tokens": 10, "tokens_per_s": 10.0}},
                    "total_seconds": 3.0, "load_seconds": 1.0},
        "report_dir": "/runs/r1/eval/x",
    }


def test_markdown_and_terminal_show_the_table_the_verdict_and_the_top_examples():
    from ft_desk.trainer.evaluate import metrics as em

    items, outputs, per = _items_and_outputs()
    items[1].reference = "two | three"  # a pipe must not break the markdown table
    rows = eval_report.build_rows(items, outputs, per)
    metric = em.compare_means("rouge_l", "ROUGE-L F1", per["base"]["rouge_l"], per["tuned"]["rouge_l"]).to_dict()
    retention = _retention(2.0, 2.0 + math.log(1.25))
    report = _report(rows, [metric], retention, ["semantic similarity skipped: no model"])
    md = eval_report.markdown(report, top_k=5)
    assert "| ROUGE-L F1 | 0.600 | 0.750 | +0.150 | unclear | only 4 examples:" in md
    assert "## Retention (general English)" in md and "**forgetting:" in md and "lora.r=8" in md
    assert "## Biggest wins" in md and "## Biggest losses" in md and "## All examples" in md
    wins = md.split("## Biggest wins")[1].split("## Biggest losses")[0]
    assert "f.jsonl:2" in wins and "f.jsonl:3" not in wins
    assert "two \\| three" in md
    assert "- semantic similarity skipped: no model" in md
    text = eval_report.terminal(report)
    assert "ROUGE-L F1" in text and "forgetting:" in text and "try: a lower learning rate" in text
    assert "biggest wins:" in text and "tuned:    two" in text
    assert text.strip().endswith("report: /runs/r1/eval/x/report.md")


def test_fences_survive_backticks_in_outputs():
    fenced = eval_report._fence("```json\n{}\n```")
    assert fenced.startswith("````\n") and fenced.endswith("\n````")
