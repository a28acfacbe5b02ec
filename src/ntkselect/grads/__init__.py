"""ntkselect.grads.fused: per-example LoRA gradients and their projections."""
