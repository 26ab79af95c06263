"""The optional semantic-similarity metric: skipped with one note when no model is here, used when one is."""

from __future__ import annotations

import pytest

from ft_desk.trainer.evaluate import embed as eval_embed


def test_no_embedding_model_means_a_one_line_skip_note(no_embedding_model):
    folder, note = eval_embed.find_embedding_model()
    assert folder is None
    assert note == eval_embed.SKIP_NOTE and "\n" not in note and note.startswith("semantic similarity skipped")


def test_a_configured_folder_that_is_not_a_model_is_named_in_the_note(no_embedding_model, monkeypatch, tmp_path):
    monkeypatch.setenv(eval_embed.ENV_VAR, str(tmp_path / "nothing-here"))
    folder, note = eval_embed.find_embedding_model()
    assert folder is None and "nothing-here" in note and "not a model folder" in note


def test_a_local_model_gives_cosine_similarities(no_embedding_model, monkeypatch, tiny_encoder):
    monkeypatch.setenv(eval_embed.ENV_VAR, str(tiny_encoder))
    folder, where = eval_embed.find_embedding_model()
    assert folder == tiny_encoder and eval_embed.ENV_VAR in where
    sims = eval_embed.similarities(folder, ["the sky is blue", "bees make honey", ""],
                                   ["the sky is blue", "winter is cold", "something"])
    assert len(sims) == 3
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= sims[1] < 0.9999
    assert sims[2] == pytest.approx(0.0, abs=1e-6)  # an empty answer embeds to nothing: similarity 0
