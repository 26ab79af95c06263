"""`ft-desk doctor`: what this machine is and can do - OS, Python, library versions, CUDA/MPS/CPU facts, RAM,
and whether bitsandbytes 4-bit really works here (a tiny layer is quantized and trained). The first thing to
paste into a bug report; `--json` gives the same as one object for the app.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ft_desk.quant.device import probe
from ft_desk.quant.mps_probe import FourBitProbe, describe_probe
from ft_desk.quant.planner import human_bytes
from ft_desk.trainer.export.llamacpp import capabilities
from ft_desk.trainer.planning import load_model_config, plan_run
from ft_desk.trainer.presets import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--model", metavar="MODEL_ID_OR_DIR",
                        help="also say what QLoRA and 16-bit LoRA of this model need on this device")


def _gib(n: int | float | None) -> str:
    return "?" if n is None else human_bytes(n)


def _yes(flag: Any) -> str:
    return "yes" if flag else "no"


def model_costs(model: str, device) -> dict[str, Any]:
    """Peak memory of the default recipe for `model` with QLoRA and with 16-bit LoRA on `device`."""
    config = load_model_config(model)
    out: dict[str, Any] = {"model": model}
    for method in ("qlora", "lora"):
        cfg = load_config(["qlora"], [f"model.name={model}", f"train.method={method}",
                                      f"train.device={device.type}"])
        plan = plan_run(config, cfg, device)
        out[method] = {"total_bytes": plan.total_bytes, "verdict": plan.verdict}
    return out


def run(args: argparse.Namespace) -> int:
    report = probe()
    data = report.to_dict()
    data["export"] = capabilities()
    if args.model:
        costs = model_costs(args.model, report.facts)
        data["model_costs"] = costs
        if not report.four_bit.usable:
            report.advice.append(
                f"16-bit LoRA of {args.model} needs about {_gib(costs['lora']['total_bytes'])} here "
                f"({costs['lora']['verdict']}); QLoRA would have needed {_gib(costs['qlora']['total_bytes'])}."
            )
            data["advice"] = report.advice
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    print(render(data))
    return 0


def render(d: dict[str, Any]) -> str:
    cpu = d["cpu"]
    pk = d["packages"]
    packages = " · ".join(f"{name} {version or 'missing'}" for name, version in pk.items())
    bf16_kind = ("AVX512-BF16" if cpu.get("avx512_bf16") else "AMX" if cpu.get("amx_bf16")
                 else "Arm BF16" if cpu.get("arm_bf16") else "")
    rows = [
        ("OS", d["os"]),
        ("Python", d["python"]),
        ("Packages", packages),
        ("Device", f"{d['device']} (what train.device=auto picks) · compute dtype {d['compute_dtype']}"),
        ("CPU", f"{cpu['name']} · {cpu['arch']} · {cpu['physical_cores']} cores ({cpu['logical_cores']} threads, "
                f"torch uses {cpu['torch_threads']}) · AVX2 {_yes(cpu.get('avx2'))} · "
                f"AVX-512 {_yes(cpu.get('avx512f'))} · bf16 {_yes(cpu.get('bf16'))}"
                + (f" ({bf16_kind})" if bf16_kind else "")),
        ("RAM", f"{_gib(cpu['ram_total'])} total · {_gib(cpu['ram_available'])} available"),
    ]
    if d["cuda_devices"]:
        for gpu in d["cuda_devices"]:
            cc = ".".join(str(x) for x in gpu["compute_capability"])
            rows.append((f"CUDA {gpu['index']}", f"{gpu['name']} · {_gib(gpu['total_memory'])} total · "
                         f"{_gib(gpu['free_memory'])} free · compute capability {cc} · bf16 {_yes(gpu['bf16'])} · "
                         f"CUDA {d['torch_cuda']}"))
    else:
        built = f"torch built with CUDA {d['torch_cuda']}" if d["torch_cuda"] else "torch built without CUDA"
        rows.append(("CUDA", f"not available ({built})"))
    mps = d["mps"]
    if mps and mps.get("available"):
        rows.append(("MPS", f"available · recommended working set {_gib(mps['recommended_max_memory'])} of "
                            f"{_gib(mps['unified_memory'])} unified · bf16 {_yes(mps.get('bf16'))}"))
    elif mps:
        rows.append(("MPS", "built into torch but not available on this machine"))
    fb = d["four_bit"]
    if fb["version"] is None and not fb["usable"]:
        bnb = f"not usable: {fb['reason']}"
    else:
        lib = "native library loaded" if fb["native_library"] else "no native library"
        state = "4-bit works here" if fb["usable"] else f"4-bit does NOT work here: {fb['reason']}"
        bnb = f"{fb['version']} · backend {fb['backend'] or '?'} · {lib} · {state}"
    rows.append(("bitsandbytes", bnb))
    if d.get("four_bit_probe"):
        rows.append(("4-bit probe", f"{d['device']}: {describe_probe(FourBitProbe.from_dict(d['four_bit_probe']))}"))
    export = d.get("export") or {}
    if export:
        llama = (f"llama-cpp-python {export['llama_cpp']} (q4_k_m and a llama.cpp check of every GGUF)"
                 if export.get("llama_cpp") else "llama-cpp-python not installed (optional: q4_k_m needs it)")
        rows.append(("Export", f"GGUF types {', '.join(export.get('gguf_types') or [])} · {llama}"))
    costs = d.get("model_costs")
    if costs:
        rows.append(("Model", f"{costs['model']}: QLoRA ~{_gib(costs['qlora']['total_bytes'])} "
                              f"({costs['qlora']['verdict']}) · 16-bit LoRA ~{_gib(costs['lora']['total_bytes'])} "
                              f"({costs['lora']['verdict']}) (defaults of the qlora preset; ft-desk plan for more)"))
    width = max(len(k) for k, _ in rows) + 2
    lines = ["ft-desk doctor"] + [f"  {k:<{width}}{v}" for k, v in rows]
    if d["advice"]:
        lines.append("")
        lines += [f"- {a}" for a in d["advice"]]
    return "\n".join(lines)
