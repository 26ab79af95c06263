"""`ft-desk data check` counts the tokens training will see: same tokenizer set-up, same rendering, same cut."""

from __future__ import annotations

import dataclasses
import json

from ft_desk.trainer.cli.main import main
from ft_desk.trainer.config import RunConfig
from ft_desk.trainer.data.prepare import prepare_data
from ft_desk.trainer.training.model import load_base


def test_data_check_token_counts_equal_what_training_prepares(tmp_path, tiny_model_dir, capsys):
    # Long replies, short questions: a cut row still has a reply token to learn, so training keeps every row.
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: where is my parcel?"},
                          {"role": "assistant", "content": f"Answer {i}: " + "it ships today. " * (i % 9)}]}
            for i in range(24)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    max_length = 48  # some rows are cut: both sides must cut them the same way

    code = main(["data", "check", str(path), "--model", str(tiny_model_dir), "--max-length", str(max_length),
                 "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["usable_rows"] == 24 and report["truncated"] > 0 and report["no_target"] == 0

    base = RunConfig()
    cfg = dataclasses.replace(
        base, model=dataclasses.replace(base.model, name=str(tiny_model_dir)),
        data=dataclasses.replace(base.data, train_file=str(path), max_length=max_length),
        train=dataclasses.replace(base.train, method="lora"),
    )
    _, tokenizer, _ = load_base(cfg, "cpu")  # the tokenizer exactly as a run loads it
    data = prepare_data(cfg.data, tokenizer)
    examples = data.train + data.val
    assert len(examples) == 24
    assert report["total_tokens"] == sum(len(e.input_ids) for e in examples)
    assert report["trained_tokens"] == sum(sum(1 for x in e.labels[1:] if x != -100) for e in examples)
    assert report["truncated"] == data.stats["truncated"]
