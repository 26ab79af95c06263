"""How many CPU threads torch uses for a run, an evaluation or a chat.

`train.threads = 0` (the default) means: the cores other work leaves free, measured now and again while a run
trains. torch's own default is every core, and with more OpenMP threads than free cores every op waits at a
barrier for a thread the scheduler has parked: on a 2-core box with one other busy process, the demo trained at
0.30 steps/s with 2 threads and at 0.79 steps/s with 1 (bench/threads_under_load.py); on the same box, quiet, the
real SmolLM2-135M trained at 186 tokens/s with 2 threads and 117 with 1. So the count follows the other load.

Other load is what the CPUs did besides this process, over a short window: system-wide busy CPU time minus this
process's own. (The load average is no measure of it: it counts this process's own threads, and it still holds a
run that ended a minute ago.) Free cores = physical cores this process may use (hyper-threads add nothing to
matmuls) minus the other load, rounded, at least 1. A positive `train.threads` is used as given.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

START_SAMPLE_S = 0.3
"""How long the first look at the other load watches the CPUs."""
RECHECK_EVERY_S = 15.0
"""How often a training run looks again (over the whole time since its last look)."""


def usable_cores() -> int:
    """Physical cores this process may run on."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = psutil.cpu_count(logical=False) or usable
    return max(1, min(physical, usable))


def free_cores(cores: int, others_busy: float) -> int:
    """Cores left to this process when other work keeps `others_busy` cores busy: at least 1."""
    return max(1, min(cores, round(cores - max(0.0, others_busy))))


@dataclass(frozen=True)
class CpuReading:
    at: float  # monotonic seconds
    system_busy: float  # CPU-seconds every CPU spent busy (not idle, not waiting on I/O), since boot
    own: float  # CPU-seconds this process spent, since it started


def read_cpu() -> CpuReading:
    import psutil

    system = psutil.cpu_times()
    idle = system.idle + getattr(system, "iowait", 0.0)
    own = psutil.Process().cpu_times()
    return CpuReading(time.monotonic(), sum(system) - idle, own.user + own.system)


def others_busy(before: CpuReading, after: CpuReading) -> float:
    """Cores other processes kept busy on average between two readings."""
    wall = after.at - before.at
    if wall <= 0:
        return 0.0
    return max(0.0, ((after.system_busy - before.system_busy) - (after.own - before.own)) / wall)


def measure_free_cores(sample_s: float = START_SAMPLE_S, read: Callable[[], CpuReading] = read_cpu,
                       sleep: Callable[[float], None] = time.sleep) -> int:
    """The cores free now, from watching the CPUs for `sample_s` seconds."""
    before = read()
    sleep(sample_s)
    return free_cores(usable_cores(), others_busy(before, read()))


def choose_threads(configured: int) -> int:
    """The thread count to use for `train.threads = configured` (0: the free cores, see the module docstring)."""
    if configured < 0:
        raise ValueError(f"train.threads must be 0 (auto) or a positive int, got {configured!r}")
    return configured or measure_free_cores()


def apply_threads(configured: int) -> int:
    """Set torch's CPU thread count for `train.threads = configured`; returns the count set."""
    import torch  # heavy import: callers are about to run a model

    threads = choose_threads(configured)
    torch.set_num_threads(threads)
    return threads


class ThreadFollower:
    """Keeps an auto thread count (`train.threads = 0`) at the free cores while a run trains: called after every
    optimizer step, it looks at the other load since its last look once RECHECK_EVERY_S have passed and changes
    torch's thread count when the free cores changed. Does nothing for a configured count."""

    def __init__(self, configured: int, threads: int, read: Callable[[], CpuReading] = read_cpu,
                 set_threads: Callable[[int], None] | None = None, every_s: float = RECHECK_EVERY_S,
                 cores: int | None = None) -> None:
        self.auto = configured == 0
        self.threads = threads
        self.read, self.every_s = read, every_s
        self.cores = cores if cores is not None else usable_cores()
        self._set = set_threads
        self.last = read() if self.auto else None

    def __call__(self, *_state) -> int | None:
        """The new thread count when it changed now, else None."""
        if not self.auto:
            return None
        now = self.read()
        if now.at - self.last.at < self.every_s:
            return None
        busy = others_busy(self.last, now)
        self.last = now
        wanted = free_cores(self.cores, busy)
        if wanted == self.threads:
            return None
        log.info("torch threads %d -> %d: other work kept %.1f of %d cores busy", self.threads, wanted, busy,
                 self.cores)
        self.threads = wanted
        if self._set is not None:
            self._set(wanted)
        else:
            import torch  # heavy import, loaded by the run already

            torch.set_num_threads(wanted)
        return wanted
