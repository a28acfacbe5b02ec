"""One selection resolves its inputs once (runs/setup.py): the model's folder and fingerprint, the
tokenizer, the device, the weights' dtype, the precision and the inputs' hashes, however many
stages read them."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

from ntkselect import files
from ntkselect.config import SelectConfig
from ntkselect.model import loading, runtime
from ntkselect.pipeline import select


def _count(monkeypatch, module, name: str, calls: collections.Counter, result=None) -> None:
    """Count the calls of ``module.name`` from every ntkselect module: each module's binding of the
    function is replaced (``from ... import name`` copies it), so a second resolution anywhere counts."""
    orig = getattr(module, name)

    def counted(*a, **k):
        # a hash counts by what it hashes: the run's written outputs (whose sha256 the manifest lists) are not inputs
        out_file = name == "sha256_path" and a and Path(a[0]).name in ("selected.jsonl", "scores.jsonl", "train.jsonl")
        calls[name if not out_file else "sha256_path (outputs)"] += 1
        return orig(*a, **k) if result is None else result

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("ntkselect") and getattr(mod, name, None) is orig:
            monkeypatch.setattr(mod, name, counted)


def test_a_selection_resolves_model_tokenizer_device_precision_and_hashes_once(data, tiny_model_dir, tmp_path, monkeypatch):
    dom, pool, _ = data
    calls: collections.Counter = collections.Counter()
    # --model default, resolved to the tiny model: resolving "default" is what converts the GGUF model once
    _count(monkeypatch, loading, "default_model_dir", calls, result=Path(tiny_model_dir))
    _count(monkeypatch, loading, "default_tokenizer_dir", calls, result=Path(tiny_model_dir))
    for module, name in (
        (loading, "load_tokenizer"),
        (loading, "load_model"),
        (loading, "meta_model"),
        (loading, "resolve_model_dtype"),
        (runtime, "resolve_device"),
        (runtime, "resolve_precision"),
        (files, "sha256_path"),
    ):
        _count(monkeypatch, module, name, calls)
    cfg = SelectConfig(domain=str(dom), pool=str(pool), n=4, out=str(tmp_path / "run"), model="default", threads=1, knn_k=4, shard_size=8)
    result = select(cfg, log=lambda _: None)
    assert dict(calls) == {
        "default_model_dir": 1,  # the model's folder
        "default_tokenizer_dir": 1,
        "load_tokenizer": 1,
        "load_model": 1,  # the preflight's model is the run's
        "meta_model": 1,  # the LoRA options checked against the model's modules
        "resolve_device": 1,
        "resolve_model_dtype": 1,  # the weights' dtype (--model-dtype)
        "resolve_precision": 1,
        "sha256_path": 1,  # the model's config.json, for the fingerprint; the inputs are hashed as they are read
        "sha256_path (outputs)": 3,  # selected, scores and train.jsonl, once each, for the manifest
    }
    model = result.manifest["inputs"]["model"]
    assert model["path"] == tiny_model_dir and model["config_sha256"] == files.sha256_path(Path(tiny_model_dir) / "config.json")
    assert result.manifest["inputs"]["domain"]["sha256"] == files.sha256_path(dom)
    assert result.manifest["inputs"]["pool"]["sha256"] == files.sha256_path(pool)
