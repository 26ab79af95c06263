"""The faster paths train the same model: bf16 autocast on CPUs with native bf16 tracks the fp32 path's per-step
losses within bf16 rounding, and a second run that reads its tokens from the cache trains identically."""

from __future__ import annotations

import pytest

from ft_desk.trainer.events import ListSink
from ft_desk.trainer.presets import load_config
from ft_desk.trainer.training import run as run_mod


def _cfg(tiny_model_dir, tmp_path, name, *overrides):
    return load_config(["qlora"], [f"model.name={tiny_model_dir}", "data.train_file=demo", "train.device=cpu",
                                   "train.threads=1", "train.max_steps=4", "train.micro_batch_size=2",
                                   "train.grad_accum=1", "data.max_length=128", "optim.lr=1e-3",
                                   "eval.every_steps=0", "eval.sample_prompts=0", "output.save_every=0",
                                   f"output.runs_dir={tmp_path}", f"output.run_name={name}", *overrides])


def _train(cfg) -> ListSink:
    sink = ListSink()
    code, run_dir = run_mod.train(cfg, sink)
    assert code == 0, (run_dir / "run.log").read_text()[-2000:]
    return sink


def _losses(sink: ListSink) -> list[float]:
    return [e["loss"] for e in sink.of_type("step")]


def test_cpu_bf16_autocast_is_on_only_with_native_bf16_and_an_auto_dtype(tiny_model_dir, tmp_path, monkeypatch):
    assert not run_mod.cpu_bf16_autocast(_cfg(tiny_model_dir, tmp_path, "x"), {"bf16": True})  # off by default
    monkeypatch.setattr(run_mod, "CPU_BF16_AUTOCAST", True)
    auto = _cfg(tiny_model_dir, tmp_path, "x")
    assert run_mod.cpu_bf16_autocast(auto, {"bf16": True})
    assert not run_mod.cpu_bf16_autocast(auto, {"bf16": False})
    explicit = _cfg(tiny_model_dir, tmp_path, "x", "quant.compute_dtype=float32")
    assert not run_mod.cpu_bf16_autocast(explicit, {"bf16": True})


def test_bf16_autocast_tracks_the_fp32_losses_step_by_step(tiny_model_dir, tmp_path, one_thread, monkeypatch):
    import ft_desk.quant.device as device

    plain = _losses(_train(_cfg(tiny_model_dir, tmp_path, "fp32", "quant.compute_dtype=float32")))
    monkeypatch.setattr(device, "cpu_features", lambda: {"bf16": True})  # as on an AVX512-BF16 / AMX CPU
    monkeypatch.setattr(run_mod, "CPU_BF16_AUTOCAST", True)
    fast = _losses(_train(_cfg(tiny_model_dir, tmp_path, "bf16")))
    assert len(fast) == len(plain) == 4
    assert fast != plain  # the bf16 path really ran
    for a, b in zip(fast, plain):
        assert a == pytest.approx(b, rel=2e-2)  # bf16 keeps 8 significant bits per product; fp32 accumulates


def test_a_second_run_reads_its_tokens_from_the_cache_and_trains_identically(tiny_model_dir, tmp_path, one_thread,
                                                                            monkeypatch):
    from ft_desk.trainer.data import token_cache

    monkeypatch.setattr(token_cache, "cache_dir", lambda: tmp_path / "token-cache")  # empty: the first run tokenizes
    first = _train(_cfg(tiny_model_dir, tmp_path, "first", "quant.compute_dtype=float32"))
    second = _train(_cfg(tiny_model_dir, tmp_path, "second", "quant.compute_dtype=float32"))
    (ready_first,), (ready_second,) = first.of_type("data_ready"), second.of_type("data_ready")
    assert not ready_first["tokens_cached"] and ready_second["tokens_cached"]
    assert ready_second["train_tokens"] == ready_first["train_tokens"]
    assert _losses(second) == _losses(first)
    (loaded,) = second.of_type("model_loaded")
    assert loaded["startup_seconds"] > 0
