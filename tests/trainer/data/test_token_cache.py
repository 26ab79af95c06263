"""Tokenized data is reused by a second run on the same data, and never when anything that changes tokens changed."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from ft_desk.trainer.config import DataConfig
from ft_desk.trainer.data import token_cache
from ft_desk.trainer.demo import demo_data_path


@pytest.fixture()
def tokenizer(tiny_model_dir):
    from ft_desk.trainer.config import ModelConfig
    from ft_desk.trainer.training.model import load_tokenizer

    return load_tokenizer(tiny_model_dir, ModelConfig(name=str(tiny_model_dir)))


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    shutil.copy(demo_data_path(), path)
    return path


def _fail(*_args, **_kwargs):
    raise AssertionError("prepared again instead of read from the cache")


def test_a_second_run_on_the_same_data_reads_the_cached_tokens(tokenizer, data_file, tmp_path, monkeypatch):
    cfg = DataConfig(train_file=str(data_file), max_length=128)
    first = token_cache.prepare_data_cached(cfg, tokenizer, folder=tmp_path / "cache")
    assert not first.cached and first.data.train
    monkeypatch.setattr(token_cache, "prepare_data", _fail)
    moved = tmp_path / "renamed.jsonl"  # the same bytes under another name still hit; the stats name the new file
    shutil.copy(data_file, moved)
    second = token_cache.prepare_data_cached(dataclasses.replace(cfg, train_file=str(moved)), tokenizer,
                                             folder=tmp_path / "cache")
    assert second.cached
    assert second.data.train == first.data.train and second.data.val == first.data.val
    assert second.data.val_examples == first.data.val_examples and second.data.format == first.data.format
    assert second.data.stats == {**first.data.stats, "train_file": str(moved)}


def test_changed_data_settings_or_tokenizer_prepare_again(tokenizer, data_file, tmp_path):
    folder = tmp_path / "cache"
    cfg = DataConfig(train_file=str(data_file), max_length=128)
    base = token_cache.prepare_data_cached(cfg, tokenizer, folder=folder).data
    assert token_cache.prepare_data_cached(cfg, tokenizer, folder=folder).cached

    shorter = token_cache.prepare_data_cached(dataclasses.replace(cfg, max_length=32), tokenizer, folder=folder)
    assert not shorter.cached and max(len(t.input_ids) for t in shorter.data.train) <= 32
    everything = token_cache.prepare_data_cached(dataclasses.replace(cfg, train_on="all"), tokenizer, folder=folder)
    assert not everything.cached

    with data_file.open("a", encoding="utf-8") as f:  # one more row: other data
        f.write('{"messages": [{"role": "user", "content": "one more"}, '
                '{"role": "assistant", "content": "a new reply"}]}\n')
    grown = token_cache.prepare_data_cached(cfg, tokenizer, folder=folder)
    assert not grown.cached and len(grown.data.train) + len(grown.data.val) == len(base.train) + len(base.val) + 1

    tokenizer.add_tokens(["<new_token_for_the_test>"])  # another vocabulary: other ids
    assert not token_cache.prepare_data_cached(cfg, tokenizer, folder=folder).cached


def test_a_broken_cache_entry_is_prepared_again(tokenizer, data_file, tmp_path):
    folder = tmp_path / "cache"
    cfg = DataConfig(train_file=str(data_file), max_length=128)
    first = token_cache.prepare_data_cached(cfg, tokenizer, folder=folder)
    (entry,) = folder.glob("*.json")
    entry.write_text('{"train": [[1, 2', encoding="utf-8")  # cut short, as by a full disk
    again = token_cache.prepare_data_cached(cfg, tokenizer, folder=folder)
    assert not again.cached and again.data.train == first.data.train
    assert token_cache.prepare_data_cached(cfg, tokenizer, folder=folder).cached  # written anew


def test_the_cache_keeps_the_newest_entries(tokenizer, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache, "KEEP_ENTRIES", 2)
    folder = tmp_path / "cache"
    for length in (32, 48, 64):
        token_cache.prepare_data_cached(DataConfig(train_file=str(data_file), max_length=length), tokenizer,
                                        folder=folder)
    assert len(list(folder.glob("*.json"))) == 2
    assert token_cache.prepare_data_cached(DataConfig(train_file=str(data_file), max_length=64), tokenizer,
                                           folder=folder).cached
