"""Judging a pruned model: validation, the verdict, evaluation data, latency and the report."""
