"""Run configuration: one validated dataclass, the single source of every option.

The CLI builds its flags from these fields (name, type, default and help), so the Python API
and the command line cannot drift apart. :meth:`SelectConfig.validate` names the bad field
and the fix in a one-line :class:`~ntkselect.errors.NtkSelectError`.

``--method`` is checked where the selectors are registered: the registry
(:mod:`ntkselect.selection.registry`, a layer above this module) adds its check with
:func:`add_check`, and the CLI takes the flag's choices and help from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from ntkselect.errors import NtkSelectError
from ntkselect.model.runtime import check_device

__all__ = [
    "SelectConfig",
    "add_check",
    "check_types",
    "value_problem",
    "MAX_INT",
    "MAX_PROJ_DIM",
    "MAX_PROBES",
    "MAX_CHECKPOINTS",
    "check_limits",
    "field_help",
]

#: the largest integer any option takes (torch and numpy seeds and sizes are 64-bit)
MAX_INT = 2**63 - 1
#: the most probes of the trace kernel (each costs a forward + backward pass per example; the R x V signs are held as float32)
MAX_PROBES = 1024
#: the most warm-up checkpoints of an ensemble (each is a stage 2 of its own)
MAX_CHECKPOINTS = 64
#: the largest projection dimension: one projected vector is then 64 MiB of float32 (the paper uses 8192)
MAX_PROJ_DIM = 2**24


def _opt(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


#: checks of a whole configuration by the layers above that own what they check, run by every
#: :meth:`SelectConfig.validate` after its own: the selector registry adds ``--method``'s
#: (:func:`ntkselect.selection.registry.check_method`) when it is imported
_CHECKS: list[Callable[[SelectConfig], None]] = []


def add_check(check: Callable[[SelectConfig], None]) -> Callable[[SelectConfig], None]:
    """Run ``check(cfg)`` (raising a one-line :class:`NtkSelectError`) in every :meth:`SelectConfig.validate`."""
    if check not in _CHECKS:
        _CHECKS.append(check)
    return check


def field_help(f) -> str:
    """A field's help text (a ``help_fn`` in its metadata computes it when it is asked for)."""
    return f.metadata["help_fn"]() if "help_fn" in f.metadata else f.metadata.get("help", "")


def value_problem(kind: str, value: Any) -> str | None:
    """Why ``value`` is not a valid ``kind`` ("int", "float", "str" or "bool") option value, or None.

    Strict: a boolean is not a number and a string is not a boolean; floats must be finite."""
    if kind == "bool":
        return None if isinstance(value, bool) else "must be true or false"
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer"
        return None if abs(value) <= MAX_INT else f"must be at most {MAX_INT}"
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if isinstance(value, int) and abs(value) > MAX_INT:
            return "is too large"
        return None if math.isfinite(value) else "must be a finite number"
    if kind == "str":
        if not isinstance(value, str):
            return "must be a string"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be text that can be written as UTF-8"
        return None
    return None


def _kind(f) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")


def check_types(obj, flag=lambda name: "--" + name.replace("_", "-")) -> None:
    """Every field of the dataclass ``obj`` has its declared type (see :func:`value_problem`)."""
    for f in fields(obj):
        why = value_problem(_kind(f), getattr(obj, f.name))
        if why:
            raise NtkSelectError(f"{flag(f.name)}: {why} (got {getattr(obj, f.name)!r})")


def check_limits(obj, names_proj=("proj_dim",), flag=lambda name: "--" + name.replace("_", "-")) -> None:
    """Upper limits shared by the commands: threads (the CPUs), projection dimensions, the device."""
    cpus = os.cpu_count() or 1
    if getattr(obj, "threads", 0) > cpus:
        raise NtkSelectError(f"{flag('threads')}: must be at most the number of CPUs here ({cpus}) (got {obj.threads})")
    for name in names_proj:
        if getattr(obj, name, 0) > MAX_PROJ_DIM:
            raise NtkSelectError(f"{flag(name)}: must be at most {MAX_PROJ_DIM} (the paper uses 8192) (got {getattr(obj, name)})")
    if hasattr(obj, "device"):
        check_device(obj.device, flag("device"))


@dataclass
class SelectConfig:
    # -- inputs and outputs -----------------------------------------------------------
    domain: str = _opt("", "domain examples D (JSONL, JSON, CSV, Parquet or a datasets folder)", required=True)
    pool: str = _opt("", "candidate pool C, same formats", required=True)
    n: int = _opt(0, "how many pool examples to select (N)", required=True)
    out: str = _opt("", "run folder for selected.jsonl, scores.jsonl, adapter/, train.jsonl, manifest.json", required=True)
    method: str = _opt("ntk", "selector: one of the registered selectors (ntkselect.selection.registry)")
    model: str = _opt("default", "Hugging Face causal-LM folder or cached name; 'default' = embedded SmolLM2-135M-Instruct")
    template: str = _opt(
        "auto", "how prompt/response records are rendered: auto (chat if the tokenizer has a chat template), chat or plain", choices=("auto", "chat", "plain")
    )
    max_length: int = _opt(512, "maximum tokens per example; longer ones are truncated and counted")
    seed: int = _opt(0, "seed for LoRA initialisation, warm-up order and the projection")
    overwrite: bool = _opt(False, "replace the results of an earlier run in --out")
    keep_domain_duplicates: bool = _opt(
        False, "keep pool records that exactly duplicate a domain record (by default they are reported and excluded: selecting D again adds nothing)"
    )
    dry_run: bool = _opt(
        False, "read and tokenize the inputs, print the estimated tokens, time, peak memory and disk per stage, and stop without writing anything"
    )
    # -- warm-up ----------------------------------------------------------------------
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: float = _opt(16.0, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = _opt(0.0, "LoRA dropout during warm-up (never applied to gradients); 0 lets the warm-up use the fused LoRA path, about 2x faster")
    lora_target_modules: str = _opt("all-linear", "comma-separated module names to adapt, or all-linear")
    warmup_epochs: float = _opt(1.0, "warm-up epochs on D; 0 skips training (the fresh adapter is still saved)")
    warmup_lr: float = _opt(2e-4, "warm-up learning rate (AdamW, linear decay)")
    warmup_batch_size: int = _opt(8, "warm-up batch size")
    # -- stage 1 ----------------------------------------------------------------------
    knn_k: int = _opt(32, "each domain example votes for its K nearest candidates (raised automatically if too few get votes)")
    preselect_factor: float = _opt(4.0, "stage 1 keeps M = factor x N candidates for stage 2")
    # -- stage 2 ----------------------------------------------------------------------
    proj_dim: int = _opt(
        0,
        "0 (default) scores with the exact, unprojected kernel, which the mean over D makes as cheap as a projection; "
        "p > 0 uses the paper's seeded Rademacher projection to p dimensions (the paper: 8192)",
    )
    less_proj_dim: int = _opt(8192, "--method less: projection dimension of its gradient features (LESS uses 8192)")
    # -- NTK-Selector variants (--method ntk-plus and its presets ntk-norm, ntk-trace, ntk-loss, ntk-diverse, ntk-ensemble) --
    kernel: str = _opt(
        "sum",
        "--method ntk-plus: the kernel's objective: sum (the paper's summed logits), trace (Hutchinson estimate of the multi-output "
        "trace kernel, --probes sign vectors over the vocabulary) or loss (each example's mean NLL over its trained tokens)",
        choices=("sum", "trace", "loss"),
    )
    probes: int = _opt(16, "--method ntk-trace, or ntk-plus --kernel trace: Rademacher sign vectors R over the vocabulary (R backward passes per example)")
    normalise: bool = _opt(False, "--method ntk-plus: divide each candidate's score by its unprojected gradient norm (ntk-norm does this alone)")
    diverse: bool = _opt(False, "--method ntk-plus: select greedily, trading score against redundancy by --diversity-lambda (ntk-diverse does this alone)")
    ensemble: bool = _opt(False, "--method ntk-plus: average the kernel over --checkpoints warm-up checkpoints (ntk-ensemble does this alone)")
    checkpoints: int = _opt(
        3,
        "--method ntk-ensemble, or ntk-plus --ensemble: warm-up checkpoints C (after steps round(S c / C), c = 1..C, the last the "
        "finished warm-up); the kernel is their equal-weight mean; the earlier ones replay the warm-up",
    )
    diversity_lambda: float = _opt(
        0.5,
        "--method ntk-diverse, or ntk-plus --diverse: lambda >= 0; a candidate loses lambda x sd(scores) x its largest cosine "
        "(centred projected gradient features) to one already selected; 0 is top N",
    )
    # -- selection rules (issue 25): --method ntk-cos, ntk-vote (and ntk-plus), ntk-max, ntk-rr, ntk-whiten, ntk-tsds, ntk-rules --
    cosine: bool = _opt(False, "--method ntk-plus: the cosine kernel, each kernel value divided by both examples' gradient norms (ntk-cos does this alone)")
    weighted_vote: bool = _opt(False, "--method ntk-plus or ntk-rules: stage 1 keeps the candidates with the largest --vote-weight (ntk-vote does this alone)")
    vote_weight: str = _opt(
        "rank",
        "--method ntk-vote, or ntk-plus / ntk-rules --weighted-vote: how a domain example's vote for its r-th nearest counts: "
        "rank ((K - r) / K) or similarity (its cosine); stage 1 keeps the largest sums",
        choices=("rank", "similarity"),
    )
    features: str = _opt(
        "unit",
        "--method ntk-rules: the per-example gradient features compared: unit (unit length, as LESS), centre (centred on the mean of D "
        "and the candidates, then unit) or whiten (centred, whitened by their shrunk covariance, then unit, as TAROT)",
        choices=("unit", "centre", "whiten"),
    )
    aggregate: str = _opt(
        "mean",
        "--method ntk-rules: how the cosines to the domain examples rank a candidate: mean, max, rr (round robin: each domain example "
        "takes its next-best unselected candidate in turn) or tsds (TSDS's transport and density, --tsds-* options, on the features)",
        choices=("mean", "max", "rr", "tsds"),
    )
    feature_dim: int = _opt(
        8192,
        "--method ntk-max, ntk-rr, ntk-whiten, ntk-tsds, ntk-rules: projection dimension p of the per-example gradient features "
        "(LESS: 8192; 0: unprojected, for small models only)",
    )
    whiten_shrinkage: float = _opt(
        0.5,
        "--method ntk-whiten, ntk-tsds, or ntk-rules --features whiten: rho in (0, 1]; the covariance whitened by is "
        "(1 - rho) S + rho (tr S / p) I (1: no whitening, only centring)",
    )
    # -- TSDS (--method tsds; defaults: the authors' config.yaml) ----------------------------
    tsds_alpha: float = _opt(0.5, "--method tsds: weight of distribution alignment (optimal transport to D) against diversity, in [0, 1]")
    tsds_c: float = _opt(5.0, "--method tsds: C, the scale dividing the transport cost (the embeddings are unit-normalised)")
    tsds_sigma: float = _opt(0.75, "--method tsds: KDE kernel size, kernel max(0, 1 - |x - y|^2 / sigma^2); 0 turns the near-duplicate penalty off")
    tsds_max_k: int = _opt(5000, "--method tsds: nearest candidates per domain example for the transport (TSDS max_K; capped at pool size / 10)")
    tsds_kde_k: int = _opt(1000, "--method tsds: neighbours counted by the KDE (TSDS kde_K; capped at pool size / 10)")
    # -- execution --------------------------------------------------------------------
    batch_size: int = _opt(16, "examples per batch in stages 1 and 2")
    max_batch_tokens: int = _opt(8192, "padded tokens per batch in stages 1 and 2 (batches are length-sorted)")
    precision: str = _opt(
        "auto",
        "matmul precision: auto (bfloat16 where the hardware has it), float32 or bfloat16; reductions stay float32",
        choices=("auto", "float32", "bfloat16"),
    )
    model_dtype: str = _opt(
        "auto",
        "dtype the model's weights are held in, loaded straight onto --device: auto (the checkpoint's own dtype on CUDA, "
        "float32 on a CPU), bfloat16, float16 or float32; the LoRA adapter and every reduction stay float32",
        choices=("auto", "bfloat16", "float16", "float32"),
    )
    padding_side: str = _opt("right", "pad batches on the right or left (scores do not depend on it)", choices=("right", "left"))
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    threads: int = _opt(0, "CPU threads for torch (0 = torch's default)")
    shard_size: int = _opt(2048, "pool records per shard: each shard's embeddings / scores / features are written with a completion marker, so a rerun resumes")
    executor: str = _opt("local", "where shards run: local (this process) or ray (a Ray cluster; pip install 'ntkselect[ray]')", choices=("local", "ray"))
    ray_address: str = _opt("", "--executor ray: address of a running cluster (e.g. ray://head:10001 or auto); empty starts a local one")
    ray_workers: int = _opt(0, "--executor ray: number of actors (0 = one per GPU, or one per 2 CPUs without GPUs)")

    def validate(self) -> SelectConfig:
        def bad(name: str, why: str) -> NtkSelectError:
            flag = "--" + name.replace("_", "-")
            return NtkSelectError(f"{flag}: {why} (got {getattr(self, name)!r})")

        check_types(self)
        for f in fields(self):
            if f.metadata.get("required") and getattr(self, f.name) in ("", None):
                raise NtkSelectError(f"--{f.name.replace('_', '-')} is required")
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise bad(f.name, f"must be one of {', '.join(choices)}")
        for name in ("n", "less_proj_dim", "shard_size", "max_length", "lora_r", "warmup_batch_size", "knn_k", "batch_size", "max_batch_tokens", "tsds_kde_k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer")
        if self.max_length < 2:
            raise bad("max_length", "must be at least 2 tokens")
        if self.proj_dim < 0 or self.proj_dim % 8:
            raise bad("proj_dim", "must be 0 (exact) or a positive multiple of 8")
        if self.seed < 0:
            raise bad("seed", "must be non-negative")
        if self.warmup_epochs < 0:
            raise bad("warmup_epochs", "must be >= 0")
        if self.warmup_lr <= 0:
            raise bad("warmup_lr", "must be positive")
        if self.lora_alpha <= 0:
            raise bad("lora_alpha", "must be positive")
        if not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "must be in [0, 1)")
        if not 0 <= self.tsds_alpha <= 1:
            raise bad("tsds_alpha", "must be in [0, 1]")
        if not 0 < self.tsds_c < float("inf"):
            raise bad("tsds_c", "must be positive")
        if not 0 <= self.tsds_sigma < float("inf"):
            raise bad("tsds_sigma", "must be >= 0")
        if not isinstance(self.tsds_max_k, int) or self.tsds_max_k < 2:
            raise bad("tsds_max_k", "must be an integer >= 2 (each domain example needs a next neighbour)")
        if not isinstance(self.probes, int) or not 1 <= self.probes <= MAX_PROBES:
            raise bad("probes", f"must be an integer from 1 to {MAX_PROBES}")
        if not isinstance(self.checkpoints, int) or not 1 <= self.checkpoints <= MAX_CHECKPOINTS:
            raise bad("checkpoints", f"must be an integer from 1 to {MAX_CHECKPOINTS}")
        if not 0 <= self.diversity_lambda < float("inf"):
            raise bad("diversity_lambda", "must be a number >= 0 (0 is top N)")
        if self.feature_dim < 0 or self.feature_dim % 8:
            raise bad("feature_dim", "must be 0 (unprojected) or a positive multiple of 8")
        if not 0 < self.whiten_shrinkage <= 1:
            raise bad("whiten_shrinkage", "must be in (0, 1] (1: centre only, no whitening)")
        if self.preselect_factor < 1:
            raise bad("preselect_factor", "must be at least 1")
        if self.max_batch_tokens < self.max_length:
            raise bad("max_batch_tokens", f"must be at least --max-length ({self.max_length}) so every example fits in a batch")
        if self.ray_workers < 0:
            raise bad("ray_workers", "must be >= 0")
        if self.threads < 0:
            raise bad("threads", "must be >= 0")
        if not self.lora_target_modules.strip() or not self.target_modules():
            raise bad("lora_target_modules", "must name modules or be all-linear")
        for check in _CHECKS:  # --method: a registered selector, and what the method itself needs (e.g. less: a warm-up; bm25: bm25s)
            check(self)
        check_limits(self, ("proj_dim", "less_proj_dim", "feature_dim"))
        return self

    def target_modules(self) -> str | list[str]:
        t = self.lora_target_modules.strip()
        return t if t == "all-linear" else [m.strip() for m in t.split(",") if m.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: field_help(f) for f in fields(cls)}
