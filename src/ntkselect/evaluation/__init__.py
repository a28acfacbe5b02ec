"""ntkselect.evaluation.metrics: the evaluation harness, its metrics and statistics."""
