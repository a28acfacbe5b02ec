"""``ntkselect select --dry-run``: what a selection will cost, before it starts.

:func:`estimate` does the cheap part of a run for real (reads and checks both files, tokenizes
them, loads the model with the run's adapter for the preflight, reads the LoRA layout) and
models the expensive part:

* tokens per stage: warm-up = epochs x domain tokens (forward + backward); stage 1 = domain + pool
  (forward); stage 2 = domain + M candidates (forward + backward, M x the mean pool length, since
  which M is not known before stage 1); LESS = domain + pool (forward + backward);
* time per stage: FLOPs ~ 2 x parameters x tokens forward, x 3 for forward + backward, at the
  rate of one small timed matmul in the run's precision on the run's device (plus one timed
  projection block for ``--proj-dim`` / LESS). A rough estimate: a small model rarely reaches
  its hardware's matmul rate, so real runs are usually slower, by up to a few times;
* peak memory: weights + LoRA parameters, gradients and AdamW state + the activations of the
  largest batch + the projection buffers;
* disk: the outputs and the temporary arrays a run writes into --out.

It also runs the run's preflight (:mod:`ntkselect.runs.preflight`: the model is loaded, gets the
run's adapter, and a tiny batch goes through every path the run will use), so a model the
run could not handle stops the dry run with the same one-line error. Nothing is written. :func:`format_plan` renders the dict as the table the CLI prints.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ntkselect.config import SelectConfig
from ntkselect.data.batching import make_batches
from ntkselect.data.pool import default_workers, lengths_of, scan_pool, trained_of
from ntkselect.data.records import load_records, record_text, tokenize_records
from ntkselect.errors import NtkSelectError
from ntkselect.grads.projection import BLOCK_ROWS, RademacherProjector, make_projector
from ntkselect.model.loading import DEFAULT_MODEL, _config, cache_dir, gguf_path, is_random, resolve_model
from ntkselect.model.memory import overhead, rss_bytes
from ntkselect.model.runtime import Runtime, resolve_precision
from ntkselect.runs.folder import SELECT, check_paths
from ntkselect.runs.preflight import preflight_select
from ntkselect.runs.setup import RunSetup
from ntkselect.selection.ntk_variants.selector import ignored_options
from ntkselect.selection.registry import selector_spec
from ntkselect.training.warmup import WarmupOptions, add_lora, micro_batches, warmup_batches

__all__ = ["estimate", "format_plan", "model_facts", "calibrate", "PlanBuilder"]

_ID_BYTES = 12  # a record id, as stored (a guess: ids are not kept by the scan)
_TEMPORARY = ("embeddings", "less_features")  # temporary disk entries every plan lists (0 where unused)
_DISK_LISTED = ("adapter", *_TEMPORARY, "scores", "selected", "train", "manifest", "outputs", "temporary", "peak")  # format_plan names these itself
_SCORE_ROW_BYTES = 90  # one scores.jsonl line: id, score, rank, selected (+ votes)
_SELECTION_FIELDS_BYTES = 80  # selection_score, selection_rank, selection_method added to each selected record
_MANIFEST_BYTES = 16 << 10


# --------------------------------------------------------------------------- model


def _model_config(model: str):
    """The model's transformers config, read without loading weights."""
    from transformers import AutoConfig

    if model in (None, "", "default", DEFAULT_MODEL):
        cached = sorted(p for p in cache_dir().glob(f"{DEFAULT_MODEL}-*") if (p / "config.json").exists())
        if cached:
            return AutoConfig.from_pretrained(str(cached[-1])), str(cached[-1])
        gguf = gguf_path()  # not converted yet: the GGUF header holds the configuration
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name), str(gguf)

    if is_random(model):
        return _config(model), resolve_model(model)
    kw = {} if Path(model).exists() else {"local_files_only": True}
    try:
        return AutoConfig.from_pretrained(model, **kw), model
    except (OSError, ValueError) as err:
        raise NtkSelectError(
            f"cannot read the model configuration of --model {model!r}: {str(err).splitlines()[0]}; "
            "pass a Hugging Face causal-LM folder or a model name in the local cache"
        ) from None


def model_facts(cfg: SelectConfig) -> dict:
    """Parameter count, shapes and the LoRA gradient dimension of ``cfg.model`` with ``cfg``'s
    adapter, from a copy of the model on the ``meta`` device (shapes only, no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    config, path = _model_config(cfg.model)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError as err:
            raise NtkSelectError(f"--model {path}: not a causal LM ({str(err).splitlines()[0]}); pass a Hugging Face causal-LM folder") from None
        params = sum(p.numel() for p in model.parameters())  # tied weights counted once
        model = add_lora(model, WarmupOptions(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0, target_modules=cfg.target_modules(), seed=cfg.seed))
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # every adapted linear layer: stage 2's hooks keep its input (d_in) and output gradient (d_out) per token
    sites = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer") and len(m.lora_A)]
    site_width = sum(_site_width(m) for m in sites)  # d_out + d_in (Linear, Conv1D, or a peft parameter wrapper)
    # the adapted layers' weights: stages 1 and 2 hold W + sBA once more, merged once per stage (grads/fused.py)
    adapted = sum(int(m.get_base_layer().weight.numel()) for m in sites if hasattr(m.get_base_layer(), "weight"))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    return {
        "path": path,
        "type": getattr(config, "model_type", "?"),
        "params": int(params),
        "hidden_size": hidden,
        "layers": int(getattr(text, "num_hidden_layers", 0)),
        "intermediate_size": int(getattr(text, "intermediate_size", None) or 4 * hidden),
        "heads": int(getattr(text, "num_attention_heads", 1)),
        "vocab_size": int(text.vocab_size),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "grad_dim": int(sum(p.numel() for _, p in lora)),
        "lora_modules": len(sites),
        "lora_site_width": int(site_width),
        "adapted_weights": int(adapted),
    }


def _site_width(m) -> int:
    """d_in + d_out of a LoRA layer, read from its A and B (any base layer: Linear, Conv1D,
    or a peft ParamWrapper, which has no ``weight``)."""
    a, b = next(iter(m.lora_A.values())), next(iter(m.lora_B.values()))
    d_in = getattr(a, "in_features", None) or a.weight.shape[-1]
    d_out = getattr(b, "out_features", None) or b.weight.shape[0]
    return int(d_in) + int(d_out)


# --------------------------------------------------------------------------- calibration


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(device: torch.device, dtype: torch.dtype, proj_dim: int = 0) -> dict:
    """Achieved matmul FLOP/s (median of 5 timed n x n x n products: on a shared machine the
    best one overstates what a long run gets) and, for ``proj_dim`` > 0, the seconds to
    generate and apply one projection block."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)  # (n, n)
    b = torch.randn(n, n, device=device).to(dtype)  # (n, n)
    a @ b  # warm-up: kernels, thread pool
    _sync(device)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    out = {"matmul": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')} on {device}", "flops_per_s": 2 * n**3 / max(sorted(times)[2], 1e-9)}
    if proj_dim > 0:
        out.update(_time_block(device, proj_dim))
    return out


def _time_block(device: torch.device, proj_dim: int) -> dict:
    """Seconds to generate and apply one block of a ``proj_dim`` projection on ``device``."""
    proj = make_projector(BLOCK_ROWS, proj_dim, 0, device=device)
    if not isinstance(proj, RademacherProjector):  # proj_dim = 0 is the identity: no blocks to time
        raise ValueError(f"a projection block needs proj_dim > 0 (got {proj_dim})")
    v = torch.randn(1, BLOCK_ROWS, device=device)  # (1, rows)
    t = time.perf_counter()
    v @ proj.block(0, torch.float32)  # (1, rows) @ (rows, p): generation dominates
    _sync(device)
    return {"block_seconds": time.perf_counter() - t, "block_rows": BLOCK_ROWS}


# --------------------------------------------------------------------------- estimate


def _out_state(cfg: SelectConfig) -> dict:
    """What --out is now, checked without writing: the errors a real run would stop with."""
    out = Path(cfg.out)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "not a folder" if not probe.is_dir() else "permission denied"
        raise NtkSelectError(f"cannot write to --out {out}: {probe} is {why}; choose a writable folder")
    if (out / "manifest.json").exists() and not cfg.overwrite:
        raise NtkSelectError(f"{out} already holds a finished run (manifest.json); pass --overwrite to replace it or choose another --out")
    state = "will be created" if not out.exists() else ("holds a finished run (--overwrite replaces it)" if (out / "manifest.json").exists() else "exists")
    return {"path": str(out), "state": state, "free_bytes": shutil.disk_usage(probe).free}


class PlanBuilder:
    """What a selector's cost model (``cost`` of its registration,
    :func:`~ntkselect.selection.registry.register_selector`) sees of a dry run, and adds to.

    Read: ``cfg``; the inputs as the run tokenizes them (``n_pool``, ``dom_len`` / ``pool_len``
    tokens per example, ``dom_tr`` / ``pool_tr`` trained tokens, ``dom_stats`` / ``pool_stats``,
    ``shards``: the pool's shard ranges); with a model, ``facts`` (:func:`model_facts`),
    ``params`` (P) and ``grad_dim`` (D). Add: stages (:meth:`stage` prices passes of the model
    by FLOPs at the measured rate, :meth:`add_stage` anything else), ``activations[stage]``
    (live bytes of the stage's largest batch, :meth:`worst`), ``projection_bytes`` (its
    projection buffers), ``temporary[name]`` (temporary disk), ``proj_dim`` (the projection it
    applies), ``candidates`` (how many reach a second stage) and ``score_rows`` (rows of
    scores.jsonl; default the pool)."""

    def __init__(self, cfg: SelectConfig, dom_ex, pool_ex, dom_stats, pool_stats, stages: list, facts: dict | None, cal: dict | None, costs, device, dtype):
        self.cfg, self.dom_stats, self.pool_stats, self.stages, self.facts, self.cal = cfg, dom_stats, pool_stats, stages, facts, cal
        self.device = device
        self.dom_len = [len(e.input_ids) for e in dom_ex]
        self.dom_tr = [sum(e.train_mask[1:]) for e in dom_ex]
        # the pool as (lengths, trained-token counts): the dry run's scan keeps nothing else
        pool_len, pool_tr = pool_ex if isinstance(pool_ex, tuple) else (lengths_of(pool_ex), trained_of(pool_ex))
        self.pool_len = np.asarray(pool_len).tolist()
        self.pool_tr = np.asarray(pool_tr).tolist()
        self.n_pool = len(self.pool_len)
        self.shards = [range(s0, min(self.n_pool, s0 + cfg.shard_size)) for s0 in range(0, self.n_pool, cfg.shard_size)]
        self.params = facts["params"] if facts else None
        self.grad_dim = facts["grad_dim"] if facts else None
        self.costs = costs  # measured memory costs per kind of pass (the preflight's), or None without a model
        self._rt = Runtime(device=device, dtype=dtype, batch_size=cfg.batch_size, max_batch_tokens=cfg.max_batch_tokens, memory=costs)
        self.activations: dict[str, float] = {}  # stage -> predicted live bytes of its largest batch (ntkselect.model.memory)
        self.projection_bytes = 0
        self.temporary: dict[str, int] = {}
        self.proj_dim = 0
        self.candidates: int | None = None
        self.score_rows: int | None = None

    def batches(self, kind: str, lengths, trained, groups=None) -> list[tuple[int, int, int]]:
        """(B, L, N) of every batch the run makes of these examples for this kind of pass (per shard for the pool)."""
        out = []
        for g in groups or [range(len(lengths))]:
            lg, tg = [lengths[i] for i in g], [trained[i] for i in g]
            for b in make_batches(lg, self.cfg.batch_size, self.cfg.max_batch_tokens, fits=self._rt.fits(kind), trained=tg):
                out.append((len(b), max(lg[i] for i in b), sum(tg[i] for i in b)))
        return out

    def worst(self, kind: str, shapes) -> float:
        """Live bytes of the largest of these batches for this kind of pass."""
        return max((self.costs.passes[kind].bytes(*x) for x in shapes), default=0.0)

    @staticmethod
    def padded(shapes) -> int:
        return sum(B * L for B, L, _ in shapes)

    def _model_plan(self, what: str) -> tuple[dict, dict]:
        """(facts, calibration): there only when the method uses the model (its registration's ``uses_model``)."""
        if self.facts is None or self.cal is None:
            raise TypeError(f"PlanBuilder.{what} prices work of the model, and --method {self.cfg.method} uses none (uses_model=False)")
        return self.facts, self.cal

    def stage(self, name: str, passes: str, tokens: float, padded: float, extra_flops: float = 0.0, extra_seconds: float = 0.0) -> None:
        """A stage of passes through the model: FLOPs ~ 2 P per padded token forward, x 3 with backward."""
        facts, cal = self._model_plan("stage")
        flops = (2 if passes == "forward" else 6) * facts["params"] * padded + extra_flops
        self.add_stage(name, passes, tokens, padded, flops, flops / cal["flops_per_s"] + extra_seconds)

    def add_stage(self, name: str, passes: str, tokens: float, padded: float | None = None, flops: float | None = None, seconds: float = 0.0) -> None:
        self.stages.append(
            {
                "stage": name,
                "pass": passes,
                "tokens": int(round(tokens)),
                "padded_tokens": None if padded is None else int(round(padded)),
                "flops": flops,
                "seconds": seconds,
                "measured": False,
            }
        )

    def block_seconds(self) -> tuple[float, int]:
        """(seconds, rows) of one block of the ``proj_dim`` projection, timed once on the run's device."""
        _, cal = self._model_plan("block_seconds")
        if "block_seconds" not in cal:
            cal.update(_time_block(self.device, self.proj_dim))
        return cal["block_seconds"], cal["block_rows"]


def estimate(cfg: SelectConfig) -> dict:
    """The plan of a selection with ``cfg``: tokens, time, peak memory and disk per stage."""
    cfg.validate()
    for line in ignored_options(cfg):  # e.g. --kernel trace with --method ntk
        logging.getLogger(__name__).warning(line)
    spec = selector_spec(cfg.method)
    check_paths(cfg.out, SELECT, {"--domain": cfg.domain, "--pool": cfg.pool})  # what the real run would refuse
    out_state = _out_state(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # -- inputs, exactly as a run reads them ---------------------------------------------
    t = time.perf_counter()
    domain = load_records(cfg.domain)
    dom_texts = {record_text(r.raw) for r in domain}
    keep = getattr(cfg, "keep_domain_duplicates", False)
    setup = RunSetup.of(cfg)  # the model's folder, tokenizer, device and precision, resolved once for the plan and its preflight
    tokenizer = setup.tokenizer
    dom_ex, dom_stats = tokenize_records(domain, tokenizer, cfg.max_length, cfg.template)
    # the pool in one streamed pass, as a run reads it, keeping only its per-record numbers
    drop = [] if keep else [("duplicates_of_domain", lambda r: record_text(r.raw) in dom_texts)]

    def check(rows: int, records: int) -> None:
        if cfg.n > rows:
            dropped = records - rows
            why = f", after excluding {dropped} duplicates of domain records" if dropped else ""
            raise NtkSelectError(f"--n {cfg.n} is larger than the pool ({rows} usable records in {cfg.pool}{why}); lower --n or add candidates")

    scan = scan_pool(cfg.pool, tokenizer, cfg.max_length, cfg.template, drop, progress=True, check=check, workers=cfg.threads or default_workers())
    pool_stats = scan.stats
    n_pool = int(len(scan.lengths))
    load_seconds = time.perf_counter() - t
    dom_bytes = sum(len(json.dumps(r.raw, ensure_ascii=False, default=str)) + 1 for r in domain)
    data = {
        "domain": {"path": cfg.domain, "records": len(domain), **dom_stats.to_dict(), "bytes": dom_bytes},
        "pool": {
            "path": cfg.pool,
            "records_in_file": scan.records_in_file,
            "records": n_pool,
            "excluded_duplicates_of_domain": scan.records_in_file - n_pool,
            **pool_stats.to_dict(),
            "bytes": scan.bytes,
        },
        "n": cfg.n,
        "m": None,
    }

    device = setup.device
    # a method without a model holds no weights: float32 ones, and no checkpoint is read for their dtype
    model_dtype = setup.model_dtype if spec.uses_model else torch.float32
    dtype = setup.dtype if spec.uses_model else resolve_precision(cfg.precision, device, model_dtype)
    uses_model = spec.uses_model
    notes: list[str] = []
    process_bytes = rss_bytes()  # this process now; with a model, replaced by what it holds after the preflight (below)
    # the model, the adapter and a tiny batch through every path the run will use: an unsupported model stops the dry run too
    pre = preflight_select(cfg, dom_ex, tokenizer.pad_token_id, log=notes.append, setup=setup) if uses_model else None
    facts = model_facts(cfg) if uses_model else None
    cal = calibrate(device, dtype) if uses_model else None

    # -- stages: tokens, FLOPs, seconds -------------------------------------------------
    stages = [
        {
            "stage": "load",
            "pass": "read + tokenize",
            "tokens": dom_stats.tokens + pool_stats.tokens,
            "padded_tokens": None,
            "flops": None,
            "seconds": load_seconds,
            "measured": True,
        }
    ]
    plan = PlanBuilder(cfg, dom_ex, (scan.lengths, scan.trained), dom_stats, pool_stats, stages, facts, cal, pre.memory if pre else None, device, dtype)
    act = plan.activations
    if uses_model:  # the shared work: the warm-up, and stage 1's embeddings for the methods that use them
        dom_len, dom_tr = plan.dom_len, plan.dom_tr
        if cfg.warmup_epochs > 0:
            wopts = WarmupOptions(epochs=cfg.warmup_epochs, batch_size=cfg.warmup_batch_size, seed=cfg.seed)
            warm = [
                (len(p), max(dom_len[i] for i in p), sum(dom_tr[i] for i in p))
                for idx in warmup_batches(len(dom_ex), wopts)
                for p in micro_batches(dom_ex, idx, plan._rt)
            ]
            plan.stage("warm-up", "forward+backward", cfg.warmup_epochs * dom_stats.tokens, plan.padded(warm))
            act["warm-up"] = plan.worst("warmup", warm)
        if spec.uses_embeddings:
            fwd = plan.batches("forward", dom_len, dom_tr) + plan.batches("forward", plan.pool_len, plan.pool_tr, plan.shards)
            plan.stage("stage 1", "forward", dom_stats.tokens + pool_stats.tokens, plan.padded(fwd))
            act["stage 1"] = plan.worst("forward", fwd)
    if spec.cost is not None:  # the method's own work, from its cost model
        spec.cost(plan)
    proj = plan.proj_dim
    data["m"] = plan.candidates

    # -- memory -------------------------------------------------------------------------
    # resident memory: this process (Python, torch, the tokenizer, the data; with a model, as the
    # preflight left it, less the weights), the weights, the LoRA and AdamW state, the largest
    # batch's activations (measured per token by the preflight, times the allocator's share) and the
    # projection buffers
    factor = overhead(device) if uses_model else 1.0
    memory: dict[str, Any] = {  # bytes; by_stage a dict, budget None without a cap
        "process": process_bytes,
        "weights": 0,
        "lora_and_optimizer": 0,
        "activations": int(factor * max(act.values(), default=0.0)),
        "projection": plan.projection_bytes,
    }
    if uses_model:
        assert facts is not None and pre is not None  # both made above for a method that uses the model
        # in --model-dtype; autocast only changes the matmuls
        itemsize = torch.empty((), dtype=model_dtype).element_size()
        # the weights, plus the merged W + sBA of every adapted layer that stages 1 and 2 hold
        memory["weights"] = itemsize * (facts["params"] + facts["adapted_weights"])
        # the preflight ran every path once with the model loaded: what the process holds then (libraries initialised, the
        # allocator's first arenas) is what a run holds before its stages; less the weights where they are on the host
        host_weights = memory["weights"] if device.type == "cpu" else 0
        memory["process"] = max(process_bytes, pre.rss - host_weights) if pre.rss else process_bytes
        memory["lora_and_optimizer"] = 4 * 4 * facts["grad_dim"]  # parameters, gradients, AdamW m and v
    if device.type == "cuda":
        # the device holds the weights, the LoRA state, the activations and the projection; the host process is apart
        memory["host"] = memory.pop("process")
        memory["peak"] = sum(memory.values()) - memory["host"]
    else:
        memory["peak"] = sum(memory.values())
    static = memory["peak"] - memory["activations"]
    memory["by_stage"] = {k: int(static + factor * v) for k, v in act.items()}
    memory["budget"] = int(pre.memory.budget * factor) if pre and pre.memory and pre.memory.budget != float("inf") else None

    # -- disk ---------------------------------------------------------------------------
    sel_bytes = int(round(cfg.n * scan.bytes / max(1, n_pool))) + cfg.n * _SELECTION_FIELDS_BYTES
    hidden = facts["hidden_size"] if facts else 0
    # temporary arrays a run writes into --out (memory-mapped, removed at the end): stage 1's (n_pool, hidden) float32
    # embeddings, and what the method's cost model adds (every plan lists _TEMPORARY, 0 where unused)
    temporary = {**dict.fromkeys(_TEMPORARY, 0), "embeddings": n_pool * hidden * 4 if spec.uses_embeddings else 0, **plan.temporary}
    # the tokenised pool (ntkselect.data.pool): int32 ids + uint8 masks per token, each record's JSON and id,
    # and 64 bytes of offsets, line and counts per record; kept in --out until the run has finished
    temporary["tokenised_pool"] = 5 * pool_stats.tokens + scan.bytes + n_pool * (64 + _ID_BYTES)
    disk = {
        "adapter": 4 * facts["grad_dim"] if facts is not None else 0,  # facts: only for a method that uses the model
        **temporary,
        "scores": (plan.score_rows if plan.score_rows is not None else n_pool) * _SCORE_ROW_BYTES,
        "selected": sel_bytes,
        "train": dom_bytes + sel_bytes - cfg.n * _SELECTION_FIELDS_BYTES,
        "manifest": _MANIFEST_BYTES,
    }
    disk["outputs"] = disk["adapter"] + disk["scores"] + disk["selected"] + disk["train"] + disk["manifest"]
    disk["temporary"] = sum(temporary.values())
    disk["peak"] = disk["outputs"] + disk["temporary"]

    warnings_: list[str] = []
    if disk["peak"] > out_state["free_bytes"]:
        warnings_.append(f"--out needs about {_bytes(disk['peak'])} but its disk has {_bytes(out_state['free_bytes'])} free")
    if dom_stats.truncated or pool_stats.truncated:
        warnings_.append(
            f"{dom_stats.truncated} domain and {pool_stats.truncated} pool examples are longer than --max-length {cfg.max_length} and will be truncated"
        )
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if memory["peak"] > total:
            warnings_.append(f"peak memory ~{_bytes(memory['peak'])} exceeds the GPU's {_bytes(total)}; lower --max-batch-tokens or --batch-size")
    timed = [s["seconds"] for s in stages]
    return {
        "method": cfg.method,
        "device": str(device),
        "precision": str(dtype).replace("torch.", ""),
        "model_dtype": str(model_dtype).replace("torch.", ""),
        "model": facts,
        "lora": {"r": cfg.lora_r, "target_modules": cfg.lora_target_modules, "grad_dim": facts["grad_dim"] if facts else 0},
        "proj_dim": proj,
        "data": data,
        "calibration": cal,
        "stages": stages,
        "total_seconds": sum(timed),
        "memory": memory,
        "disk": disk,
        "out": out_state,
        "warnings": warnings_,
        "preflight": {"seconds": pre.seconds, "paths": list(pre.paths), "notes": notes} if pre else None,
        "assumptions": [
            f"load: measured, not estimated: the whole pool was read and tokenised, as the run will ({n_pool / max(load_seconds, 1e-9):,.0f} records/s, "
            f"{scan.workers} process{'es' if scan.workers > 1 else ''}); every other stage is extrapolated from the pool's exact token counts",
            "time: FLOPs ~ 2 x parameters x padded tokens forward, x 3 for forward + backward, at the rate of one timed matmul; "
            "a rough lower bound: a small model runs well below the matmul rate (on a CPU, expect 2-4 times longer)",
            "stage 2 scores M candidates of the pool's mean length (which M is known only after stage 1)",
            "memory: this process's resident memory after the preflight (less the weights; on a GPU counted apart as host memory), "
            "the weights in --model-dtype, the LoRA and AdamW state, and the "
            "largest batch's activations, from the per-token costs the preflight measured on tiny batches (ntkselect.model.memory) times "
            "the allocator's share; batches of stages 1 and 2, LESS and warm-up micro-batches are sized to the memory budget",
        ],
    }


# --------------------------------------------------------------------------- formatting


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def format_plan(plan: dict) -> str:
    """The plan as the table ``ntkselect select --dry-run`` prints."""
    d, f = plan["data"], plan["model"]
    lines = [f"ntkselect: dry run of --method {plan['method']} on {plan['device']} ({plan['precision']}); nothing was trained or written"]
    if f:
        lines.append(
            f"  model     {f['path']} ({f['type']}): {f['params'] / 1e6:.1f}M parameters, hidden {f['hidden_size']}, "
            f"{f['layers']} layers, vocabulary {f['vocab_size']}"
        )
        lines.append(
            f"  LoRA      r={plan['lora']['r']} on {plan['lora']['target_modules']}: {f['lora_modules']} modules, "
            f"gradient dimension {f['grad_dim']:,}" + (f", projected to {plan['proj_dim']}" if plan["proj_dim"] else " (exact kernel)")
        )
    dom, pool = d["domain"], d["pool"]
    lines.append(
        f"  domain    {dom['records']} records, {dom['tokens']:,} tokens ({dom['trained_tokens']:,} trained, {dom['truncated']} truncated), "
        f"template {dom['template']}"
    )
    lines.append(
        f"  pool      {pool['records']} usable of {pool['records_in_file']} records ({pool['excluded_duplicates_of_domain']} duplicates of the "
        f"domain excluded), {pool['tokens']:,} tokens ({pool['truncated']} truncated)"
    )
    lines.append(f"  select    N = {d['n']}" + (f"; stage 1 keeps M = {d['m']}" if d["m"] is not None else ""))
    lines.append("")
    lines.append(f"  {'stage':<10} {'pass':<17} {'tokens':>12} {'padded':>12} {'TFLOP':>9} {'time':>10}")
    for s in plan["stages"]:
        padded = f"{s['padded_tokens']:,}" if s["padded_tokens"] is not None else "-"
        flops = f"{s['flops'] / 1e12:.3f}" if s["flops"] is not None else "-"
        when = _seconds(s["seconds"]) + (" (done)" if s["measured"] else "")
        lines.append(f"  {s['stage']:<10} {s['pass']:<17} {s['tokens']:>12,} {padded:>12} {flops:>9} {when:>10}")
    lines.append(f"  {'total':<10} {'':<17} {'':>12} {'':>12} {'':>9} {'>= ' + _seconds(plan['total_seconds']):>10}")
    if plan["calibration"]:
        c = plan["calibration"]
        lines.append(
            f"  rate      {c['flops_per_s'] / 1e9:.1f} GFLOP/s measured with a {c['matmul']} matmul"
            + (f"; one projection block of {c['block_rows']} rows: {c['block_seconds'] * 1e3:.0f} ms" if "block_seconds" in c else "")
        )
    mem = plan["memory"]
    lines.append("")
    lines.append(
        f"  memory    peak ~{_bytes(mem['peak'])} {'on ' + plan['device'] if 'host' in mem else 'resident'}: "
        + (f"process {_bytes(mem['process'])}, " if "process" in mem else "")
        + f"weights {_bytes(mem['weights'])} ({plan['model_dtype']}), "
        f"LoRA + AdamW state {_bytes(mem['lora_and_optimizer'])}, activations of the largest batch {_bytes(mem['activations'])}, "
        f"projection {_bytes(mem['projection'])}" + (f"; host process {_bytes(mem['host'])}" if "host" in mem else "")
    )
    if mem.get("by_stage"):
        lines.append(
            "  by stage  "
            + ", ".join(f"{k} ~{_bytes(v)}" for k, v in mem["by_stage"].items())
            + (f"; batches sized to a {_bytes(mem['budget'])} activation budget" if mem.get("budget") else "")
        )
    k = plan["disk"]
    lines.append(
        f"  disk      ~{_bytes(k['peak'])} in {plan['out']['path']} ({plan['out']['state']}; {_bytes(plan['out']['free_bytes'])} free): "
        f"adapter {_bytes(k['adapter'])}, selected.jsonl {_bytes(k['selected'])}, train.jsonl {_bytes(k['train'])}, "
        f"scores.jsonl {_bytes(k['scores'])}; temporary: embeddings {_bytes(k['embeddings'])}"
        + (f", LESS features {_bytes(k['less_features'])}" if k.get("less_features") else "")
        + "".join(f", {name.replace('_', ' ')} {_bytes(k[name])}" for name in k if name not in _DISK_LISTED and k[name])
    )
    if plan.get("preflight"):
        p = plan["preflight"]
        lines.append(f"  preflight the model, its adapter and a tiny batch passed every path the run uses ({', '.join(p['paths'])}) in {p['seconds']:.1f} s")
        lines.extend(f"  note      {n.removeprefix('ntkselect: note: ')}" for n in p["notes"])
    for w in plan["warnings"]:
        lines.append(f"  warning   {w}")
    lines.append("")
    lines.extend(f"  note      {a}" for a in plan["assumptions"])
    return "\n".join(lines)
