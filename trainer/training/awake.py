"""Keep a Mac awake while it trains: macOS puts an idle Mac to sleep after a few minutes, and a sleeping Mac
stops a run mid-step for as long as nobody touches it.

`keep_awake()` starts `caffeinate -i -w PID` (no idle sleep while process PID lives) on macOS and does nothing
elsewhere; `stop()` ends it with the run. `-w` makes caffeinate exit by itself when the trainer dies, so even a
killed run cannot leave the Mac sleepless. The display may still sleep, and closing a MacBook's lid still sleeps
it (unless it runs on power with an external display): the README's "On a Mac" section says so.
The platform, the program lookup and the process start are injectable so tests need no Mac.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("ft_desk.awake")

CAFFEINATE = "caffeinate"


@dataclass
class Awake:
    """The running caffeinate (or nothing), and the sentence that tells the user about it."""

    process: Any = None
    message: str = ""

    @property
    def active(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """End caffeinate (if it runs); idempotent."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def keep_awake(pid: int | None = None, system: Callable[[], str] = platform.system,
               which: Callable[[str], str | None] = shutil.which,
               spawn: Callable[..., Any] = subprocess.Popen) -> Awake:
    """On macOS, keep the machine from idle sleep while process `pid` (default: this one) lives; elsewhere
    nothing. Never raises: a Mac without caffeinate trains as before, and `message` says so."""
    if system() != "Darwin":
        return Awake()
    pid = os.getpid() if pid is None else pid
    program = which(CAFFEINATE)
    if program is None:
        return Awake(message="caffeinate was not found, so this Mac may go to sleep during training; keep it "
                             "awake in System Settings > Battery (or Energy) while it trains")
    argv = [program, "-i", "-w", str(pid)]
    try:
        process = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as exc:
        log.warning("could not start %s: %s", " ".join(argv), exc)
        return Awake(message=f"could not start caffeinate ({exc}), so this Mac may go to sleep during training")
    log.info("started %s (pid %s)", " ".join(argv), getattr(process, "pid", "?"))
    return Awake(process, "keeping this Mac awake while it trains (caffeinate -i; the display may still sleep, "
                          "closing the lid still sleeps a MacBook)")
