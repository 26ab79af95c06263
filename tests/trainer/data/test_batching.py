"""Packing: no attention across packed samples, deterministic schedules, token counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ft_desk.trainer.data.batching import IGNORE, MicroBatch, collate, schedule


def _examples(lengths, seed=0, masked_prefix=0):
    import random

    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(10, 1000) for _ in range(n)]
        labels = [IGNORE] * masked_prefix + ids[masked_prefix:]
        out.append(SimpleNamespace(input_ids=ids, labels=labels))
    return out


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    return model


def test_packed_rows_give_exactly_the_loss_of_separate_examples(tiny_model):
    import torch

    from ft_desk.trainer.training.loss import causal_lm_loss

    examples = _examples([9, 17, 5, 12], masked_prefix=2)
    with torch.no_grad():
        separate = sum(
            causal_lm_loss(tiny_model, collate(examples, MicroBatch(((i,),), 0, 0), 0, "cpu", True), 7)
            for i in range(4)
        )
        packed = causal_lm_loss(tiny_model, collate(examples, MicroBatch(((0, 1), (2, 3)), 0, 0), 0, "cpu", True), 7)
        padded = causal_lm_loss(
            tiny_model, collate(examples, MicroBatch(((0,), (1,), (2,), (3,)), 0, 0), 0, "cpu", False), 7)
    assert packed.item() == pytest.approx(separate.item(), rel=1e-5)
    assert padded.item() == pytest.approx(separate.item(), rel=1e-5)


def test_chunked_loss_matches_transformers_own_loss(tiny_model):
    import torch

    from ft_desk.trainer.training.loss import causal_lm_loss

    examples = _examples([33])
    batch = collate(examples, MicroBatch(((0,),), 0, 0), 0, "cpu", True)
    with torch.no_grad():
        ours = causal_lm_loss(tiny_model, batch, 8) / 32
        ids = torch.tensor([examples[0].input_ids])
        reference = tiny_model(input_ids=ids, labels=ids).loss
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_mask_blocks_attention_between_samples_and_targets_stop_at_boundaries():
    examples = _examples([3, 4])
    batch = collate(examples, MicroBatch(((0, 1),), 0, 0), 0, "cpu", True)
    mask = batch["attention_mask"][0, 0]
    assert mask[4, 2].item() is False  # second sample cannot see the first
    assert mask[4, 3].item() is True and mask[2, 0].item() is True
    assert batch["position_ids"][0, :7].tolist() == [0, 1, 2, 0, 1, 2, 3]
    targets = batch["targets"][0].tolist()
    assert targets[2] == IGNORE  # last token of sample 1 predicts nothing across the boundary
    assert targets[:2] == examples[0].input_ids[1:]


def test_schedule_is_deterministic_and_packs_within_max_length():
    examples = _examples([30, 50, 20, 70, 10, 40, 60, 25] * 5)
    a = schedule(examples, max_length=128, micro_batch_size=2, packing=True, seed=3, epochs=2)
    b = schedule(examples, max_length=128, micro_batch_size=2, packing=True, seed=3, epochs=2)
    c = schedule(examples, max_length=128, micro_batch_size=2, packing=True, seed=4, epochs=2)
    assert a == b and a != c
    for mb in a:
        for row in mb.rows:
            assert sum(len(examples[i].input_ids) for i in row) <= 128
    first_epoch = [i for mb in a[: len(a) // 2] for row in mb.rows for i in row]
    assert sorted(first_epoch) == list(range(len(examples)))
    assert sum(mb.tokens for mb in a) == 2 * sum(len(e.input_ids) for e in examples)


def test_fractional_epochs_take_a_prefix_of_the_last_epoch():
    examples = _examples([10] * 40)
    one = schedule(examples, max_length=16, micro_batch_size=4, packing=False, seed=0, epochs=1)
    half = schedule(examples, max_length=16, micro_batch_size=4, packing=False, seed=0, epochs=1.5)
    assert len(one) == 10 and len(half) == 15
