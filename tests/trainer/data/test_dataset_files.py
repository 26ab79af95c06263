"""Hugging Face datasets on disk, written here with pyarrow in the layouts `datasets` uses (save_to_disk folders,
DatasetDict folders, the datasets cache's Arrow files, a Hub cache snapshot's Parquet shards), and gzipped text
files: every one reads, and a bad row is named by its file and line or row number."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ft_desk.trainer.data.formats import load_examples, resolve_data_path
from ft_desk.trainer.errors import DataError


def qa_table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"question": [f"q{i}" for i in range(start, start + n)],
                     "answer": [f"a{i}" if i != 3 else None for i in range(start, start + n)]})


def write_stream(path: Path, table: pa.Table) -> Path:
    """An Arrow IPC stream file, the form datasets writes (data-00000-of-00001.arrow, NAME-train.arrow)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def save_to_disk(folder: Path, tables: list[pa.Table]) -> Path:
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(tables):05d}.arrow" for i in range(len(tables))]
    for name, table in zip(names, tables):
        write_stream(folder / name, table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_split": None}), encoding="utf-8")
    (folder / "dataset_info.json").write_text("{}", encoding="utf-8")
    return folder


def test_a_save_to_disk_folder_reads_every_shard_and_names_the_bad_row(tmp_path):
    folder = save_to_disk(tmp_path / "ds", [qa_table(3), qa_table(3, start=3)])
    path = resolve_data_path(str(folder))
    examples, fmt, counts = load_examples(path, skip_bad_rows=True)
    assert fmt == "prompt_completion" and len(examples) == 5 and counts["skipped_rows"] == 1
    assert examples[0].where == f"{folder}/data-00000-of-00002.arrow:#0"
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(err.value) == (f"{folder}/data-00001-of-00002.arrow:#0: the row has an empty (null) 'answer' "
                              "column, which fills the completion role")


def test_a_dataset_dict_folder_gives_train_and_validation_their_splits(tmp_path):
    folder = tmp_path / "dd"
    save_to_disk(folder / "train", [qa_table(3)])
    save_to_disk(folder / "test", [pa.table({"question": ["tq"], "answer": ["ta"]})])
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}), encoding="utf-8")
    assert resolve_data_path(str(folder)) == folder / "train"
    valid = resolve_data_path(str(folder), split="validation")
    assert valid == folder / "test"
    assert [e.messages[0].content for e in load_examples(valid)[0]] == ["tq"]


def test_the_datasets_cache_arrow_file_and_its_folder_read(tmp_path):
    cache = tmp_path / "datasets" / "squad_like" / "default" / "0.0.0" / "abc123"
    arrow = write_stream(cache / "squad_like-train.arrow", qa_table(3))
    write_stream(cache / "squad_like-validation.arrow", qa_table(1))
    write_stream(cache / "cache-0f1e.arrow", qa_table(9))  # a .map() result, not the data
    examples, _, _ = load_examples(arrow)
    assert [e.where for e in examples] == [f"{arrow}:#{i}" for i in range(3)]
    assert len(load_examples(resolve_data_path(str(tmp_path / "datasets" / "squad_like")))[0]) == 3


def test_a_hub_cache_snapshot_of_parquet_shards_reads_its_train_files(tmp_path):
    repo = tmp_path / "datasets--someone--qa"
    data = repo / "snapshots" / "0123abcd" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.table({"instruction": ["i0", "i1"], "output": ["o0", "o1"]}),
                   data / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"instruction": ["t"], "output": ["t"]}), data / "test-00000-of-00001.parquet")
    examples, fmt, _ = load_examples(resolve_data_path(str(repo)))
    assert fmt == "alpaca" and len(examples) == 2
    assert examples[1].where == f"{data}/train-00000-of-00001.parquet:#1"


def test_a_folder_without_data_is_one_readable_error(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(DataError, match="is a folder with no data in it"):
        resolve_data_path(str(tmp_path / "notes"))


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.json.gz", "d.csv.gz"])
def test_gzipped_files_read_with_their_line_numbers(tmp_path, name):
    if name.startswith("d.csv"):
        text = "question,answer\nq1,a1\n\nq2\n"
        bad_line = 4
    elif name.startswith("d.jsonl"):
        text = '{"question": "q1", "answer": "a1"}\n\n{"question": "q2"}\n'
        bad_line = 3
    else:
        text = json.dumps([{"question": "q1", "answer": "a1"}, {"question": "q2"}])
        bad_line = None
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()))
    examples, _, counts = load_examples(path, skip_bad_rows=True)
    assert len(examples) == 1 and counts["skipped_rows"] == 1
    with pytest.raises(DataError) as err:
        load_examples(path)
    where = f"{path}:{bad_line}" if bad_line else f"{path}:#1"
    assert str(err.value).startswith(where + ":")


def test_a_damaged_gzip_file_is_one_readable_error(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="is not a readable gzip file"):
        load_examples(path)
