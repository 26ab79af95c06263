"""Adapter reload parity, and a tied-embedding model with an added special token through merged and GGUF."""

from __future__ import annotations

import json

import torch

from ft_desk.trainer.events import ListSink
from ft_desk.trainer.export.pipeline import ExportRequest, export_run

TEXT = "<|im_start|>user\nWhere is order 1182?<|im_end|>\n<|im_start|>assistant\nIt ships today.<|im_end|>\n"


def test_adapter_reloads_with_peft_onto_the_base_with_the_trained_logits(qlora_run, out_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ft_desk.quant.policy import bnb_config, disable_cpu_repack
    from ft_desk.trainer.training.model import load_trained

    # The verified export (fidelity report) is exercised by test_cli; here the reload is checked directly.
    export_run(ExportRequest(run_dir=qlora_run.run_dir, format="adapter", out=out_dir, verify=False), ListSink())
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(qlora_run.model_dir)
    # The export screen promises "adapter + tokenizer": the folder carries the run's tokenizer, loadable on its own.
    shipped = AutoTokenizer.from_pretrained(out_dir)
    assert shipped.get_vocab() == AutoTokenizer.from_pretrained(qlora_run.model_dir).get_vocab()

    trained, _, _ = load_trained(qlora_run.run_dir, device="cpu")
    base = AutoModelForCausalLM.from_pretrained(
        qlora_run.model_dir, dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=bnb_config("nf4", True, "float32", ["lm_head"]))
    disable_cpu_repack(base)
    reloaded = PeftModel.from_pretrained(base, out_dir).eval()
    ids = AutoTokenizer.from_pretrained(qlora_run.model_dir)(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(trained(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)


def test_tied_embeddings_and_added_token_survive_merge_and_gguf(tied_added_run, out_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ft_desk.trainer.export.safetensors_io import read_all

    event = export_run(ExportRequest(run_dir=tied_added_run.run_dir, format="gguf", out=out_dir), ListSink())
    comps = event["fidelity"]["comparisons"]
    assert event["passed"], json.dumps(comps, indent=1)[:2000]
    assert comps["gguf_vs_merged"]["mean_kl"] < 1e-5 and comps["merged_vs_trained"]["mean_kl"] < 1e-4
    assert any("1024 to 1025" in n for n in event["notes"])

    merged_dir = tmp_path / "merged"
    export_run(ExportRequest(run_dir=tied_added_run.run_dir, format="merged", out=merged_dir, verify=False),
               ListSink())
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["vocab_size"] == 1025 and config["tie_word_embeddings"] is True
    weights = read_all(merged_dir / "model.safetensors")
    assert "lm_head.weight" not in weights and weights["model.embed_tokens.weight"].shape[0] == 1025
    adapter = read_all(tied_added_run.run_dir / "adapter" / "adapter_model.safetensors")
    trained_row = adapter["base_model.model.model.embed_tokens.weight"][1024]
    assert torch.equal(weights["model.embed_tokens.weight"][1024], trained_row.to(torch.bfloat16))

    hf_tok = AutoTokenizer.from_pretrained(merged_dir)
    gguf_tok = AutoTokenizer.from_pretrained(out_dir, gguf_file=event["facts"]["file"])
    text = "Call <|tool|> now"
    assert hf_tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert hf_tok.convert_tokens_to_ids("<|tool|>") == 1024 in hf_tok(text)["input_ids"]
    gguf_model = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=event["facts"]["file"],
                                                      dtype=torch.float32)
    assert gguf_model.config.tie_word_embeddings and gguf_model.get_input_embeddings().weight.shape[0] == 1025


def test_full_fine_tune_exports_its_trained_weights(tmp_path, tied_model_dir, out_dir):
    from ft_desk.trainer.export.safetensors_io import read_all

    from .runs import make_run

    run = make_run(tmp_path, tied_model_dir, "full")
    export_run(ExportRequest(run_dir=run.run_dir, format="merged", out=out_dir, verify=False), ListSink())
    trained = read_all(run.run_dir / "model" / "model.safetensors")
    merged = read_all(out_dir / "model.safetensors")
    embed = trained.get("model.embed_tokens.weight", trained.get("lm_head.weight"))
    assert torch.equal(merged["model.embed_tokens.weight"], embed.to(torch.bfloat16))
    for name, value in trained.items():
        if name in merged:
            assert torch.equal(merged[name], value.to(torch.bfloat16)), name
    assert json.loads((out_dir / "config.json").read_text())["tie_word_embeddings"] is True
