"""Recipes that size themselves: `auto` micro-batch, accumulation and max length from the data's token counts,
so a hobbyist-sized dataset gets enough optimizer updates, and a memory plan made before the data is known still
bounds the run from above."""

from __future__ import annotations

import pytest

from ft_desk.quant.device import DeviceFacts
from ft_desk.trainer import recipe_sizing as rs
from ft_desk.trainer.config import ConfigError, config_from_dict
from ft_desk.trainer.planning import plan_run
from ft_desk.trainer.presets import load_config
from ft_desk.trainer.recipe_sizing import size_batches

# SmolLM2-135M-Instruct's shape (the model of issue #11's measurements).
SMOL = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
        "tie_word_embeddings": True}


def wikisql_like(n: int = 270) -> list[int]:
    """Token counts shaped like WikiSQL prompt/completion rows under a chat template (88-173, median ~117)."""
    return [88 + (i * 37) % 86 for i in range(n)]


def test_auto_is_the_preset_default_and_numbers_still_work():
    cfg = load_config(["qlora"], [])
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.data.max_length) == ("auto", "auto", "auto")
    assert load_config(["qlora"], ["train.micro_batch_size=3"]).train.micro_batch_size == 3
    again = config_from_dict(cfg.to_dict())
    assert again.train.micro_batch_size == "auto" and again.data.max_length == "auto"
    with pytest.raises(ConfigError, match="train.micro_batch_size must be an int or one of 'auto', got 'lots'"):
        load_config(["qlora"], ["train.micro_batch_size=lots"])
    with pytest.raises(ConfigError, match="train.grad_accum must be an int from 1 to 4096, got 0"):
        load_config(["qlora"], ["train.grad_accum=0"])


def test_max_length_covers_the_longest_example_within_the_cap_and_the_context():
    assert rs.auto_max_length([90, 173, 120]) == 192
    assert rs.auto_max_length([64]) == 64
    assert rs.auto_max_length([9000]) == rs.MAX_LENGTH_CAP
    assert rs.auto_max_length([1500], context=1024) == 1024


def test_a_small_dataset_gets_about_a_hundred_updates_where_the_old_fixed_recipe_made_ten():
    lengths = wikisql_like(300)
    old = load_config(["qlora"], ["train.micro_batch_size=4", "train.grad_accum=4", "data.max_length=512",
                                  "train.row_length=512"])
    _, fixed = size_batches(old, lengths, "cpu")
    assert fixed.steps <= 12 and "only" in fixed.warning  # the 10 steps, now with a warning
    sized_cfg, sizing = size_batches(load_config(["qlora"], []), lengths, "cpu")
    assert 60 <= sizing.steps <= 160 and not sizing.warning
    assert rs.MIN_EXAMPLES_PER_STEP <= sizing.examples_per_step <= rs.MAX_EXAMPLES_PER_STEP
    assert sizing.row_length == 192 and sized_cfg.train.row_length == 192
    assert sized_cfg.data.max_length == sizing.max_length == rs.MAX_LENGTH_CAP  # truncation stays at the cap
    assert sizing.micro_batch_size * sizing.row_length <= rs.MICRO_BATCH_TOKENS["cpu"]
    assert (sized_cfg.train.micro_batch_size, sized_cfg.train.grad_accum) == (sizing.micro_batch_size,
                                                                              sizing.grad_accum)
    assert set(sizing.auto_keys) == {"data.max_length", "train.row_length", "train.micro_batch_size",
                                     "train.grad_accum"}
    assert "optimizer steps" in sizing.summary() and "sized from the data" in sizing.summary()


def test_a_large_dataset_gets_the_usual_sixteen_examples_per_step():
    _, sizing = size_batches(load_config(["qlora"], []), wikisql_like(20_000), "cuda")
    assert 12 <= sizing.examples_per_step <= 20
    assert sizing.micro_batch_size * sizing.row_length <= rs.MICRO_BATCH_TOKENS["cuda"]
    assert sizing.steps > 1000


def test_values_the_user_set_are_kept():
    cfg = load_config(["qlora"], ["train.micro_batch_size=2", "data.max_length=320"])
    sized, sizing = size_batches(cfg, wikisql_like(), "cpu")
    assert sized.train.micro_batch_size == 2 and sized.data.max_length == 320
    assert sizing.auto_keys == ("train.row_length", "train.grad_accum")
    manual = load_config(["qlora"], ["train.micro_batch_size=2", "train.grad_accum=3", "data.max_length=320",
                                     "train.row_length=256"])
    same, figures = size_batches(manual, wikisql_like(), "cpu")
    assert same == manual and figures.auto_keys == () and figures.grad_accum == 3


def test_a_higher_max_length_truncates_less_but_packs_the_same_short_rows():
    """Issue #12: with data.max_length=1024 every row was 1024 tokens for 88-173-token examples, spending memory
    and time on masked-out attention blocks; rows now follow the data and the limit only truncates."""
    lengths = wikisql_like()
    by_limit = {limit: size_batches(load_config(["qlora"], [f"data.max_length={limit}"]), lengths, "cpu")
                for limit in (256, 512, 1024)}
    assert {s.row_length for _, s in by_limit.values()} == {192}
    assert {(s.micro_batch_size, s.grad_accum, s.steps) for _, s in by_limit.values()} == {
        (by_limit[256][1].micro_batch_size, by_limit[256][1].grad_accum, by_limit[256][1].steps)}
    assert [cfg.data.max_length for cfg, _ in by_limit.values()] == [256, 512, 1024]
    # A limit below the longest example cuts the rows to it; a row never exceeds the limit.
    cut, sizing = size_batches(load_config(["qlora"], ["data.max_length=100"]), lengths, "cpu")
    assert sizing.row_length == rs.row_length(cut) == 100
    # Set by hand, the row length is kept within the limit.
    assert rs.row_length(load_config(["qlora"], ["data.max_length=300", "train.row_length=512"])) == 300


def test_a_tiny_dataset_is_warned_that_it_makes_few_updates():
    _, sizing = size_batches(load_config(["qlora"], ["train.epochs=1"]), wikisql_like(20), "cpu")
    assert sizing.steps < rs.FEW_UPDATES and "too few to learn much" in sizing.warning


def test_max_steps_sets_the_step_count():
    _, sizing = size_batches(load_config(["qlora"], ["train.max_steps=7"]), wikisql_like(), "cpu")
    assert sizing.steps == 7


def test_a_plan_made_before_the_data_bounds_the_sized_run():
    device = DeviceFacts(type="cpu", total_memory=64 << 30, free_memory=64 << 30)
    auto = load_config(["qlora"], [])
    before = plan_run(SMOL, auto, device)
    sized, _ = size_batches(auto, wikisql_like(), "cpu", context=8192)
    after = plan_run(SMOL, sized, device)
    assert after.total_bytes <= before.total_bytes
    assert before.settings["micro_batch_size"] * before.settings["max_length"] <= rs.MICRO_BATCH_TOKENS["cpu"] * 2
