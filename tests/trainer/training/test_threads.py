"""The default thread count: the cores other work leaves free, so a busy machine does not stall in OpenMP."""

from __future__ import annotations

import pytest

from ft_desk.trainer.training import threads


@pytest.mark.parametrize("physical,usable,load,expected", [
    (2, 2, 0.1, 2),  # a quiet 2-core laptop: both cores
    (2, 2, 1.2, 1),  # one other busy process: one thread (2.6x the steps/s of two, bench/threads_under_load.py)
    (2, 2, 7.0, 1),  # far more load than cores: still one
    (8, 16, 2.0, 6),  # hyper-threads do not count; two cores are taken
    (8, 2, 0.0, 2),  # a process pinned to 2 CPUs uses 2
])
def test_auto_threads_are_the_free_physical_cores(physical, usable, load, expected):
    assert threads.free_cores(physical=physical, usable=usable, load=load) == expected


def test_a_configured_count_is_used_as_given_and_zero_means_auto(monkeypatch):
    monkeypatch.setattr(threads, "free_cores", lambda: 3)
    assert threads.choose_threads(0) == 3
    assert threads.choose_threads(5) == 5
    with pytest.raises(ValueError, match="train.threads"):
        threads.choose_threads(-1)


def test_apply_threads_sets_torchs_count(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    try:
        assert threads.apply_threads(0) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
