"""Following a growing events.jsonl: partial lines wait for their newline, torn lines are recovered."""

import json

from ft_desk.tui.tail import EventTail


def line(**fields) -> str:
    return json.dumps({"v": 1, **fields}) + "\n"


def test_reads_only_new_events_and_waits_for_a_complete_line(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read_new() == []  # no file yet
    path.write_text(line(type="run_started", run_dir="x") + '{"v": 1, "type": "st', encoding="utf-8")
    assert [e["type"] for e in tail.read_new()] == ["run_started"]
    with open(path, "a", encoding="utf-8") as f:
        f.write('ep", "step": 1}\n' + line(type="step", step=2))
    assert [e.get("step") for e in tail.read_new()] == [1, 2]
    assert tail.read_new() == []


def test_a_line_torn_by_a_killed_writer_costs_only_that_event(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(line(type="step", step=1) + '{"v": 1, "type": "step", "st', encoding="utf-8")
    tail = EventTail(path)
    assert [e["step"] for e in tail.read_new()] == [1]
    # The resumed trainer appends after the fragment.
    with open(path, "a", encoding="utf-8") as f:
        f.write(line(type="run_started", resumed_from_step=1) + line(type="step", step=2))
    assert [e["type"] for e in tail.read_new()] == ["run_started", "step"]


def test_a_replaced_file_is_read_again_from_the_top(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(line(type="step", step=1) + line(type="step", step=2), encoding="utf-8")
    tail = EventTail(path)
    assert len(tail.read_new()) == 2
    path.unlink()
    path.write_text(line(type="step", step=7), encoding="utf-8")
    assert [e["step"] for e in tail.read_new()] == [7]
