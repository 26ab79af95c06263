"""The Data step: reading rows in every supported format, rendering them to tokens with a loss mask, the lint
report, and the batch schedule (packing, length grouping)."""
