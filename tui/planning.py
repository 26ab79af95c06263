"""The Recipe screen's live memory estimate, computed in-process so it can follow every keystroke.

The planner (ft_desk.quant.planner) is plain arithmetic and imports no torch; what it needs from outside is the
model's config.json and the device's facts. The facts come once per session from `ft-desk doctor --json` (a child
process: probing the device imports torch), config.json from the local cache or folder. When either is missing
(a model not downloaded yet, a device other than this machine's) the caller falls back to `ft-desk plan --json`,
which fetches config.json alone or answers without a device - the same answer, just slower.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable

from ft_desk.trainer.config import RunConfig


class NeedsChild(Exception):
    """This plan needs `ft-desk plan` (config.json not local, or a device this machine does not have)."""


def local_model_config(name: str, revision: str | None) -> dict[str, Any] | None:
    """config.json of a model that is already on disk (never downloads, never builds the demo model)."""
    if name == "demo":
        from ft_desk.trainer.demo import demo_cache_dir

        path = demo_cache_dir() / "config.json"
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser() / "config.json"
    else:
        import huggingface_hub  # only for Hub ids; reads the local cache

        try:
            found = huggingface_hub.try_to_load_from_cache(name, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 - an invalid id: let `ft-desk plan` say what is wrong
            return None
        if not isinstance(found, str):
            return None
        path = Path(found)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Planner:
    """Caches this machine's device facts (from `doctor`, probed once in the background) and plans in-process."""

    def __init__(self, doctor: Callable[[], dict[str, Any]]) -> None:
        self._doctor = doctor
        self._lock = threading.Lock()
        self._report: dict[str, Any] | None = None
        self._probing: threading.Thread | None = None

    def warm_up(self) -> None:
        """Start probing the device (a child process) unless it is done or under way."""
        with self._lock:
            if self._report is not None or self._probing is not None:
                return
            self._probing = threading.Thread(target=self._probe, name="device-probe", daemon=True)
            self._probing.start()

    def _probe(self) -> None:
        try:
            report = self._doctor()
        except Exception:  # noqa: BLE001 - without facts every plan goes through `ft-desk plan`
            report = {}
        with self._lock:
            self._report = report

    def device(self) -> tuple[str, Any]:
        """(device type, DeviceFacts) of this machine's best device; NeedsChild until the probe has answered."""
        from ft_desk.quant.device import DeviceFacts

        self.warm_up()
        with self._lock:
            report = self._report
        if report is None:
            raise NeedsChild("the device probe has not answered yet")
        facts = dict(report.get("facts") or {})
        if not facts.get("type"):
            raise NeedsChild("the device report has no facts")
        if facts.get("compute_capability") is not None:
            facts["compute_capability"] = tuple(facts["compute_capability"])
        known = {k: facts[k] for k in ("type", "name", "total_memory", "free_memory", "compute_capability", "bf16")
                 if k in facts}
        return str(facts["type"]), DeviceFacts(**known)

    def plan(self, cfg: RunConfig) -> dict[str, Any]:
        import importlib.util

        from ft_desk.quant.planner import plan_memory

        config = local_model_config(cfg.model.name, cfg.model.revision)
        if config is None:
            raise NeedsChild(f"config.json of {cfg.model.name} is not on this machine")
        kind, facts = self.device()
        if cfg.train.device not in ("auto", kind):
            raise NeedsChild(f"train.device is {cfg.train.device} but this machine plans for {kind}")
        four_bit_ok = kind != "mps" and importlib.util.find_spec("bitsandbytes") is not None
        out = plan_memory(config, cfg, facts, four_bit_ok=four_bit_ok).to_dict()
        out.update({"model": cfg.model.name, "device_description": f"this machine's {kind}",
                    "device_name": facts.name})
        return out
