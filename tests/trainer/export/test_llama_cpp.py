"""llama-cpp-python, optional: q4_k_m made by llama.cpp's own quantizer, and llama.cpp itself running the export.

CI does not install llama-cpp-python, so those tests skip there; the refusal without it runs everywhere.
"""

from __future__ import annotations

import json
import sys

import pytest

from ft_desk.trainer.cli.main import main


@pytest.fixture
def no_llama_cpp(monkeypatch):
    """As if llama-cpp-python were not installed: `import llama_cpp` raises ImportError."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)


def test_q4_k_m_without_llama_cpp_is_refused_with_the_install_command(no_llama_cpp, qlora_run, out_dir, capsys):
    from ft_desk.trainer.export.llamacpp import capabilities

    assert capabilities() == {"gguf_types": ["f16", "bf16", "q8_0", "q5_0", "q4_0"], "llama_cpp": None}
    code = main(["export", str(qlora_run.run_dir), "--format", "gguf", "--gguf-type", "q4_k_m", "--out",
                 str(out_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "pip install llama-cpp-python" in err and "compiles llama.cpp" in err
    assert not out_dir.exists()


def test_ollama_q4_k_m_without_llama_cpp_is_refused_in_json_mode_too(no_llama_cpp, qlora_run, out_dir, capsys):
    code = main(["export", str(qlora_run.run_dir), "--format", "ollama", "--gguf-type", "q4_k_m", "--out",
                 str(out_dir), "--json"])
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == 2 and result["type"] == "export_finished" and result["status"] == "failed"
    assert "pip install llama-cpp-python" in result["error"]


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A QLoRA run on a model whose rows are 256 wide or more, so Q4_K (256-value blocks) applies."""
    from .runs import build_model, make_run

    model = build_model(tmp_path_factory.mktemp("wide"), hidden_size=256, intermediate_size=512)
    return make_run(tmp_path_factory.mktemp("wide-runs"), model, "qlora")


def test_q4_k_m_is_quantized_by_llama_cpp_and_verified_in_transformers_and_llama_cpp(wide_run, out_dir):
    """Measured on this model: KL 1.3e-3 against the merged model, in both loaders (q4_0 gives 2.2e-3)."""
    pytest.importorskip("llama_cpp")
    import gguf

    from ft_desk.trainer.cli.export import report_lines
    from ft_desk.trainer.events import ListSink
    from ft_desk.trainer.export.pipeline import ExportRequest, export_run

    event = export_run(ExportRequest(run_dir=wide_run.run_dir, format="gguf", gguf_type="q4_k_m", out=out_dir),
                       ListSink())
    comps = event["fidelity"]["comparisons"]
    assert event["passed"], json.dumps(comps, indent=1)[:3000]
    assert comps["gguf_vs_merged"]["mean_kl"] < 1e-2 and comps["llama_cpp"]["mean_kl"] < 1e-2
    checks = {c["name"]: c["ok"] for c in comps["llama_cpp"]["checks"]}
    assert checks["tokenizer"] and checks["stop_tokens"]  # llama.cpp's own end-of-generation ids include it

    from ft_desk.trainer.export.llamacpp import capabilities

    assert "q4_k_m" in capabilities()["gguf_types"]
    gguf_file = event["facts"]["file"]
    assert gguf_file.endswith("-q4_k_m.gguf") and event["facts"]["quantized_by"].startswith("llama.cpp")
    assert [f for f in event["files"] if f.endswith(".gguf")] == [gguf_file]  # the F16 intermediate is gone
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out_dir / gguf_file).tensors}
    assert stored["blk.0.attn_q.weight"] == "Q4_K" and stored["output.weight"] == "Q6_K"
    assert stored["output_norm.weight"] == "F32"
    counts = event["facts"]["tensor_types"]
    assert counts == {"q4_k": 13, "q6_k": 3, "f32": 5}, counts
    report = "\n".join(report_lines(event))
    assert "tensors stored as 13 q4_k, 5 f32, 3 q6_k, quantized by llama.cpp" in report
    assert "GGUF run by llama.cpp vs trained: PASS" in report


def test_narrow_rows_fall_back_and_the_report_says_so(tmp_path, llama_dir):
    """Rows of 64 values are too short for Q4_K's 256-value blocks: llama.cpp picks other types, and says which."""
    pytest.importorskip("llama_cpp")
    from ft_desk.trainer.export.gguf_writer import export_gguf

    out = tmp_path / "gguf"
    out.mkdir()
    facts = export_gguf(llama_dir, out, "q4_k_m", name="narrow")
    assert "q4_k" not in facts["tensor_types"]
    assert any("not a multiple of 256" in n for n in facts["notes"]), facts
    assert sorted(p.name for p in out.iterdir()) == ["narrow-q4_k_m.gguf"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".gguf-work-")]
