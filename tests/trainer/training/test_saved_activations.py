"""Activations kept for backward in bf16 (a CPU run's default): the forward pass and loss are unchanged to the bit,
the gradients and later steps follow the fp32 path within bf16 rounding, the stored bytes halve, and a tensor
saved by several ops is stored once."""

from __future__ import annotations

import pytest

from ft_desk.trainer.events import ListSink
from ft_desk.trainer.presets import load_config
from ft_desk.trainer.training import run as run_mod
from ft_desk.trainer.training import saved_activations as sa
from ft_desk.trainer.training.saved_activations import BF16SavedActivations, feature_widths

torch = pytest.importorskip("torch")


def test_a_tensor_saved_by_several_ops_is_stored_once_and_parameters_stay_as_they_are():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(64, 32)) for _ in range(3)]
    source = torch.randn(8, 64, requires_grad=True)
    store = BF16SavedActivations(widths=frozenset({64, 32}), min_elements=0)
    with store:
        x = source * 2.0  # not a leaf: an activation
        out = sum((x.view(8, 64) @ w).sum() for w in weights)  # three ops save views of the same x
    out.backward()
    assert store.saved_bytes == 3 * x.numel() * 4
    assert store.stored_bytes == x.numel() * 2  # one bf16 copy for all three
    for w in weights:  # the weight gradient is computed from the bf16 copy of x
        expected = (2.0 * source.detach()).to(torch.bfloat16).float().t() @ torch.ones(8, 32)
        assert torch.allclose(w.grad, expected)


def test_statistics_and_small_tensors_stay_fp32():
    store = BF16SavedActivations(widths=frozenset({64}), min_elements=1000)
    activation = torch.randn(4, 100, 64) * 1.0
    per_token = torch.randn(4, 100, 10) * 1.0  # e.g. a log-sum-exp per head: last dimension not a feature width
    small = torch.randn(4, 64) * 1.0
    assert store._pack(per_token) is per_token and store._pack(small) is small
    assert store._pack(torch.ones(4, 100, 64, dtype=torch.long)) is not None  # integers pass through
    stored = store._pack(activation)
    assert stored.tensor.dtype == torch.bfloat16 and store._unpack(stored).dtype == torch.float32


def test_an_in_place_change_between_two_saves_is_not_mistaken_for_the_same_tensor():
    w = torch.nn.Parameter(torch.randn(16, 16))
    store = BF16SavedActivations(widths=frozenset({16}), min_elements=0)
    with store:
        x = torch.ones(4, 16) * 1.0
        first = x @ w
        x.mul_(3.0)  # the saved copy of x for `first` must keep the old values
        second = x @ w
    # Without hooks autograd would refuse this (x was modified after being saved); the copies keep both versions.
    (first.sum() + second.sum()).backward()
    assert store.stored_bytes == 2 * x.numel() * 2
    assert torch.allclose(w.grad, torch.full((16, 16), 4.0 * 4))


def test_feature_widths_of_a_grouped_query_model():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    assert feature_widths(config) == {576, 1536, 64, 192}


def _cfg(tiny_model_dir, tmp_path, name, *overrides):
    return load_config(["qlora"], [f"model.name={tiny_model_dir}", "data.train_file=demo", "train.device=cpu",
                                   "train.threads=1", "train.max_steps=4", "train.micro_batch_size=2",
                                   "train.grad_accum=1", "data.max_length=96", "optim.lr=1e-3",
                                   "eval.every_steps=0", "eval.sample_prompts=0", "output.save_every=0",
                                   "quant.compute_dtype=float32", f"output.runs_dir={tmp_path}",
                                   f"output.run_name={name}", *overrides])


def _losses(cfg) -> list[float]:
    sink = ListSink()
    code, run_dir = run_mod.train(cfg, sink)
    assert code == 0, (run_dir / "run.log").read_text()[-2000:]
    return [e["loss"] for e in sink.of_type("step")]


def test_a_cpu_run_stores_its_activations_in_bf16_and_trains_like_the_fp32_path(tiny_model_dir, tmp_path,
                                                                                 one_thread, monkeypatch):
    made = []

    class Recording(BF16SavedActivations):
        def __init__(self, **kwargs):
            super().__init__(**{**kwargs, "min_elements": 0})  # the tiny model's tensors are all small
            made.append(self)

    monkeypatch.setattr(run_mod, "BF16SavedActivations", Recording)
    plain = _losses(_cfg(tiny_model_dir, tmp_path, "fp32", "train.saved_activations=float32"))
    assert made == []  # float32 asked for: no hooks
    stored = _losses(_cfg(tiny_model_dir, tmp_path, "auto"))
    (store,) = made
    assert store.stored_bytes > 0 and store.stored_bytes * 2 <= store.saved_bytes  # halved (shared copies too)
    assert stored[0] == plain[0]  # the first step's forward pass is the fp32 one, to the bit
    assert stored != plain  # later steps used gradients from bf16 activations
    for a, b in zip(stored, plain):
        assert a == pytest.approx(b, rel=1e-2)


def test_auto_is_bf16_only_where_the_model_computes_in_fp32():
    assert sa.saved_activations_dtype("auto", "float32") == "bfloat16"
    assert sa.saved_activations_dtype("auto", "bfloat16") == "bfloat16"
    assert sa.saved_activations_dtype("auto", "float16") == "float16"
    assert sa.saved_activations_dtype("float32", "float32") == "float32"
