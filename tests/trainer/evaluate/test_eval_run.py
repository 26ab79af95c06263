"""`evaluate_run` on a real trained run: base vs tuned on what it memorised, format adherence, the retention flag
on an over-trained run, loss computed as training computes it, the report files and the events."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ft_desk.trainer.evaluate.run import EvalOptions, _plan, evaluate_run, parse_metrics
from ft_desk.trainer.events import ListSink, read_events

from .conftest import ANSWER_REGEX

pytestmark = pytest.mark.slow


def _metrics(report: dict) -> dict[str, dict]:
    return {m["name"]: m for m in report["metrics"]}


@pytest.fixture(scope="module")
def memorized_report(memorized_run, eval_files, tmp_path_factory):
    """One full evaluation on the training rows themselves (every metric that applies), with its events."""
    mp = pytest.MonkeyPatch()
    from ft_desk.trainer.evaluate import embed as eval_embed

    mp.delenv(eval_embed.ENV_VAR, raising=False)  # the semantic metric must be skipped cleanly
    mp.setattr(eval_embed, "PACKAGES", ("ft_desk_no_such_embedding_package",))
    mp.setattr(eval_embed, "_cached_hub_folder", lambda: None)
    sink = ListSink()
    try:
        report = evaluate_run(memorized_run, EvalOptions(data=str(eval_files["train"]),
                                                         json_schema=str(eval_files["schema"]),
                                                         regex=ANSWER_REGEX, probe=str(eval_files["probe"])), sink)
    finally:
        mp.undo()
    return report, sink


def test_tuned_model_answers_what_it_memorised_and_the_base_does_not(memorized_report):
    report, _ = memorized_report
    m = _metrics(report)
    assert report["data"]["examples"] == 8
    assert m["exact_match"]["base"] == 0.0 and m["exact_match"]["tuned"] >= 0.75
    assert m["exact_match"]["verdict"] == "better"
    assert m["loss"]["tuned"] < m["loss"]["base"] / 4
    assert m["perplexity"]["tuned"] < m["perplexity"]["base"]
    assert m["rouge_l"]["tuned"] > m["rouge_l"]["base"] and m["chrf"]["tuned"] > m["chrf"]["base"]
    assert m["stop_rate"]["tuned"] == 1.0 and m["stop_rate"]["base"] < 0.5
    assert m["length_ratio"]["tuned"] == pytest.approx(1.0, abs=0.3)
    assert m["output_tokens"]["note"].startswith("reference: ")


def test_format_adherence_json_schema_and_regex(memorized_report):
    m = _metrics(memorized_report[0])
    for name in ("json_parse", "json_schema", "regex_match"):
        assert m[name]["base"] == 0.0 and m[name]["tuned"] >= 0.75, name


def test_over_training_on_eight_rows_is_flagged_as_forgetting(memorized_report, memorized_run):
    retention = memorized_report[0]["retention"]
    assert retention["passages"] == 16
    assert retention["flagged"] and retention["rise"] > 0.10
    assert retention["message"].startswith("forgetting")
    assert any("optim.lr=0.005" in t for t in retention["try"])
    assert any("train.max_steps=50" in t for t in retention["try"])


def test_small_sets_say_so_and_the_missing_embedding_model_is_one_note(memorized_report):
    report, _ = memorized_report
    m = _metrics(report)
    assert m["exact_match"]["few"] and m["exact_match"]["note"].startswith("only 8 examples: +/-")
    assert report["notes"][0].startswith("only 8 held-out examples")
    assert any(n.startswith("semantic similarity skipped") for n in report["notes"])
    assert "semantic_similarity" not in m


def test_report_files_hold_every_example_biggest_changes_first(memorized_report, memorized_run):
    report, _ = memorized_report
    folder = Path(report["report_dir"])
    assert folder.parent == memorized_run / "eval"
    saved = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    assert saved["metrics"] == report["metrics"]
    rows = saved["rows"]
    assert len(rows) == 8
    deltas = [abs(r["delta"]) for r in rows]
    assert deltas == sorted(deltas, reverse=True)
    first = rows[0]
    assert first["change"] == "win" and first["prompt"].startswith("<|im_start|>user")
    assert first["reference"].startswith('{"answer": ')
    assert first["tuned"]["exact"] == 1.0 and first["tuned"]["stopped"] is True
    assert first["base"]["output"] != first["tuned"]["output"]
    assert saved["timings"]["tuned"]["generate"]["tokens"] > 0
    md = (folder / "report.md").read_text(encoding="utf-8")
    assert "| exact match | 0.0% | " in md and "## Biggest wins" in md and first["reference"] in md
    assert "## Retention (general English)" in md and "forgetting" in md


def test_events_tell_the_story_in_order(memorized_report):
    report, sink = memorized_report
    types = [e["type"] for e in sink.events]
    assert types[0] == "eval_started" and types[-1] == "eval_report"
    started = sink.events[0]
    assert started["examples"] == 8 and "retention" in started["metrics"]
    phases = {(e["phase"], e["model"]) for e in sink.of_type("eval_progress")}
    for phase in ("loss", "generate", "retention"):
        assert {(phase, "base"), (phase, "tuned")} <= phases
    final = sink.of_type("eval_report")[0]
    assert final["metrics"] == report["metrics"] and final["retention"]["flagged"]
    assert final["top_rows"] and final["top_rows"][0]["change"] == "win"


def test_loss_is_the_training_validation_loss_and_reports_never_overwrite(memorized_run, memorized_report):
    evals = [e for e in read_events(memorized_run / "events.jsonl") if e["type"] == "eval"]
    report = evaluate_run(memorized_run, EvalOptions(checkpoint="last", metrics=("loss",)), ListSink())
    loss = _metrics(report)["loss"]
    assert report["data"]["default_split"] and report["data"]["examples"] == 2
    # At step 0 the adapter adds nothing, so the base is the first validation point; the last checkpoint is the last.
    assert loss["base"] == pytest.approx(evals[0]["val_loss"], rel=1e-4)
    assert loss["tuned"] == pytest.approx(evals[-1]["val_loss"], rel=1e-4)
    assert report["checkpoint"]["step"] == evals[-1]["step"]
    assert report["report_dir"] != memorized_report[0]["report_dir"]
    assert Path(memorized_report[0]["report_dir"], "report.json").is_file()
    assert report["rows"][0]["tuned"]["output"] is None  # only the loss was asked for: nothing generated


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(memorized_run, eval_files):
    import torch

    from ft_desk.trainer.chat_format import stop_token_ids
    from ft_desk.trainer.data.prepare import generation_prompt, load_examples
    from ft_desk.trainer.generation import generate
    from ft_desk.trainer.training.model import load_trained

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer, cfg = load_trained(memorized_run, "best", "cpu")
        examples, _, _ = load_examples(eval_files["train"])
        prompts = [generation_prompt(e, tokenizer, cfg.data) for e in examples]
        assert len({len(ids) for ids, _ in prompts}) > 1  # different lengths: the batch really is padded
        stop = stop_token_ids(tokenizer, vocabulary_fallback=True)
        for adapter_off in (True, False):  # the base model, then the tuned one
            with model.disable_adapter() if adapter_off else torch.no_grad():
                batched = generate(model, tokenizer, [ids for ids, _ in prompts], max_new_tokens=12,
                                   batch_size=8, stop_ids=stop, device="cpu")
                single = generate(model, tokenizer, [ids for ids, _ in prompts], max_new_tokens=12,
                                  batch_size=1, stop_ids=stop, device="cpu")
            assert [g.token_ids for g in batched] == [g.token_ids for g in single]
            assert [g.text for g in batched] == [g.text for g in single]
            assert [g.stopped for g in batched] == [g.stopped for g in single]
        assert any(g.stopped for g in batched)  # the tuned model ends its answers, so stopping is compared too
    finally:
        torch.set_num_threads(threads)


def test_text_rows_are_split_before_their_answer_and_the_report_says_so(memorized_run, eval_files, tmp_path):
    rows = tmp_path / "sql.jsonl"
    rows.write_text("".join(json.dumps({"text": f"table: t\nQ: who is {n}?\nA: SELECT name FROM t WHERE n = {n}"})
                            + "\n" for n in range(3)), encoding="utf-8")
    report = evaluate_run(memorized_run, EvalOptions(data=str(rows), metrics=parse_metrics("exact,rouge"),
                                                     max_new_tokens=4), ListSink())
    assert {r["reference"] for r in report["rows"]} == {f"SELECT name FROM t WHERE n = {n}" for n in range(3)}
    assert any("text rows have no separate prompt and answer" in note and "3 cut up to the answer label" in note
               for note in report["notes"])
    assert "exact_match" in _metrics(report)


def test_exact_match_is_left_out_with_a_reason_when_every_text_row_is_cut_mid_sentence(memorized_run, tmp_path):
    rows = tmp_path / "prose.jsonl"
    rows.write_text("".join(json.dumps({"text": f"The kettle number {n} whistled on the stove all morning."}) + "\n"
                            for n in range(3)), encoding="utf-8")
    plan = _plan(memorized_run, EvalOptions(data=str(rows)), time.perf_counter)
    assert "exact" not in plan.wanted and "rouge" in plan.wanted
    asked = _plan(memorized_run, EvalOptions(data=str(rows), metrics=("exact",)), time.perf_counter)
    assert asked.wanted == {"exact"}  # asked for by name: computed (the notes still say how rows were cut)
