"""ntkselect.training: the warm-up and the evaluation fine-tune."""
