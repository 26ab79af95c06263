"""The Recipe screen's live memory estimate, computed in-process so it can follow every keystroke.

trainer.planning plans a RunConfig with plain arithmetic and no torch; what it needs from outside is the model's
config.json and the device's facts. The facts come once per session from `ft-desk doctor --json` (a child process:
probing the device imports torch), config.json from the local cache or folder. When either is missing (a model not
downloaded yet, a device other than this machine's) the caller falls back to `ft-desk plan --json`, which fetches
config.json alone or answers without a device - the same answer, just slower. This module only holds the probe's
answer and says when the child is needed.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from ft_desk.trainer.config import RunConfig
from ft_desk.trainer.planning import device_from_report, four_bit_likely, local_model_config, plan_run


class NeedsChild(Exception):
    """This plan needs `ft-desk plan` (config.json not local, or a device this machine does not have)."""


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
        self.warm_up()
        with self._lock:
            report = self._report
        if report is None:
            raise NeedsChild("the device probe has not answered yet")
        facts = device_from_report(report)
        if facts is None:
            raise NeedsChild("the device report has no facts")
        return facts.type, facts

    def plan(self, cfg: RunConfig) -> dict[str, Any]:
        config = local_model_config(cfg.model.name, cfg.model.revision)
        if config is None:
            raise NeedsChild(f"config.json of {cfg.model.name} is not on this machine")
        kind, facts = self.device()
        if cfg.train.device not in ("auto", kind):
            raise NeedsChild(f"train.device is {cfg.train.device} but this machine plans for {kind}")
        out = plan_run(config, cfg, facts, four_bit_ok=four_bit_likely(kind)).to_dict()
        out.update({"model": cfg.model.name, "device_description": f"this machine's {kind}",
                    "device_name": facts.name})
        return out
