"""Each task metric on hand-made cases with known values, the intervals, and the few-shot honesty rule."""

from __future__ import annotations

import json
import math

import pytest

from ft_desk.trainer.errors import UserError
from ft_desk.trainer.evaluate import metrics as em


def test_exact_and_normalized_exact_match():
    assert em.exact_match("  Paris \n", "Paris") == 1.0
    assert em.exact_match("paris", "Paris") == 0.0
    assert em.normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffel tower in paris"
    assert em.normalized_exact_match("the eiffel tower in paris", "Eiffel Tower, in Paris.") == 1.0
    assert em.normalized_exact_match("a cat", "the dog") == 0.0


def test_rouge_l_counts_the_longest_common_subsequence_of_words():
    # 5 of 6 words in order on each side: precision = recall = F1 = 5/6.
    assert em.rouge_l("the cat was on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    assert em.rouge_l("Blue.", "blue") == pytest.approx(1.0)
    assert em.rouge_l("green", "blue") == 0.0
    # recall 1 (both reference words), precision 2/4: F1 = 2/3
    assert em.rouge_l("red sky at night", "red night") == pytest.approx(2 / 3)


def test_chrf_and_bleu_are_100_on_a_perfect_answer_and_0_on_an_unrelated_one():
    assert em.chrf("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    assert em.bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    assert em.chrf("xyz", "abc") == 0.0
    assert em.bleu("xyz", "abc") == 0.0
    assert 0 < em.chrf("the cat sat", "the cat sat on the mat") < 100


def test_corpus_scores_from_sufficient_statistics_match_sacrebleu():
    import numpy as np
    import sacrebleu

    hyps = ["the cat sat on the mat", "a quick brown dog", "hello there general"]
    refs = ["the cat was on the mat", "the quick brown fox", "hello there"]
    everything = np.arange(3)
    assert em.corpus_score("bleu", hyps, refs)(everything) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert em.corpus_score("chrf", hyps, refs)(everything) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    resampled = em.corpus_score("bleu", hyps, refs)(np.array([[0, 0, 0], [1, 2, 0]]))
    assert resampled.shape == (2,)
    assert resampled[0] == pytest.approx(sacrebleu.corpus_bleu([hyps[0]] * 3, [[refs[0]] * 3]).score)


def test_json_parse_accepts_whole_outputs_and_a_single_fence_only():
    assert em.parse_json_output('{"answer": "blue"}') == (True, {"answer": "blue"})
    assert em.parse_json_output('```json\n{"answer": "blue"}\n```') == (True, {"answer": "blue"})
    assert em.parse_json_output('  [1, 2]\n') == (True, [1, 2])
    assert em.parse_json_output('Sure! {"answer": "blue"}')[0] is False
    assert em.parse_json_output('{"answer": "blue"')[0] is False
    assert em.parse_json_output("")[0] is False


def test_schema_validity_and_readable_errors_for_bad_schema_files(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["answer"],
                                  "properties": {"answer": {"type": "string"}}}))
    validator = em.load_schema_validator(schema)
    assert em.schema_valid(validator, {"answer": "blue"})
    assert not em.schema_valid(validator, {"answer": 3})
    assert not em.schema_valid(validator, ["answer"])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        em.load_schema_validator(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"type": "no-such-type"}))
    with pytest.raises(UserError, match="not a valid JSON Schema"):
        em.load_schema_validator(wrong)
    with pytest.raises(UserError, match="no such file"):
        em.load_schema_validator(tmp_path / "missing.json")


def test_regex_match_searches_the_stripped_output():
    anchored = em.compile_regex(r'^\{"answer": "[a-z]+"\}$')
    assert em.regex_match(anchored, ' {"answer": "blue"}\n') == 1.0
    assert em.regex_match(anchored, 'ok {"answer": "blue"}') == 0.0
    assert em.regex_match(em.compile_regex(r"\d{3}"), "call 555 now") == 1.0
    with pytest.raises(UserError, match="not a valid regular expression"):
        em.compile_regex("(unclosed")


def test_wilson_interval_known_values():
    low, high = em.wilson_interval(0, 6)
    assert low == 0.0 and high == pytest.approx(0.390, abs=1e-3)
    low, high = em.wilson_interval(8, 8)
    assert low == pytest.approx(0.676, abs=1e-3) and high == 1.0
    low, high = em.wilson_interval(50, 100)
    assert (low, high) == (pytest.approx(0.404, abs=1e-3), pytest.approx(0.596, abs=1e-3))


def test_a_clear_gain_on_eight_examples_is_better_but_carries_its_count_and_interval():
    row = em.compare_rates("exact_match", "exact match", [0.0] * 8, [1.0] * 8)
    assert (row.base, row.tuned, row.delta) == (0.0, 1.0, 1.0)
    assert row.verdict == "better"
    assert row.few and row.note == "only 8 examples: +/-16 points"
    assert row.tuned_ci95 == (pytest.approx(0.676, abs=1e-3), 1.0)


def test_too_few_or_mixed_examples_give_no_verdict():
    assert em.compare_rates("x", "x", [0.0] * 5, [1.0] * 5).verdict == "unclear"  # 5 of 5: p = 0.0625
    mixed = em.compare_rates("x", "x", [1, 0, 1, 0, 1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1, 0, 1, 1, 1])
    assert mixed.delta == pytest.approx(0.1) and mixed.verdict == "unclear"
    assert em.compare_rates("x", "x", [1.0] * 10, [1.0] * 10).verdict == "same"
    assert em.compare_rates("x", "x", [0.0] * 1, [1.0] * 1).note == "only 1 example: no interval"


def test_enough_examples_give_a_plain_number():
    base = [0.0] * 40
    tuned = [1.0] * 30 + [0.0] * 10
    row = em.compare_rates("exact_match", "exact match", base, tuned)
    assert not row.few and row.note == "" and row.verdict == "better"
    lo, hi = row.delta_ci95
    assert lo < 0.75 < hi


def test_min_examples_is_the_threshold_for_the_note(monkeypatch):
    monkeypatch.setattr(em, "MIN_EXAMPLES", 8)
    assert not em.compare_rates("x", "x", [0.0] * 8, [1.0] * 8).few
    assert em.compare_rates("x", "x", [0.0] * 7, [1.0] * 7).few


def test_direction_of_better_is_respected():
    lower = em.compare_means("loss", "loss", [3.0, 3.1, 2.9, 3.2, 3.0, 3.1], [1.0, 1.1, 0.9, 1.2, 1.0, 1.1],
                             better="lower", scale="loss")
    assert lower.verdict == "better" and lower.delta == pytest.approx(-2.0)
    ratio = em.compare_means("length_ratio", "len", [3.0] * 6, [1.05, 0.95, 1.0, 1.1, 0.9, 1.0],
                             better="closer_to_1", scale="ratio")
    assert ratio.verdict == "better"
    worse = em.compare_means("length_ratio", "len", [1.0] * 6, [2.0, 2.1, 1.9, 2.0, 2.2, 1.8],
                             better="closer_to_1", scale="ratio")
    assert worse.verdict == "worse"


def test_token_weighted_loss_and_perplexity_aggregates():
    import numpy as np

    agg = em.ratio_of([2.0, 6.0], [1, 3])  # (2 + 6) / (1 + 3) = 2 nats per token
    assert agg(np.arange(2)) == pytest.approx(2.0)
    assert em.exp_of(agg)(np.arange(2)) == pytest.approx(math.exp(2.0))


def test_values_print_in_their_scale():
    assert em.format_value(0.125, "rate") == "12.5%"
    assert em.format_value(0.5, "rate", signed=True) == "+50.0%"
    assert em.format_value(2047.4, "ppl") == "2,047"
    assert em.format_value(3.2e15, "ppl") == "3.20e+15"
    assert em.format_value(-1.25, "loss", signed=True) == "-1.250"
    assert em.format_value(None, "score") == "-"
