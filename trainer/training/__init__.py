"""The Train step: loading the base model (4-bit or 16-bit) and its adapters, the training loop, checkpoints, and a
whole run from start to finish (`run.train`)."""
