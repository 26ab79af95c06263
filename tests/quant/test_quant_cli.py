"""`ft-desk plan` and `ft-desk doctor` through the real CLI entry point, human and --json output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ft_desk.trainer.cli.main import main


def _json_out(capsys, argv):
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out)


def test_plan_demo_prints_the_breakdown_and_verdict(capsys, demo_model_dir):
    assert main(["plan", "demo"]) == 0
    out = capsys.readouterr().out
    assert "Memory plan for demo (llama" in out
    assert "4-bit weights (incl. absmax, double quant)" in out
    assert "peak total" in out
    assert "FITS" in out  # the demo is built to fit any machine that runs the tests


def test_plan_demo_json_adds_up_and_matches_the_train_config(capsys, demo_model_dir):
    data = _json_out(capsys, ["plan", "demo", "--json"])
    assert sum(c["bytes"] for c in data["components"]) == data["total_bytes"]
    assert data["verdict"] == "fits" and data["model"] == "demo"
    # Same resolution as `ft-desk train` (preset demo): micro-batch 8 of 256 tokens.
    assert data["settings"]["micro_batch_size"] == 8 and data["settings"]["max_length"] == 256


def test_plan_with_a_small_memory_budget_suggests_changes(capsys, demo_model_dir):
    data = _json_out(capsys, ["plan", "demo", "--json", "--memory", "560MB", "--set", "data.max_length=1024"])
    assert data["verdict"] in ("tight", "does not fit")
    assert data["suggestions"]
    assert all(s["total_bytes"] < data["total_bytes"] for s in data["suggestions"])
    assert main(["plan", "demo", "--memory", "560MB", "--set", "data.max_length=1024"]) == 0
    out = capsys.readouterr().out
    assert "Changes that lower the peak:" in out and "--set " in out


def test_plan_for_a_device_this_machine_lacks(capsys, demo_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = _json_out(capsys, ["plan", "demo", "--json", "--device", "cuda"])
    assert data["verdict"] == "unknown device" and data["compute_dtype"] == "bfloat16"
    data = _json_out(capsys, ["plan", "demo", "--json", "--device", "cuda", "--memory", "8GiB"])
    assert data["verdict"] == "fits" and data["device_budget_bytes"] == 8 * 1024**3


def test_plan_bad_inputs_are_one_readable_line(capsys, tmp_path):
    assert main(["plan", str(tmp_path / "no" / "such" / "model")]) == 2
    err = capsys.readouterr().err
    assert "not a folder" in err and "Traceback" not in err
    assert main(["plan", "demo", "--memory", "lots"]) == 2
    assert "--memory must be a size" in capsys.readouterr().err


def test_plan_offline_hub_id_not_cached(capsys):
    assert main(["plan", "someone/not-downloaded-model"]) == 2  # conftest sets HF_HUB_OFFLINE=1
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache" in err and "fix:" in err


def test_doctor_human_and_json(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for row in ("OS", "Python", "Packages", "Device", "CPU", "RAM", "CUDA", "bitsandbytes", "Export"):
        assert f"  {row}" in out
    data = _json_out(capsys, ["doctor", "--json"])
    assert {"os", "python", "packages", "device", "facts", "compute_dtype", "cpu", "four_bit", "advice",
            "export"} <= set(data)
    assert {"f16", "q8_0", "q4_0"} <= set(data["export"]["gguf_types"])
    assert ("q4_k_m" in data["export"]["gguf_types"]) == (data["export"]["llama_cpp"] is not None)
    assert data["packages"]["torch"]
    assert isinstance(data["four_bit"]["usable"], bool)


def test_doctor_with_a_model_prices_qlora_and_lora(capsys, demo_model_dir):
    data = _json_out(capsys, ["doctor", "--json", "--model", "demo"])
    costs = data["model_costs"]
    assert costs["qlora"]["total_bytes"] > 0 and costs["lora"]["verdict"] in ("fits", "tight", "does not fit")


def test_help_lists_plan_and_doctor_without_importing_torch():
    code = ("import sys, io, contextlib\n"
            "from ft_desk.trainer.cli.main import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    try: main(['plan', '--help'])\n"
            "    except SystemExit: pass\n"
            "print('torch' in sys.modules, 'MODEL_ID_OR_DIR' in buf.getvalue())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
