"""The numbers of quantized training: device facts and dtype choice, the 4-bit policy, the memory planner,
dequantize/merge math and GGUF tensors. Sits below trainer/: imports nothing of it but the stdlib-only
trainer.errors, so its inputs (a run's settings, a model's config.json) come in as plain data."""
