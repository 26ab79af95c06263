"""`ft-desk plan MODEL`: will this run fit? Peak memory by component, the verdict for this machine's device (or
a size given with --memory), and the changes that make it fit. Reads only config.json (from a folder, the
Hugging Face cache, or fetched alone from the Hub when online): no weights are downloaded.

The run is resolved exactly as `ft-desk train` resolves it (same presets, same --set), so
`ft-desk plan X --preset qlora --set data.max_length=1024` plans `ft-desk train --model X --preset qlora ...`.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from ft_desk.quant.device import DeviceFacts, available_device_types, probe_facts
from ft_desk.quant.planner import human_bytes
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.model_sources import plan_note
from ft_desk.trainer.planning import SAME_RESULT_KEYS, four_bit_likely, load_model_config, plan_run
from ft_desk.trainer.presets import load_config
from ft_desk.trainer.recipe_sizing import uses_auto

SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
              "g": 1024**3, "gb": 1024**3, "gib": 1024**3, "t": 1024**4, "tb": 1024**4, "tib": 1024**4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL_ID_OR_DIR",
                        help="Hub id (owner/name), model folder, .gguf file, Ollama model (name:tag), or demo "
                             "[default: model.name of the presets]")
    parser.add_argument("--preset", action="append", default=None, metavar="NAME",
                        help="preset name or .yaml path; repeat to layer, as for ft-desk train [default: demo]")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set data.max_length=2048")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"],
                        help="plan for this device type instead of train.device")
    parser.add_argument("--memory", metavar="SIZE",
                        help="plan against this much device memory (e.g. 8GB, 16GiB) instead of probing this machine")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    unit = match.group(2).lower() if match else ""
    if not match or unit not in SIZE_UNITS:
        raise UserError(f"--memory must be a size like 8GB or 16GiB, got {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def _device_facts(kind: str, memory: int | None):
    """(DeviceFacts or None, where the facts came from)."""
    here = available_device_types()
    if kind == "auto":
        kind = here[0]
    if kind in here:
        facts = probe_facts(kind)
        if memory is not None:
            facts = DeviceFacts(type=kind, name=facts.name, total_memory=memory, free_memory=memory,
                                compute_capability=facts.compute_capability, bf16=facts.bf16)
            return facts, f"{kind} with {_size(memory)} (--memory)"
        return facts, f"this machine's {kind}"
    if memory is not None:
        # Planning for a device this machine does not have: assume a current one (bf16 on GPUs).
        return DeviceFacts(type=kind, name=kind, total_memory=memory, free_memory=memory,
                           bf16=kind != "cpu"), f"a {kind} device with {_size(memory)} (--memory)"
    return None, f"{kind} (not on this machine; give --memory SIZE for a verdict)"


def _size(n: int) -> str:
    return human_bytes(n)


def build_plan(args: argparse.Namespace) -> dict[str, Any]:
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    cfg = load_config(args.preset, overrides)
    memory = parse_size(args.memory) if args.memory else None
    facts, where = _device_facts(cfg.train.device, memory)
    config = load_model_config(cfg.model.name, cfg.model.revision)
    kind = facts.type if facts else cfg.train.device
    plan = plan_run(config, cfg, facts, four_bit_ok=four_bit_likely(kind))
    out = plan.to_dict()
    out.update({"model": cfg.model.name, "device_description": where,
                "device_name": facts.name if facts else None})
    if uses_auto(cfg):
        out["notes"] = [*out.get("notes", []), "batching is auto: `ft-desk train` sizes micro-batch, accumulation and "
                        "max length from the data (ft-desk data check shows the figures); this plans the longest "
                        "rows auto may use, an upper bound"]
    first = out.get("first_fit")
    if first:  # `train` applies a same-result change on its own; say so next to it
        out["applied_by_train"] = all(o.split("=")[0] in SAME_RESULT_KEYS for o in first["overrides"])
    note = plan_note(cfg.model.name)
    if note:
        out["notes"] = [*out.get("notes", []), note]
    return out


def run(args: argparse.Namespace) -> int:
    plan = build_plan(args)
    if args.json:
        print(json.dumps(plan, indent=1))
        return 0
    print(render(plan))
    return 0


def render(plan: dict[str, Any]) -> str:
    s = plan["settings"]
    params = plan["params"]
    count = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    method = plan["method"]
    adapter = f" r={s['lora_r']} on {','.join(s['target_modules'])}" if method != "full" else ""
    lines = [
        f"Memory plan for {plan['model']} ({plan['model_type']}, {count} parameters)",
        f"  {method}{adapter} · micro-batch {s['micro_batch_size']} x {s['max_length']} tokens · "
        f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'} · {plan['device']} {plan['compute_dtype']}",
        "",
    ]
    width = max(len(c["label"]) for c in plan["components"]) + 2
    for c in plan["components"]:
        lines.append(f"  {c['label']:<{width}}{_size(c['bytes']):>11}")
    lines.append(f"  {'-' * (width + 11)}")
    mark = " (conservative: padded)" if plan["conservative"] else ""
    lines.append(f"  {'peak total' + mark:<{width}}{_size(plan['total_bytes']):>11}")
    lines.append("")
    budget = plan["device_budget_bytes"]
    verdict = plan["verdict"]
    if budget is None:
        lines.append(f"Device: {plan['device_description']}: no verdict.")
    else:
        share = plan["total_bytes"] / budget
        lines.append(f"Device: {plan['device_description']}, {_size(budget)} usable -> {verdict.upper()} "
                     f"({share:.0%} of it)")
    if plan["suggestions"]:
        lines.append("")
        lines.append("Changes that lower the peak:")
        for sug in plan["suggestions"]:
            tag = "" if sug["fits"] is None else ("  fits" if sug["fits"] else "  still too big")
            lines.append(f"  - {sug['description']}: {_size(sug['total_bytes'])}{tag}")
            lines.append(f"      {sug['set_args']}")
        first = plan["first_fit"]
        if first:
            lines.append("")
            lines.append(f"First change that fits: {first['description']} -> {first['set_args']}")
            if plan.get("applied_by_train"):
                lines.append("  (ft-desk train makes this change on its own when the plan does not fit: same result)")
        elif budget is not None and verdict == "does not fit":
            lines.append("")
            lines.append("Nothing here makes it fit this device: choose a smaller model.")
    for note in plan["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
