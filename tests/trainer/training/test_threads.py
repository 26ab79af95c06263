"""The default thread count: the cores other work leaves free, measured at the start and followed while training,
so a busy machine does not stall in OpenMP and a quiet one uses every core."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ft_desk.trainer.training import threads
from ft_desk.trainer.training.threads import CpuReading, ThreadFollower


@pytest.mark.parametrize("cores,others,expected", [
    (2, 0.05, 2),  # a quiet 2-core laptop: both cores
    (2, 0.67, 1),  # one busy process sharing 2 cores with our 2 threads gets ~2/3 of a core: one thread
    (2, 7.0, 1),  # far more load than cores: still one
    (8, 2.0, 6),  # two cores taken
    (8, 0.4, 8),  # a browser idling does not cost a core
])
def test_free_cores_are_the_cores_minus_the_other_load(cores, others, expected):
    assert threads.free_cores(cores, others) == expected


def test_other_load_is_system_busy_time_minus_this_process():
    before = CpuReading(at=100.0, system_busy=50.0, own=10.0)
    # 2 s later: the CPUs were busy for 3.6 CPU-seconds, 2.2 of them this process's own.
    after = CpuReading(at=102.0, system_busy=53.6, own=12.2)
    assert threads.others_busy(before, after) == pytest.approx(0.7)
    assert threads.others_busy(after, after) == 0.0


def test_the_start_count_watches_the_cpus(monkeypatch):
    readings = iter([CpuReading(0.0, 0.0, 0.0), CpuReading(0.3, 0.6, 0.3)])  # others: 1 core
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert threads.measure_free_cores(read=lambda: next(readings), sleep=lambda s: None) == 1


def test_a_configured_count_is_used_as_given_and_zero_means_auto(monkeypatch):
    monkeypatch.setattr(threads, "measure_free_cores", lambda: 3)
    assert threads.choose_threads(0) == 3
    assert threads.choose_threads(5) == 5
    with pytest.raises(ValueError, match="train.threads"):
        threads.choose_threads(-1)


def test_apply_threads_sets_torchs_count(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "measure_free_cores", lambda: 1)
    try:
        assert threads.apply_threads(0) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


class FakeCpus:
    def __init__(self):
        self.now = CpuReading(0.0, 0.0, 0.0)

    def run(self, seconds: float, ours: float, others: float) -> None:
        """Let `seconds` pass with this process using `ours` cores and other work `others`."""
        n = self.now
        self.now = CpuReading(n.at + seconds, n.system_busy + (ours + others) * seconds, n.own + ours * seconds)


def test_the_thread_count_follows_other_load_while_training():
    cpus, applied = FakeCpus(), []
    follow = ThreadFollower(0, 2, read=lambda: cpus.now, set_threads=applied.append, every_s=15.0, cores=2)
    cpus.run(20, ours=2.0, others=0.0)
    assert follow() is None  # quiet: both cores stay
    cpus.run(5, ours=1.4, others=0.6)
    assert follow() is None  # too soon to look again
    cpus.run(15, ours=1.33, others=0.67)  # a busy process appeared and takes its share of the two cores
    assert follow() == 1 and applied == [1]
    cpus.run(20, ours=1.0, others=1.0)
    assert follow() is None  # still busy: one thread stays
    cpus.run(20, ours=1.0, others=0.0)  # it ended
    assert follow() == 2 and applied == [1, 2]


def test_a_configured_thread_count_is_never_changed():
    cpus, applied = FakeCpus(), []
    follow = ThreadFollower(2, 2, read=lambda: cpus.now, set_threads=applied.append, every_s=1.0, cores=2)
    cpus.run(30, ours=1.0, others=1.0)
    assert follow() is None and applied == []


def test_a_real_busy_process_is_seen_as_other_load():
    """psutil's readings, not fakes: a spinning child shows up as other load; this process's own work does not."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        before = threads.read_cpu()
        x = 0
        while threads.read_cpu().at - before.at < 1.0:  # this process busy too, for one second
            x += 1
        busy = threads.others_busy(before, threads.read_cpu())
    finally:
        spinner.kill()
        spinner.wait()
    assert busy > 0.3
