"""The one causal-LM loss: training's summed loss and eval's per-example losses equal a plain cross-entropy over
the full logits of each example alone (chunking, packing and padding change nothing but float rounding)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from ft_desk.trainer.data.batching import IGNORE, MicroBatch, collate
from ft_desk.trainer.training.loss import causal_lm_loss, per_example_loss


def _examples():
    # Different lengths; the first tokens of each are an unlabelled prompt, as in chat training.
    rng = random.Random(3)
    out = []
    for length, prompt in ((9, 3), (17, 5), (12, 0), (6, 2)):
        ids = [rng.randrange(10, 1000) for _ in range(length)]
        out.append(SimpleNamespace(input_ids=ids, labels=[IGNORE] * prompt + ids[prompt:]))
    return out


def _plain_losses(model, examples, softcap=None):
    """(summed cross-entropy, target tokens) per example from the model's own full logits, one example at a time."""
    import torch
    import torch.nn.functional as F

    out = []
    for ex in examples:
        logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0].float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        targets = torch.tensor(ex.labels[1:])
        total = F.cross_entropy(logits[:-1], targets, ignore_index=IGNORE, reduction="sum")
        out.append((float(total), int((targets != IGNORE).sum())))
    return out


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("softcap", [None, 0.2])  # the tiny model's logits reach about 0.6
def test_training_and_per_example_losses_equal_plain_cross_entropy(tiny_model, softcap, monkeypatch):
    import torch

    monkeypatch.setattr(tiny_model.config, "final_logit_softcapping", softcap, raising=False)
    examples = _examples()
    with torch.no_grad():
        plain = _plain_losses(tiny_model, examples, softcap)
    one_per_row = MicroBatch(rows=tuple((i,) for i in range(len(examples))), tokens=0, target_tokens=0)
    packed = MicroBatch(rows=((0, 1), (2, 3)), tokens=0, target_tokens=0)

    with torch.no_grad():
        sums, counts = per_example_loss(tiny_model, collate(examples, one_per_row, 0, "cpu", False), len(examples), 5)
    assert counts.tolist() == [n for _, n in plain]
    assert sums.tolist() == pytest.approx([s for s, _ in plain], rel=1e-5)

    expected = sum(s for s, _ in plain)
    for mb, packing in ((one_per_row, False), (packed, True)):
        batch = collate(examples, mb, 0, "cpu", packing)
        for chunk in (4, 7, 1000):
            with torch.no_grad():
                assert float(causal_lm_loss(tiny_model, batch, chunk)) == pytest.approx(expected, rel=1e-5)
        # With autograd on, each chunk goes through activation checkpointing: same value, and it backpropagates.
        loss = causal_lm_loss(tiny_model, batch, 7)
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
        loss.backward()
        assert tiny_model.get_output_embeddings().weight.grad is not None
        tiny_model.zero_grad(set_to_none=True)


def test_softcapping_changes_the_loss(tiny_model, monkeypatch):
    """The cap the test above checks really changes the loss (a cap with no effect would pass it trivially)."""
    import torch

    examples = _examples()
    batch = collate(examples, MicroBatch(rows=((0, 1, 2, 3),), tokens=0, target_tokens=0), 0, "cpu", True)
    with torch.no_grad():
        uncapped = float(causal_lm_loss(tiny_model, batch, 8))
        monkeypatch.setattr(tiny_model.config, "final_logit_softcapping", 0.2, raising=False)
        capped = float(causal_lm_loss(tiny_model, batch, 8))
    # Near-uniform logits move the loss only a little, but 20x more than the tolerance the test above allows.
    assert abs(capped - uncapped) > 20 * 1e-5 * uncapped
