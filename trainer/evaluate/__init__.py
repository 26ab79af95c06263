"""The Evaluate step: base vs tuned on held-out rows (loss, task metrics, stop rate, retention), and the report."""
