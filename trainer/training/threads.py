"""How many CPU threads torch uses for a run, an evaluation or a chat.

`train.threads = 0` (the default) means: the cores that are free when the work starts. torch's own default is
every core, and with more OpenMP threads than free cores every op waits at a barrier for a thread the scheduler
has parked: on a 2-core box with one other busy process, the demo trained at 0.30 steps/s with 2 threads and at
0.79 steps/s with 1 (bench/threads_under_load.py). A laptop always has other load, so the default counts the
cores others leave free: physical cores (hyper-threads add nothing to matmuls) that this process may use, minus
the 1-minute load average, at least 1. A positive `train.threads` is used as given.
"""

from __future__ import annotations

import os


def free_cores(physical: int | None = None, usable: int | None = None, load: float | None = None) -> int:
    """Cores no other work is using now: min(physical, usable by this process) - load average, at least 1."""
    import psutil

    if usable is None:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if physical is None:
        physical = psutil.cpu_count(logical=False) or usable
    if load is None:
        load = psutil.getloadavg()[0]  # Windows: psutil keeps its own running average (0 on the first call)
    cores = max(1, min(physical, usable))
    return max(1, min(cores, round(cores - load)))


def choose_threads(configured: int) -> int:
    """The thread count to use for `train.threads = configured` (0: the free cores, see the module docstring)."""
    if configured < 0:
        raise ValueError(f"train.threads must be 0 (auto) or a positive int, got {configured!r}")
    return configured or free_cores()


def apply_threads(configured: int) -> int:
    """Set torch's CPU thread count for `train.threads = configured`; returns the count set."""
    import torch  # heavy import: callers are about to run a model

    threads = choose_threads(configured)
    torch.set_num_threads(threads)
    return threads
