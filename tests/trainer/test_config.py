"""Run configuration: presets, coercion by annotation, dotted overrides, and readable errors."""

from __future__ import annotations

import json

import pytest

from ft_desk.trainer.config import ConfigError, RunConfig, config_from_dict, describe_fields
from ft_desk.trainer.presets import available_presets, load_config, read_preset, save_preset


@pytest.mark.parametrize("name", sorted(available_presets()))
def test_every_shipped_preset_loads_and_opens_with_what_it_is_for(name):
    path = available_presets()[name]
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(f"# {name}:"), f"{path} must open with '# {name}: what it is for'"
    cfg = load_config([name])
    assert isinstance(cfg, RunConfig)
    assert config_from_dict(json.loads(cfg.to_json())) == cfg


def test_strategy_presets_cover_the_four_kinds_of_fine_tuning():
    assert load_config(["qlora"]).train.method == "qlora"
    assert load_config(["qlora"]).quant.quant_type == "nf4" and load_config(["qlora"]).quant.double_quant
    assert load_config(["qlora"]).lora.target_modules == ("all-linear",)
    assert load_config(["lora"]).train.method == "lora"
    assert load_config(["full"]).train.method == "full"
    instruction = load_config(["instruction"])
    assert instruction.data.chat_template == "model" and instruction.data.train_on == "assistant"
    few = load_config(["few-shot"])
    assert few.eval.early_stop_patience > 0 and few.train.epochs > load_config(["qlora"]).train.epochs


def test_yaml_exponent_floats_are_coerced_by_annotation(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  lr: 1e-5\ntrain:\n  epochs: 3\n", encoding="utf-8")
    assert read_preset(path)["optim"]["lr"] == "1e-5"  # PyYAML's YAML 1.1 reading: a string
    cfg = load_config([str(path)])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3.0


def test_dotted_overrides_win_and_are_typed():
    cfg = load_config(["demo"], ["lora.r=32", "train.gradient_checkpointing=yes",
                                 "lora.target_modules=q_proj,v_proj", "optim.betas=[0.9, 0.95]"])
    assert cfg.lora.r == 32
    assert cfg.train.gradient_checkpointing is True
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize("override, message", [
    ("lora.r=x", "lora.r must be an int, got 'x'"),
    ("lora.r=0", "lora.r must be an int from 1 to 4096, got 0"),
    ("lora.r=1e30", "lora.r must be an int from 1 to 4096, got 1000000000000000019884624838656"),
    ("train.epochs=1e12", "train.epochs must be a number above 0 and at most 1000, got 1000000000000.0"),
    ("train.epochs=inf", "train.epochs must be a number, got 'inf'"),
    ("optim.lr=nan", "optim.lr must be a number, got 'nan'"),
    ("train.max_steps=1e12", "train.max_steps must be an int from 0 to 1000000"),
    ("data.max_length=1e30", "data.max_length must be an int from 16 to 131072 (tokens)"),
    ("eval.max_new_tokens=1e12", "eval.max_new_tokens must be an int from 1 to 32768"),
    ("train.micro_batch_size=100000", "train.micro_batch_size must be an int from 1 to 4096"),
    ("output.run_name=../escape", "output.run_name must be a plain folder name"),
    ("output.run_name=a/b", "contains a path separator"),
    ("model.name=hf_abcdefghijklmnopqrstuvwxyz0123", "model.name 'hf_***' looks like an access token"),
    ("data.train_file=/data/x\n.jsonl", "data.train_file '/data/x\\n.jsonl' contains a control character"),
    ("train.method=dpo", "train.method must be one of 'qlora', 'lora', 'full', got 'dpo'"),
    ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
    ("lora.rank=8", "unknown key lora.rank; allowed in lora: r, alpha, dropout, target_modules, use_dora"),
    ("loraa.r=8", "unknown section 'loraa'"),
    ("lora.r", "--set takes section.key=value"),
])
def test_bad_values_name_the_dotted_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(["demo"], [override])
    assert message in str(info.value)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="no preset named 'nope'; available: .*qlora"):
        load_config(["nope"])


def test_saved_preset_round_trips_and_never_overwrites(session_home):
    cfg = load_config(["qlora"], ["lora.r=8"])
    path = save_preset(cfg, "my-recipe", note="my-recipe: r=8 for my laptop")
    assert load_config(["my-recipe"]) == cfg
    with pytest.raises(ConfigError, match="already exists"):
        save_preset(cfg, "my-recipe")
    path.unlink()


def test_every_field_has_help_text():
    help_ = describe_fields()
    for section, cls in RunConfig.__dataclass_fields__.items():
        for key in cls.default_factory().__dataclass_fields__:  # type: ignore[misc]
            assert help_.get(f"{section}.{key}"), f"{section}.{key} has no docstring"


def test_choices_lists_the_allowed_values_of_a_fixed_set_setting():
    from ft_desk.trainer.config import choices

    assert choices("data.format") == ("auto", "text", "prompt_completion", "alpaca", "sharegpt", "messages")
    assert choices("data.train_on") == ("assistant", "all")
    with pytest.raises(ValueError, match="data.max_length"):
        choices("data.max_length")


def test_a_bad_value_comes_with_the_fix_naming_the_setting_and_its_default():
    with pytest.raises(ConfigError) as info:
        load_config(["demo"], ["train.grad_accum=0"])
    assert info.value.hint == ("change train.grad_accum in the preset or with --set train.grad_accum=VALUE "
                               "(the default is auto)")
    with pytest.raises(ConfigError) as info:
        load_config(["demo"], ["lora.rank=8"])
    assert "--print-config" in info.value.hint  # an unknown key: where every setting is listed


def test_a_pasted_token_never_reaches_the_message_verbatim():
    token = "hf_" + "Q" * 34
    with pytest.raises(ConfigError) as info:
        load_config(["demo"], [f"data.train_file=/home/me/{token}/rows.jsonl"])
    assert token not in info.value.full()
    assert "looks like an access token" in info.value.message
