"""Memory planner arithmetic on known model shapes (quant.planner), and the RunConfig side (trainer.planning):
the dtypes a run resolves to, the verdict, its suggestions, and reading config.json."""

from __future__ import annotations

import json

import pytest

from ft_desk.quant import planner
from ft_desk.quant.device import DeviceFacts
from ft_desk.quant.planner import PlanInputs, model_shape, plan_memory
from ft_desk.trainer.errors import ModelError
from ft_desk.trainer.planning import load_model_config, plan_inputs, plan_run
from ft_desk.trainer.presets import load_config

GIB = 1024**3

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "float16",
}
SMOLLM2_135M = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
RTX_3090 = DeviceFacts("cuda", "RTX 3090", total_memory=24 * GIB, free_memory=24 * GIB, compute_capability=(8, 6),
                       bf16=True)


def _run(*overrides: str, presets=("qlora",)):
    return load_config(list(presets), list(overrides))


def test_llama2_7b_shape_counts_its_parameters():
    shape = model_shape(LLAMA2_7B)
    assert shape.known and not shape.tied_embeddings
    assert shape.params == 6_738_415_616  # Llama-2-7B's published parameter count
    # LoRA r=16 on every linear: 16 x (in + out) per projection, 32 layers (peft reports 39,976,960).
    assert planner.lora_params(shape, 16, ("all-linear",)) == 39_976_960
    assert planner.lora_params(shape, 8, ("q_proj", "v_proj")) == 4_194_304


@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("length", [512, 1024, 2048])
def test_qlora_7b_lands_in_the_published_range(r, length):
    # Published figures for QLoRA of a 7B Llama, micro-batch 1, gradient checkpointing, paged/regular AdamW:
    # - QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314): NF4 + double quant costs ~4.127 bits per weight
    #   (section 3), and its Guanaco table lists the 7B model at 5 GB; a 7B step at batch 1 / 512 tokens adds
    #   ~0.6 GB of LoRA input gradients with checkpointing (section 3, paged optimizers).
    # - bitsandbytes docs: 4-bit cuts a 7B model's ~13.5 GB of fp16 weights by 75% (~3.5 GB), and the
    #   QLoRA recipes train 7B models on 16 GB cards (Colab T4): peaks of roughly 5-10 GB for 512-2048 tokens.
    run = _run(f"lora.r={r}", f"lora.alpha={2 * r}", f"data.max_length={length}", "train.micro_batch_size=1",
               "train.gradient_checkpointing=true", "train.device=cuda")
    plan = plan_run(LLAMA2_7B, run, RTX_3090)
    assert 5 * GIB <= plan.total_bytes <= 10 * GIB, planner.human_bytes(plan.total_bytes)
    weights = plan.component("4-bit weights")
    assert 3.0 * GIB <= weights <= 3.9 * GIB
    assert plan.verdict == "fits"


SETTINGS_8GB = ("data.max_length=2048", "train.micro_batch_size=4", "train.gradient_checkpointing=false",
                "train.device=cuda")


def test_qlora_7b_on_an_8gb_card_without_checkpointing_does_not_fit_and_says_what_does():
    run = _run(*SETTINGS_8GB)
    card = DeviceFacts("cuda", "RTX 3070", total_memory=8 * GIB, free_memory=8 * GIB, compute_capability=(8, 6),
                       bf16=True)
    plan = plan_run(LLAMA2_7B, run, card)
    assert plan.verdict == "does not fit"
    assert plan.suggestions
    for s in plan.suggestions:
        assert s.total_bytes < plan.total_bytes  # every suggestion lowers the estimate
    first = plan.first_fit
    assert first is not None and first.fits
    assert first is next(s for s in plan.suggestions if s.fits)
    # Applying the suggested overrides really gives a plan that fits, with the promised estimate.
    fixed = plan_run(LLAMA2_7B, load_config(["qlora"], [*SETTINGS_8GB, *first.overrides]), card)
    assert fixed.total_bytes == first.total_bytes
    assert fixed.verdict == "fits"


def test_the_arithmetic_takes_plain_inputs_without_a_run_config():
    # What trainer.planning resolves from the qlora preset on a bf16 card, written out by hand.
    inputs = PlanInputs(device="cuda", method="qlora", compute_dtype="bfloat16", weights_dtype="bfloat16",
                        micro_batch_size=1, max_length=1024, grad_accum=8, gradient_checkpointing=True,
                        packing=False, loss_chunk_tokens=1024, lora_r=16, target_modules=("all-linear",),
                        lora_dropout=0.0, use_dora=False, double_quant=True, cpu_allocator_capped=True,
                        saved_activations="bfloat16", sample_prompts=3, max_new_tokens=64,
                        available_memory=24 * GIB)
    by_hand = plan_memory(LLAMA2_7B, inputs, RTX_3090)
    run = _run("train.device=cuda", "data.max_length=1024", "train.micro_batch_size=1", "train.grad_accum=8",
               "train.gradient_checkpointing=true", "train.loss_chunk_tokens=1024", "lora.r=16",
               "lora.target_modules=all-linear", "lora.dropout=0", "quant.double_quant=true", "train.packing=false")
    assert plan_inputs(run, RTX_3090) == inputs
    assert by_hand.total_bytes == plan_run(LLAMA2_7B, run, RTX_3090).total_bytes
    assert by_hand.settings["grad_accum"] == 8 and by_hand.suggestions == []
    # No device: planned as a bf16 GPU for train.device=auto, with no budget and no verdict.
    assert plan_inputs(_run(), None).compute_dtype == "bfloat16"
    assert plan_memory(LLAMA2_7B, inputs, None).verdict == "unknown device"


def test_verdict_thresholds():
    run = _run("train.device=cuda")
    need = plan_run(LLAMA2_7B, run, RTX_3090).total_bytes
    roomy = DeviceFacts("cuda", total_memory=2 * need, free_memory=2 * need, bf16=True)
    tight = DeviceFacts("cuda", total_memory=int(need * 1.05), free_memory=int(need * 1.05), bf16=True)
    small = DeviceFacts("cuda", total_memory=need // 2, free_memory=need // 2, bf16=True)
    assert plan_run(LLAMA2_7B, run, roomy).verdict == "fits"
    assert plan_run(LLAMA2_7B, run, tight).verdict == "tight"
    assert plan_run(LLAMA2_7B, run, small).verdict == "does not fit"
    unknown = plan_run(LLAMA2_7B, run, None)
    assert unknown.verdict == "unknown device"
    assert unknown.device_budget_bytes is None
    # Without a budget the ways to lower the peak are still listed, with no fit judgement.
    assert unknown.suggestions and all(s.fits is None for s in unknown.suggestions)
    assert unknown.first_fit is None


def test_when_nothing_alone_fits_the_changes_are_stacked():
    run = _run("data.max_length=2048", "train.micro_batch_size=8", "train.device=cuda")
    need_stacking = DeviceFacts("cuda", total_memory=7 * GIB, free_memory=7 * GIB, bf16=True)
    plan = plan_run(LLAMA2_7B, run, need_stacking)
    singles = [s for s in plan.suggestions if " + " not in s.description]
    stacked = [s for s in plan.suggestions if " + " in s.description]
    assert singles and not any(s.fits for s in singles)
    assert stacked and stacked[-1].fits and plan.first_fit is stacked[-1]
    assert "train.gradient_checkpointing=true" in stacked[-1].overrides


def test_large_vocab_costs_more_and_the_chunked_loss_keeps_logits_small():
    small_vocab = dict(SMOLLM2_135M)
    large_vocab = dict(SMOLLM2_135M, vocab_size=151936)
    run = _run("data.max_length=1024", "train.micro_batch_size=4", "train.device=cpu")
    cpu = DeviceFacts("cpu", total_memory=64 * GIB, free_memory=64 * GIB)
    a, b = plan_run(small_vocab, run, cpu), plan_run(large_vocab, run, cpu)
    extra_embedding = (151936 - 49152) * 576 * 4  # tied, fp32 on CPU
    assert b.component("embeddings") - a.component("embeddings") == extra_embedding
    assert b.component("loss") == pytest.approx(a.component("loss") * 151936 / 49152)
    assert b.total_bytes > a.total_bytes + extra_embedding
    # A plain trainer materialises batch x length x vocab fp32 logits: 4x more positions than one 1024 chunk.
    plain = planner.plain_trainer_logits(large_vocab, plan_inputs(run, cpu))
    assert plain == 4 * b.component("loss")
    assert plain > 5 * GIB  # 4 x 1024 x 151936 x 4 bytes x 3 copies: the term chunking removes


def test_loss_term_follows_its_constant(monkeypatch):
    run = _run("train.device=cpu")
    copies = planner.LOSS_CHUNK_COPIES
    before = plan_run(SMOLLM2_135M, run, None).component("loss")
    monkeypatch.setattr(planner, "LOSS_CHUNK_COPIES", copies + 1)
    after = plan_run(SMOLLM2_135M, run, None).component("loss")
    assert after * copies == before * (copies + 1)


def test_checkpointing_micro_batch_and_length_move_the_activations():
    def acts(*overrides):
        plan = plan_run(SMOLLM2_135M, _run("train.device=cpu", *overrides), None)
        return plan.component("activations")

    base = acts("train.micro_batch_size=2", "data.max_length=512")
    assert acts("train.micro_batch_size=4", "data.max_length=512") == pytest.approx(2 * base, rel=0.001)
    assert acts("train.micro_batch_size=2", "data.max_length=512", "train.gradient_checkpointing=true") < base / 5
    # The SDPA mask is length x length per row, so doubling the length more than doubles activations.
    assert acts("train.micro_batch_size=2", "data.max_length=1024") > 2 * base


def test_methods_rank_as_expected():
    cpu = DeviceFacts("cpu", total_memory=64 * GIB, free_memory=64 * GIB)
    totals = {m: plan_run(SMOLLM2_135M, _run("train.device=cpu", "lora.dropout=0", f"train.method={m}"),
                             cpu).total_bytes for m in ("qlora", "lora", "full")}
    assert totals["qlora"] < totals["lora"] < totals["full"]
    full = plan_run(SMOLLM2_135M, _run("train.device=cpu", "train.method=full"), cpu)
    assert full.trainable_params == model_shape(SMOLLM2_135M).params


def test_unknown_architecture_is_padded_and_marked():
    config = {"model_type": "brand_new_lm", "vocab_size": 50000, "hidden_size": 1024, "num_hidden_layers": 12,
              "num_attention_heads": 16, "intermediate_size": 4096}
    as_llama = dict(config, model_type="llama", tie_word_embeddings=False)
    run = _run("train.device=cuda")
    odd, known = plan_run(config, run, RTX_3090), plan_run(as_llama, run, RTX_3090)
    assert odd.conservative and not known.conservative
    assert odd.total_bytes > known.total_bytes
    assert odd.component("margin") > 0
    assert any("brand_new_lm" in note for note in odd.notes)


def test_gpt2_style_keys_and_multimodal_text_config_are_read():
    gpt2 = model_shape({"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12})
    assert (gpt2.hidden_size, gpt2.num_layers, gpt2.intermediate_size, gpt2.known) == (768, 12, 3072, False)
    gemma3 = model_shape({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "hidden_size": 2560,
                          "num_hidden_layers": 34, "vocab_size": 262208, "intermediate_size": 10240,
                          "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256},
                          "vision_config": {"hidden_size": 1152}})
    assert gemma3.hidden_size == 2560 and gemma3.head_dim == 256 and not gemma3.known
    assert any("vision" in n for n in gemma3.notes)


def test_a_config_without_sizes_is_a_readable_error():
    with pytest.raises(ModelError, match="hidden_size"):
        model_shape({"model_type": "bert_like", "vocab_size": 100}, "some/model")


def test_plan_to_dict_is_json_and_components_add_up():
    plan = plan_run(SMOLLM2_135M, _run("train.device=cpu"), DeviceFacts("cpu", total_memory=GIB,
                                                                           free_memory=GIB))
    data = json.loads(json.dumps(plan.to_dict()))
    assert sum(c["bytes"] for c in data["components"]) == data["total_bytes"]
    assert data["verdict"] in ("fits", "tight", "does not fit")
    assert data["device_budget_bytes"] == GIB


# --- config.json sources ---------------------------------------------------------------------------------------


def test_config_from_a_local_folder_and_the_demo(tmp_path, demo_model_dir):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    assert load_model_config(str(tmp_path))["hidden_size"] == 576
    demo = load_model_config("demo")
    assert demo == json.loads((demo_model_dir / "config.json").read_text())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model_config(str(empty))
    with pytest.raises(ModelError, match="not a folder"):
        load_model_config(str(tmp_path / "nowhere" / "model"))


def test_config_from_the_hf_cache_without_network(tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(SMOLLM2_135M))
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    assert load_model_config("someone/tiny")["vocab_size"] == 49152
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        load_model_config("someone/absent", offline=True)


def test_a_model_downloaded_only_at_a_pinned_commit_is_planned_like_training_finds_it(tmp_path, monkeypatch):
    # No refs/main: `models download --revision <commit>` leaves only the snapshot. Training finds it (the newest
    # snapshot); the plan and the app's in-process estimate must find the same config.json.
    import huggingface_hub

    from ft_desk.trainer.planning import local_model_config

    cache = tmp_path / "hub"
    snap = cache / "models--someone--pinned" / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(SMOLLM2_135M))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert load_model_config("someone/pinned", offline=True)["vocab_size"] == 49152
    assert local_model_config("someone/pinned")["vocab_size"] == 49152
    assert load_model_config("someone/pinned", revision="b" * 40, offline=True)["vocab_size"] == 49152
    assert local_model_config("someone/pinned", revision="c" * 40) is None
    assert local_model_config("../not an id") is None


def test_an_unreachable_hub_is_not_reported_as_a_model_without_config(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    def unreachable(*args, **kwargs):  # what huggingface_hub raises when the connection fails
        raise LocalEntryNotFoundError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(ModelError, match="could not reach the Hugging Face Hub") as err:
        load_model_config("someone/uncached", offline=False)
    assert "ft-desk models download someone/uncached" in err.value.hint


def test_online_fetches_config_json_alone(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    fetched = tmp_path / "config.json"
    fetched.write_text(json.dumps(LLAMA2_7B))
    calls = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        return str(fetched)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert load_model_config("meta-llama/Llama-2-7b-hf", revision="main", offline=False)["hidden_size"] == 4096
    assert calls == [("meta-llama/Llama-2-7b-hf", "config.json", "main")]


def test_full_fine_tuning_counts_16_bytes_per_parameter_and_the_optimizer_step():
    run = _run("train.method=full", "train.device=cuda", "train.micro_batch_size=1", "data.max_length=256",
               "train.gradient_checkpointing=true")
    plan = plan_run(SMOLLM2_135M, run, RTX_3090)
    n = model_shape(SMOLLM2_135M).params
    assert plan.component("weights") + plan.component("gradients") == 16 * n
    assert plan.component("bfloat16 weight copies (autocast)") == 2 * n
    # With few activations, AdamW's multi-tensor step (one fp32 temporary per parameter) sets the peak.
    assert plan.component("optimizer step") > 0
    roomier = plan_run(SMOLLM2_135M, _run("train.method=full", "train.device=cuda", "train.micro_batch_size=8",
                                             "data.max_length=1024"), RTX_3090)
    assert roomier.component("optimizer step") == 0


def test_naming_lm_head_adds_its_adapter():
    shape = model_shape(SMOLLM2_135M)
    layers = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert planner.lora_params(shape, 16, layers) == planner.lora_params(shape, 16, ("all-linear",))
    assert planner.lora_params(shape, 16, (*layers, "lm_head")) - planner.lora_params(shape, 16, layers) == \
        16 * (576 + 49152)


def test_a_capped_cpu_allocator_keeps_only_its_small_blocks_in_the_plan():
    cpu = DeviceFacts("cpu", total_memory=64 * GIB, free_memory=64 * GIB)
    run = _run("train.device=cpu", "train.micro_batch_size=1", "train.row_length=192")
    label = "CPU allocator retention"
    capped = plan_run(SMOLLM2_135M, run, cpu, cpu_allocator_capped=True)
    growing = plan_run(SMOLLM2_135M, run, cpu, cpu_allocator_capped=False)
    # Blocks of 1 MiB and more are mmapped and handed back once the threshold is pinned; smaller ones still stay.
    assert 0 < capped.component(label) < growing.component(label)
    assert growing.total_bytes - capped.total_bytes == growing.component(label) - capped.component(label)
    on_gpu = plan_run(SMOLLM2_135M, _run("train.device=cuda"), RTX_3090)
    assert on_gpu.component(label) == 0


def test_cpu_samples_plan_the_dense_copy_generation_makes_where_ram_allows():
    label = "samples: dense copy"
    run = _run("train.device=cpu", "train.micro_batch_size=1", "train.row_length=192")
    roomy = plan_run(SMOLLM2_135M, run, DeviceFacts("cpu", total_memory=64 * GIB, free_memory=64 * GIB))
    # After training: the resident weights, LoRA + AdamW, what glibc kept, the dense fp32 copy of the 4-bit
    # linears (30 layers of SmolLM2: 106.2M weights) and the key/value cache of one prompt (they are answered one
    # at a time) of up to a row plus eval.max_new_tokens, above the training peak.
    dense = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) * 4
    kv = (192 + 64) * 30 * 2 * 192 * 4
    resident = sum(roomy.component(c) for c in ("4-bit weights", "embeddings", "LoRA r=", "CPU allocator"))
    training = resident + sum(roomy.component(c) for c in ("activations", "loss:"))
    assert roomy.component(label) == resident + dense + kv - training > 0
    # inference_weights skips the copy where it would take over half the RAM left to the run: so does the plan.
    tight = plan_run(SMOLLM2_135M, run, DeviceFacts("cpu", total_memory=2 * GIB, free_memory=int(1.2 * GIB)))
    assert tight.component(label) == 0
    assert roomy.total_bytes - tight.total_bytes == roomy.component(label)
    for no_samples in ("eval.sample_prompts=0", "data.val_fraction=0"):  # the prompts are validation rows
        plan = plan_run(SMOLLM2_135M, _run("train.device=cpu", "train.row_length=192", no_samples),
                        DeviceFacts("cpu", total_memory=64 * GIB, free_memory=64 * GIB))
        assert plan.component(label) == 0, no_samples
    assert plan_run(SMOLLM2_135M, _run("train.device=cuda"), RTX_3090).component(label) == 0
