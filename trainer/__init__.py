"""The training loop and what hangs off it: optimizer and schedule, metrics, evaluation."""
