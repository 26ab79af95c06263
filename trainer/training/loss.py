"""The one causal-LM loss, shared by training (and its validation pass) and `ft-desk eval`.

Cross-entropy is computed from the decoder's hidden states at labelled positions only, the output head applied
`chunk_tokens` positions at a time in fp32 (with the model's logit soft-capping, if it has one), so the
full-vocabulary logits of a batch never exist at once. Under autograd each chunk is recomputed in backward.

`causal_lm_loss` returns the sum over target tokens; the training loop divides by token counts it knows on the
host, so nothing waits on the device. `per_example_loss` keeps the same sums apart per row of the batch, for eval.
Both go through `_chunk_cross_entropy`, so training and eval cannot drift apart. torch is imported inside the
functions.
"""

from __future__ import annotations

from ft_desk.trainer.data.batching import IGNORE


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def soft_cap(logits, cap: float):
    """Gemma-style logit soft-capping: tanh(logits / cap) * cap."""
    import torch  # heavy import (already loaded by the caller)

    return torch.tanh(logits / cap) * cap


def _chunk_cross_entropy(hidden, targets, head, softcap, reduction: str):
    import torch.nn.functional as F  # heavy import (already loaded by the caller)

    logits = head(hidden).float()
    if softcap:
        logits = soft_cap(logits, softcap)
    return F.cross_entropy(logits, targets, reduction=reduction)


def _labelled_hidden(model, batch: dict):
    """(hidden states at labelled positions, their targets, the labelled-position mask, head, softcap)."""
    base = _unwrap(model)
    out = base.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    hidden = out[0]
    targets = batch["targets"]
    keep = targets != IGNORE
    # Boolean indexing needs the count of kept positions on the host: one sync per micro-batch (free on CPU;
    # on CUDA the caller already knows the count, so it could be passed in - kept simple until measured).
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return hidden[keep], targets[keep], keep, base.get_output_embeddings(), softcap


def causal_lm_loss(model, batch: dict, chunk_tokens: int):
    """Summed cross-entropy over the labelled positions of a collated batch (fp32 scalar on the device)."""
    import torch  # heavy import
    from torch.utils.checkpoint import checkpoint

    h, t, _keep, head, softcap = _labelled_hidden(model, batch)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_cross_entropy, h[piece], t[piece], head, softcap, "sum",
                                       use_reentrant=False)
        else:
            total = total + _chunk_cross_entropy(h[piece], t[piece], head, softcap, "sum")
    return total


def per_example_loss(model, batch: dict, rows: int, chunk_tokens: int):
    """(summed cross-entropy in fp64, target tokens) per row of a collated batch with one example per row."""
    import torch  # heavy import

    h, t, keep, head, softcap = _labelled_hidden(model, batch)
    row_of = keep.nonzero()[:, 0]
    sums = torch.zeros(rows, dtype=torch.float64, device=h.device)
    for start in range(0, h.shape[0], chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        ce = _chunk_cross_entropy(h[piece], t[piece], head, softcap, "none")
        sums.index_add_(0, row_of[piece], ce.double())
    return sums, keep.sum(dim=1)
