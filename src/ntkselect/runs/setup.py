"""What a run is computed with, resolved from its configuration: the runtime (device,
precision, batching) the stages are handed."""

from __future__ import annotations

from ntkselect.config import SelectConfig
from ntkselect.model.runtime import Runtime, resolve_device, resolve_precision

__all__ = ["make_runtime"]


def make_runtime(cfg: SelectConfig, tokenizer) -> Runtime:
    device = resolve_device(cfg.device)
    return Runtime(
        device=device,
        dtype=resolve_precision(cfg.precision, device),
        batch_size=cfg.batch_size,
        max_batch_tokens=cfg.max_batch_tokens,
        padding_side=cfg.padding_side,
        pad_id=tokenizer.pad_token_id,
    )
