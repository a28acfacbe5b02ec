"""What a run is computed with, resolved once: the model's folder and fingerprint, the
tokenizer, the device, the weights' dtype and the matmul precision, and the inputs' hashes.

A run makes one :class:`RunSetup` from its configuration (:func:`ntkselect.pipeline.load_inputs`
does, and keeps it on the inputs) and hands it down: to the input reading (the tokenizer; the
hashes are taken as the files are read), the run folder's fingerprint, the preflight, the
selection context and the manifest. Each piece is resolved the first time it is needed, so a run
that fails early resolves no more than it needs, and nothing is resolved or hashed twice.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ntkselect.config import SelectConfig
from ntkselect.files import sha256_path
from ntkselect.model.loading import load_tokenizer, resolve_model, resolve_model_dtype
from ntkselect.model.runtime import Runtime, resolve_device, resolve_precision

__all__ = ["RunSetup", "make_runtime", "model_fingerprint"]


def model_fingerprint(path: str) -> dict:
    """What a run's results depend on of the model folder ``path``: its config's sha256 and its files' sizes."""
    p = Path(path)
    if not p.is_dir():
        return {"path": path}
    files = {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()}
    cfg = p / "config.json"
    return {"path": str(p), "config_sha256": sha256_path(cfg) if cfg.exists() else None, "file_sizes": files}


class RunSetup:
    """A run's model, tokenizer, device, weights' dtype, precision and input hashes, each resolved
    once, when first used.

    ``model``, ``device``, ``precision`` and ``model_dtype`` are the options as given (``--model
    default``, ``--device auto``, ...); the properties are what they resolve to here."""

    def __init__(self, model: str, device: str = "auto", precision: str = "auto", model_dtype: str = "auto"):
        self.model, self.device_name, self.precision_name, self.model_dtype_name = model, device, precision, model_dtype
        self.hashes: dict[str, str] = {}  # {"domain": sha256, "pool": sha256} of the bytes read, set as the inputs are read

    @classmethod
    def of(cls, cfg: SelectConfig) -> RunSetup:
        return cls(cfg.model, cfg.device, cfg.precision, cfg.model_dtype)

    @functools.cached_property
    def model_path(self) -> str:
        """The folder (or cached name) the model loads from; for the default model its converted copy."""
        return resolve_model(self.model)

    @functools.cached_property
    def model_fingerprint(self) -> dict:
        return model_fingerprint(self.model_path)

    @functools.cached_property
    def tokenizer(self):
        # from the option as given: the default model's tokenizer is read without converting its weights
        return load_tokenizer(self.model)

    @functools.cached_property
    def device(self) -> torch.device:
        return resolve_device(self.device_name)

    @functools.cached_property
    def model_dtype(self) -> torch.dtype:
        """The dtype the weights are held in (``--model-dtype``)."""
        # only "auto" on CUDA reads the checkpoint's config: elsewhere the model is not resolved for it
        reads_config = self.model_dtype_name == "auto" and self.device.type == "cuda"
        return resolve_model_dtype(self.model_dtype_name, self.device, self.model_path if reads_config else self.model)

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        """The matmul (autocast) precision (``--precision``)."""
        return resolve_precision(self.precision_name, self.device, self.model_dtype)


def make_runtime(cfg: SelectConfig, tokenizer, setup: RunSetup | None = None) -> Runtime:
    """The runtime the stages are handed: ``setup``'s device, precision and weights' dtype
    (default: resolved from ``cfg``), ``cfg``'s batching, the tokenizer's pad id."""
    setup = setup or RunSetup.of(cfg)
    return Runtime(
        device=setup.device,
        dtype=setup.dtype,
        model_dtype=setup.model_dtype,
        batch_size=cfg.batch_size,
        max_batch_tokens=cfg.max_batch_tokens,
        padding_side=cfg.padding_side,
        pad_id=tokenizer.pad_token_id,
    )
