"""Run configuration: typed, frozen dataclasses, and the one place values enter ft-desk.

A `RunConfig` is built from layers - the dataclass defaults, then preset YAML files in order, then dotted
`--set section.key=value` overrides - and every value is coerced by its annotation and checked as it enters.
Errors are `ConfigError`s whose message names the dotted key and what is allowed, e.g.
``lora.r must be a positive int, got 'x'``. Stdlib + PyYAML only: the TUI imports this module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_origin

from ft_desk.trainer.columns import ColumnsError, columns_setting
from ft_desk.trainer.demo import DEMO_DATA_NAME, DEMO_MODEL_NAME, is_demo_model
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.limits import MAX_NEW_TOKENS, check_run_name, check_text

AUTO = "auto"
"""The value of a batching setting that ft-desk sizes from the data (trainer/recipe_sizing.py)."""


class ConfigError(UserError, ValueError):
    """A configuration value or key is wrong; the message is one sentence meant for the user, the hint the fix
    (by default: where settings are changed, and where each one is explained)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message, hint or "change it in the preset or with --set section.key=value; "
                                          "`ft-desk train --print-config` shows every setting")


@dataclass(frozen=True)
class ModelConfig:
    name: str = DEMO_MODEL_NAME
    """Base model: a Hub id (`Qwen/Qwen2.5-0.5B-Instruct`), a local folder, a .gguf file, an Ollama model
    (`smollm2:135m`; see trainer/model_sources.py), or `demo` (a tiny model built locally)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; None means the cached/default one."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model. Only ever set by the user, never by a preset."""
    allow_pickle: bool = False
    """Allow loading *.bin (pickle) weights when a model has no safetensors."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """dtype of the 16-bit parts of the model; auto picks from the device (see quant.device)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers."""


@dataclass(frozen=True)
class QuantConfig:
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type used when train.method is qlora; NF4 is what the QLoRA paper recommends."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per parameter)."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """dtype the 4-bit weights are dequantized to for matmuls; auto picks from the device."""
    skip_modules: tuple[str, ...] = ("lm_head",)
    """Modules kept in 16-bit (never quantized)."""


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    """Rank of the LoRA update; 8-64 is typical. Higher learns more and costs more memory."""
    alpha: int = 32
    """Scale of the update is alpha / r; 2 x r is a good start."""
    dropout: float = 0.0
    """Dropout on the LoRA input. 0 (default) is the fastest: on SmolLM2-135M on CPU, 0.05 cost 1.29x the time and
    0.7 GB more memory for the same validation loss (bench/real_model.py); raise it to 0.05-0.1 when validation
    loss climbs while training loss falls (overfitting)."""
    target_modules: tuple[str, ...] = ("all-linear",)
    """Layers that get adapters: `all-linear`, or names like q_proj, v_proj."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): slightly better quality, ~1.5-2x slower."""


@dataclass(frozen=True)
class DataConfig:
    train_file: str = DEMO_DATA_NAME
    """Training data: a .jsonl/.json/.csv/.parquet file, or `demo` for the bundled support-desk sample."""
    valid_file: str | None = None
    """Validation data; when None, val_fraction of train_file is held out (deterministic from seed)."""
    format: Literal["auto", "text", "prompt_completion", "alpaca", "sharegpt", "messages"] = "auto"
    """Row format; auto detects it from the first rows."""
    columns: tuple[str, ...] = ()
    """Which column fills which role, e.g. prompt=question,completion=answer; unmapped columns keep their names."""
    max_length: int | Literal["auto"] = "auto"
    """Longest sequence in tokens; longer examples are truncated and counted. auto: 2048 (within the model's
    context). Packed rows are only as long as the data needs (train.row_length, trainer/recipe_sizing.py)."""
    val_fraction: float = 0.1
    """Share of rows held out for validation when no valid_file is given."""
    max_val_rows: int = 200
    """Upper bound on held-out rows taken from the training file."""
    train_on: Literal["assistant", "all"] = "assistant"
    """Which tokens carry loss: only assistant turns / completions, or every token."""
    chat_template: Literal["auto", "model", "none"] = "auto"
    """How conversations become text: the model's chat template (model), plain concatenation (none), or auto."""
    skip_bad_rows: bool = False
    """Skip rows that cannot be read and report counts, instead of stopping at the first one."""
    dedupe: bool = True
    """Drop exact duplicate examples (and say how many)."""
    seed: int = 1234
    """Seed for the train/validation split."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-4
    """Peak learning rate. LoRA/QLoRA: 1e-4..3e-4; full fine-tuning: 1e-5..5e-5."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_ratio: float = 0.03
    """Fraction of optimizer steps spent warming up linearly from 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold (0 turns clipping off)."""


@dataclass(frozen=True)
class TrainConfig:
    method: Literal["qlora", "lora", "full"] = "qlora"
    """qlora: 4-bit base + LoRA; lora: 16-bit base + LoRA; full: every weight trains (small models only)."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed); ignored when max_steps > 0."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means derive from epochs."""
    micro_batch_size: int | Literal["auto"] = "auto"
    """Rows per forward pass (a packed row holds several examples); lower it first when memory is short.
    auto: as many rows as fit the device's tokens per forward pass (trainer/recipe_sizing.py)."""
    grad_accum: int | Literal["auto"] = "auto"
    """Micro-batches per optimizer step; effective batch = micro_batch_size x grad_accum.
    auto: enough examples per step for about 100 optimizer updates over the run, 2 to 16 examples each."""
    micro_batch_tokens: int | Literal["auto"] = "auto"
    """Token budget of one forward pass that an auto micro-batch is sized to; auto: 1024 on CPU, 2048 on MPS,
    4096 on CUDA. The memory plan may lower the micro-batch further (same effective batch)."""
    row_length: int | Literal["auto"] = "auto"
    """Tokens per packed row (at most data.max_length; a longer example gets a row of its own). auto: the longest
    training example rounded up to 64, so short data trains in short rows whatever data.max_length says."""
    packing: bool = True
    """Concatenate examples into one row with a block-diagonal mask: no padding, no cross-example attention."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory, ~30% slower."""
    saved_activations: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype of the activations kept for the backward pass; auto: bfloat16 where the model computes in float32
    (CPU), which halves them and is no slower; the forward pass and the loss stay float32."""
    loss_chunk_tokens: int = 1024
    """Tokens per chunk when computing the loss, so full fp32 logits never exist at once."""
    seed: int = 42
    """Seed for initialisation, dropout and data order."""
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    """Where to train; auto prefers cuda, then mps, then cpu."""
    log_every: int = 1
    """Optimizer steps between step events (each one costs a device sync)."""
    max_bad_steps: int = 5
    """Non-finite losses in a row before the run stops."""
    threads: int = 0
    """CPU threads for torch; 0 (auto): the cores other work leaves free, looked at again every 15 s."""


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 50
    """Optimizer steps between validation passes (0: only at the end)."""
    max_batches: int = 0
    """Cap on validation micro-batches per pass (0: the whole validation set)."""
    sample_prompts: int = 3
    """Held-out prompts generated greedily before and after training."""
    max_new_tokens: int = 64
    """Length limit of each sample generation."""
    early_stop_patience: int = 0
    """Stop after this many validation passes without a new best (0: never stop early)."""


@dataclass(frozen=True)
class OutputConfig:
    runs_dir: str | None = None
    """Folder that holds run folders; None means the per-user data folder."""
    run_name: str | None = None
    """Name of the run folder; None means `<date>-<model>-<method>`."""
    save_every: int = 100
    """Optimizer steps between checkpoints (0: only at the end and at best validation)."""
    keep_last: int = 2
    """Checkpoints kept besides the best one."""


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# Checks beyond the type, by dotted key: (predicate, description of what is allowed). Every number has an upper
# bound too, so a typo like 1e12 is refused here instead of running for hours (the bound is in the message).
_SEED_MAX = 2**32 - 1


def _between(low: float, high: float) -> typing.Callable[[Any], bool]:
    return lambda v: low <= v <= high


_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "lora.r": (_between(1, 4096), "an int from 1 to 4096"),
    "lora.alpha": (_between(1, 65536), "an int from 1 to 65536"),
    "lora.dropout": (lambda v: 0.0 <= v < 1.0, "a float in [0, 1)"),
    "lora.target_modules": (lambda v: 0 < len(v) <= 256, "a non-empty list of at most 256 module names"),
    "quant.skip_modules": (lambda v: len(v) <= 256, "a list of at most 256 module names"),
    "data.max_length": (_between(16, 131072), "an int from 16 to 131072 (tokens)"),
    "data.val_fraction": (lambda v: 0.0 <= v < 1.0, "a float in [0, 1)"),
    "data.max_val_rows": (_between(1, 1_000_000), "an int from 1 to 1000000"),
    "data.seed": (_between(0, _SEED_MAX), f"an int from 0 to {_SEED_MAX}"),
    "optim.lr": (lambda v: 0.0 < v < 1.0, "a float in (0, 1)"),
    "optim.weight_decay": (_between(0.0, 10.0), "a float from 0 to 10"),
    "optim.eps": (lambda v: 0.0 < v <= 1.0, "a float in (0, 1]"),
    "optim.warmup_ratio": (lambda v: 0.0 <= v < 1.0, "a float in [0, 1)"),
    "optim.max_grad_norm": (_between(0.0, 1e6), "a float from 0 to 1000000"),
    "optim.betas": (lambda v: all(0.0 <= b < 1.0 for b in v), "two floats in [0, 1)"),
    "train.epochs": (lambda v: 0 < v <= 1000, "a number above 0 and at most 1000"),
    "train.max_steps": (_between(0, 1_000_000), "an int from 0 to 1000000"),
    "train.micro_batch_size": (_between(1, 4096), "an int from 1 to 4096"),
    "train.grad_accum": (_between(1, 4096), "an int from 1 to 4096"),
    "train.micro_batch_tokens": (_between(16, 1_048_576), "an int from 16 to 1048576"),
    "train.row_length": (_between(16, 131072), "an int from 16 to 131072 (tokens)"),
    "train.loss_chunk_tokens": (_between(16, 1_048_576), "an int from 16 to 1048576"),
    "train.seed": (_between(0, _SEED_MAX), f"an int from 0 to {_SEED_MAX}"),
    "train.log_every": (_between(1, 1_000_000), "an int from 1 to 1000000"),
    "train.max_bad_steps": (_between(1, 1_000_000), "an int from 1 to 1000000"),
    "train.threads": (_between(0, 1024), "an int from 0 (auto: the free cores) to 1024"),
    "eval.every_steps": (_between(0, 1_000_000), "an int from 0 to 1000000"),
    "eval.max_batches": (_between(0, 1_000_000), "an int from 0 to 1000000"),
    "eval.sample_prompts": (_between(0, 100), "an int from 0 to 100"),
    "eval.max_new_tokens": (_between(1, MAX_NEW_TOKENS), f"an int from 1 to {MAX_NEW_TOKENS}"),
    "eval.early_stop_patience": (_between(0, 1_000_000), "an int from 0 to 1000000"),
    "output.save_every": (_between(0, 1_000_000), "an int from 0 to 1000000"),
    "output.keep_last": (_between(1, 1000), "an int from 1 to 1000"),
    "model.name": (lambda v: v.strip() != "", "a model id, a folder, a .gguf file, an Ollama model or `demo`"),
    "data.train_file": (lambda v: v.strip() != "", "a data file or `demo`"),
}

# Free text that becomes a path or an id: no control characters, bounded, no pasted token (trainer/limits.py).
_TEXT_KEYS = {"model.name": "a model id or folder", "model.revision": "a branch, tag or commit",
              "data.train_file": "a data file", "data.valid_file": "a data file",
              "output.runs_dir": "a folder"}


def _columns(value: Any) -> tuple[str, ...]:
    try:
        return columns_setting(value)
    except ColumnsError as err:
        raise ConfigError(str(err)) from None


# Settings whose values have their own grammar: dotted key -> parser (raises ConfigError).
_PARSERS: dict[str, typing.Callable[[Any], Any]] = {"data.columns": _columns}

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in get_args(tp) if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in get_args(tp) else "")
    if origin is tuple:
        return "a list"
    return {int: "an int", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Turn `value` (from YAML or a command line string) into type `tp`, or raise ConfigError naming `key`."""
    shown = value if not isinstance(value, str) or len(value) <= 80 else value[:77] + "..."
    bad = ConfigError(f"{key} must be {_describe(tp)}, got {shown!r}", hint=_hint(key))
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        if optional and (value is None or (isinstance(value, str) and value.strip().lower() in {"null", "none", "~"})):
            return None
        words = [a for a in args if get_origin(a) is Literal]
        if isinstance(value, str) and any(value.strip() in get_args(w) for w in words):
            return value.strip()
        others = [a for a in args if get_origin(a) is not Literal]
        for i, other in enumerate(others):
            try:
                return _coerce(key, other, value)
            except ConfigError:
                if i == len(others) - 1:
                    raise bad from None
        raise bad
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, str):
            value = value.strip()
        if value not in allowed:
            raise bad
        return value
    if origin is tuple:
        item_types = get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import yaml  # PyYAML parses flow lists like [q_proj, v_proj]

                value = yaml.safe_load(text)
            else:
                value = [p.strip() for p in text.split(",") if p.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(item_types) == 2 and item_types[1] is Ellipsis:
            return tuple(_coerce(key, item_types[0], v) for v in value)
        if len(value) != len(item_types):
            raise ConfigError(f"{key} must be a list of {len(item_types)} values, got {value!r}")
        return tuple(_coerce(key, t, v) for t, v in zip(item_types, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise bad from None
            if number.is_integer():
                return int(number)
        raise bad
    if tp is float:
        # PyYAML reads `1e-5` as a string (YAML 1.1 wants a dot), so strings are parsed here.
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise bad
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise bad from None
            if not math.isfinite(number):
                raise bad
            return number
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise ConfigError(f"{key} has an unsupported type {tp!r}")  # a programming error, but say it plainly


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in fields(RunConfig)}


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in fields(section_cls)}


def choices(key: str) -> tuple[str, ...]:
    """The allowed values of a setting with a fixed set of them, by dotted key (e.g. `data.format`)."""
    section, _, name = key.partition(".")
    tp = _field_types(_section_types()[section])[name]
    if get_origin(tp) is not Literal:
        raise ValueError(f"{key} takes any value of its type, not one of a fixed set")
    return get_args(tp)


@functools.lru_cache(maxsize=None)
def _hint(key: str) -> str:
    """The fix for a bad value of `key`: the setting with its default as an example."""
    section, _, name = key.partition(".")
    try:
        default = getattr(_section_types()[section](), name)
    except (KeyError, AttributeError, TypeError):
        return ""
    if isinstance(default, tuple):
        default = ",".join(str(v) for v in default)
    elif isinstance(default, bool):
        default = str(default).lower()
    if default is None:
        return f"change {key} in the preset or with --set {key}=VALUE, or leave it unset"
    return f"change {key} in the preset or with --set {key}=VALUE (the default is {default})"


def _check(key: str, value: Any) -> None:
    rule = _RULES.get(key)
    if rule is not None and value is not None and value != AUTO and not rule[0](value):
        raise ConfigError(f"{key} must be {rule[1]}, got {value!r}", hint=_hint(key))
    if key in _TEXT_KEYS and value is not None:
        try:
            check_text(value, key, _TEXT_KEYS[key])
        except UserError as err:
            raise ConfigError(err.message, err.hint) from None
    if key == "output.run_name" and value is not None:
        try:
            check_run_name(value)
        except UserError as err:
            raise ConfigError(err.message, err.hint) from None


def merge_layer(base: dict[str, dict[str, Any]], layer: dict[str, Any], source: str) -> None:
    """Merge a nested mapping (one preset file) into `base`, rejecting unknown keys by dotted path."""
    sections = _section_types()
    if not isinstance(layer, dict):
        raise ConfigError(f"{source} must be a mapping of sections ({', '.join(sections)}), got {type(layer).__name__}")
    for section, values in layer.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section {section!r}; allowed: {', '.join(sections)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {section} must be a mapping of keys, got {values!r}")
        allowed = _field_types(sections[section])
        for key, value in values.items():
            if key not in allowed:
                raise ConfigError(
                    f"{source}: unknown key {section}.{key}; allowed in {section}: {', '.join(allowed)}"
                )
            base.setdefault(section, {})[key] = value


def parse_override(text: str) -> tuple[str, str, str]:
    """Split `section.key=value` into its parts; the value stays a string until coerced."""
    if "=" not in text:
        raise ConfigError(f"--set takes section.key=value, got {text!r} (for example --set lora.r=32)")
    dotted, value = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set takes section.key=value, got {text!r} (for example --set lora.r=32)")
    return parts[0], parts[1], value


def apply_overrides(base: dict[str, dict[str, Any]], overrides: list[str]) -> None:
    for text in overrides:
        section, key, value = parse_override(text)
        merge_layer(base, {section: {key: value}}, "--set")


def build_config(raw: dict[str, dict[str, Any]]) -> RunConfig:
    """Coerce and validate a merged nested mapping into a RunConfig."""
    sections = _section_types()
    built: dict[str, Any] = {}
    for section, cls in sections.items():
        values = raw.get(section, {})
        types_ = _field_types(cls)
        kwargs = {}
        for key, value in values.items():
            dotted = f"{section}.{key}"
            parse = _PARSERS.get(dotted)
            coerced = parse(value) if parse else _coerce(dotted, types_[key], value)
            _check(dotted, coerced)
            kwargs[key] = coerced
        built[section] = cls(**kwargs)
    config = RunConfig(**built)
    _check_whole(config)
    return config


def _check_whole(config: RunConfig) -> None:
    """Rules that involve more than one key."""
    if config.train.method == "full" and config.lora.use_dora:
        raise ConfigError("lora.use_dora needs train.method qlora or lora; full fine-tuning has no adapter")
    if config.model.trust_remote_code and config.model.revision is None and not is_demo_model(config.model.name):
        raise ConfigError(
            "model.trust_remote_code needs model.revision pinned to the commit you reviewed "
            "(for example --set model.revision=<40-hex sha>)"
        )


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from its own to_dict() output (a saved config.json)."""
    base: dict[str, dict[str, Any]] = {}
    merge_layer(base, raw, "config")
    return build_config(base)


def replace(config: RunConfig, section: str, **changes: Any) -> RunConfig:
    """A copy of `config` with keys of one section changed, validated like any other input."""
    raw = config.to_dict()
    layer = {section: changes}
    merge_layer(raw, layer, "change")
    return build_config(raw)


def describe_fields() -> dict[str, str]:
    """Dotted key -> one-line help, taken from the docstrings under each field (for --help and the TUI)."""
    import ast
    import inspect

    out: dict[str, str] = {}
    for section, cls in _section_types().items():
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                out[f"{section}.{node.target.id}"] = str(nxt.value.value).strip()  # type: ignore[attr-defined]
    return out
