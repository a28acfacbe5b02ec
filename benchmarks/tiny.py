"""The test suite's tiny random Llama for the benchmarks: 2 layers, d = 32, the SmolLM2 tokenizer and
vocabulary, seeded weights (the same config and seed as tests/conftest.py's ``tiny_model_dir``).

One builder for every benchmark that needs a model in seconds without a download
(fault_injection.py, pool_scale.py, stage2.py, same_bytes.py). Written to a temporary sibling and
renamed into place, so a folder that exists is complete.

    PYTHONPATH=src python benchmarks/tiny.py FOLDER      # build it (what same_bytes.py runs under each source tree)
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def tiny_model(path: str | Path) -> str:
    """Build the tiny model into ``path`` once; return its path as a string."""
    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer_config.json").exists():
        return str(path)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ntkselect.model.loading import load_tokenizer

    tok = load_tokenizer(None)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return str(path)


if __name__ == "__main__":
    print(tiny_model(sys.argv[1]))
