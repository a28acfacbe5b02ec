"""The whole selection: warm-up → stage 1 → stage 2 → outputs.

:func:`select` is what ``ntkselect select`` calls. Every output is written atomically and
``manifest.json`` is written last, so a folder with a manifest holds a finished run.
"""

from __future__ import annotations

import collections
import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import SelectConfig
from .data import Record, load_records, record_text, token_convention, tokenize_records
from .errors import NtkSelectError
from .io import atomic_replace_dir, atomic_write_json, atomic_write_jsonl, sha256_path
from .model import load_model, load_tokenizer, resolve_model
from .runtime import Runtime, resolve_device, resolve_precision
from .stage1 import embed, preselect
from .stage2 import run_stage2
from .warmup import WarmupOptions, add_lora, warmup

__all__ = ["SelectionResult", "select", "package_versions", "summarise"]

OUTPUTS = ("selected.jsonl", "scores.jsonl", "train.jsonl", "manifest.json", "adapter")


@dataclass
class SelectionResult:
    out: Path
    selected: list[Record]  # in rank order
    scores: np.ndarray  # (N,) float64, the selected examples' scores
    manifest: dict = field(default_factory=dict)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("ntkselect", "torch", "transformers", "peft", "faiss-cpu", "numpy", "safetensors", "pyarrow", "datasets"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _prepare_out(cfg: SelectConfig, log=print) -> Path:
    """Check that --out can be written; refuse to replace a finished run without --overwrite.

    A folder with outputs but no manifest holds an unfinished run (the manifest is written
    last); nothing in it is trusted, so it is cleared and the run starts over."""
    out = Path(cfg.out)
    if (out / "manifest.json").exists() and not cfg.overwrite:
        raise NtkSelectError(f"{out} already holds a finished run (manifest.json); pass --overwrite to replace it or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise NtkSelectError(f"cannot write to --out {out}: {err.strerror or err}; choose a writable folder") from None
    stale = [o for o in OUTPUTS if (out / o).exists()]
    if stale and not (out / "manifest.json").exists():
        log(f"ntkselect: {out} holds an unfinished run ({', '.join(stale)}); starting over")
    for o in stale:
        p = out / o
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return out


def _model_fingerprint(path: str) -> dict:
    p = Path(path)
    if not p.is_dir():
        return {"path": path}
    files = {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()}
    cfg = p / "config.json"
    return {"path": str(p), "config_sha256": sha256_path(cfg) if cfg.exists() else None, "file_sizes": files}


def _group(rec: Record) -> str:
    raw = rec.raw
    return str(raw.get("subject") or raw.get("source") or raw.get("category") or Path(rec.path).name)


def summarise(manifest: dict) -> str:
    """A few lines for a person: where the selection came from, the scores, the time."""
    s = manifest["summary"]
    lines = [f"ntkselect: selected {s['n_selected']} of {s['n_pool']} pool examples for {s['n_domain']} domain examples -> {manifest['out']}"]
    if len(s.get("by_source", {})) > 1:
        lines.append("  selected by source (selected / in pool): " + ", ".join(f"{k} {a} / {b}" for k, (a, b) in s["by_source"].items()))
    lines.append("  selected by subject/source (selected / in pool):")
    for name, (k, tot) in list(s["composition"].items())[:12]:
        lines.append(f"    {name:<40} {k:>5} / {tot}")
    if len(s["composition"]) > 12:
        lines.append(f"    ... {len(s['composition']) - 12} more in manifest.json")
    lo, hi = s["score_range_selected"]
    lines.append(f"  NTK scores: selected {lo:.4g} .. {hi:.4g}; all stage-2 candidates {s['score_range_all'][0]:.4g} .. {s['score_range_all'][1]:.4g}")
    lines.append("  time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in manifest["timings"].items()))
    return "\n".join(lines)


def select(cfg: SelectConfig, log=print) -> SelectionResult:
    cfg.validate()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = _prepare_out(cfg, log)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # -- inputs ---------------------------------------------------------------------------
    t = time.perf_counter()
    domain = load_records(cfg.domain)
    pool_all = load_records(cfg.pool)
    dom_texts = {record_text(r.raw) for r in domain}
    pool = [r for r in pool_all if record_text(r.raw) not in dom_texts]
    n_dup = len(pool_all) - len(pool)
    if n_dup:
        log(f"ntkselect: excluded {n_dup} pool records that duplicate a domain record exactly")
    if cfg.n > len(pool):
        raise NtkSelectError(f"--n {cfg.n} is larger than the pool ({len(pool)} usable records in {cfg.pool}); lower --n or add candidates")
    tokenizer = load_tokenizer(cfg.model)
    dom_ex, dom_stats = tokenize_records(domain, tokenizer, cfg.max_length, cfg.template)
    pool_ex, pool_stats = tokenize_records(pool, tokenizer, cfg.max_length, cfg.template)
    for name, st in (("domain", dom_stats), ("pool", pool_stats)):
        if st.truncated:
            log(f"ntkselect: truncated {st.truncated} of {st.examples} {name} examples to --max-length {cfg.max_length}")
    timings["load"] = time.perf_counter() - t

    device = resolve_device(cfg.device)
    rt = Runtime(device=device, dtype=resolve_precision(cfg.precision, device), batch_size=cfg.batch_size,
                 max_batch_tokens=cfg.max_batch_tokens, padding_side=cfg.padding_side, pad_id=tokenizer.pad_token_id)

    # -- warm-up --------------------------------------------------------------------------
    t = time.perf_counter()
    model_path = resolve_model(cfg.model)
    model = load_model(cfg.model).to(device)
    wopts = WarmupOptions(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.target_modules(),
                          epochs=cfg.warmup_epochs, lr=cfg.warmup_lr, batch_size=cfg.warmup_batch_size, seed=cfg.seed)
    model = add_lora(model, wopts)
    warm = warmup(model, dom_ex, wopts, rt)
    tmp_adapter = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out))
    model.save_pretrained(tmp_adapter)
    atomic_replace_dir(tmp_adapter, out / "adapter")
    timings["warmup"] = time.perf_counter() - t

    # -- stage 1 --------------------------------------------------------------------------
    t = time.perf_counter()
    m = int(round(cfg.preselect_factor * cfg.n))
    with tempfile.TemporaryDirectory(prefix=".work-", dir=out) as work:
        dom_emb = embed(model, dom_ex, rt, desc="stage 1: domain embeddings")
        pool_emb = embed(model, pool_ex, rt, out_path=os.path.join(work, "pool_emb.npy"), desc="stage 1: pool embeddings")
        s1 = preselect(dom_emb, pool_emb, m, cfg.knn_k)
        del pool_emb
    timings["stage1"] = time.perf_counter() - t
    log(f"ntkselect: stage 1 kept {len(s1.selected)} candidates (K = {s1.k_used}, {int((s1.votes > 0).sum())} got a vote)")

    # -- stage 2 --------------------------------------------------------------------------
    t = time.perf_counter()
    cand = s1.selected
    s2 = run_stage2(model, dom_ex, [pool_ex[i] for i in cand], rt, proj_dim=cfg.proj_dim, seed=cfg.seed,
                    domain_ids=[r.id for r in domain], candidate_ids=[pool[int(i)].id for i in cand])
    timings["stage2"] = time.perf_counter() - t

    # -- outputs --------------------------------------------------------------------------
    t = time.perf_counter()
    order = np.lexsort((cand, -s2.scores))  # best score first, then earliest in the pool
    chosen = order[: cfg.n]
    chosen_set = set(chosen.tolist())
    selected = [pool[int(cand[j])] for j in chosen]
    sel_scores = s2.scores[chosen]
    atomic_write_jsonl(out / "selected.jsonl", ({**r.raw, "ntk_score": float(s), "ntk_rank": k + 1} for k, (r, s) in enumerate(zip(selected, sel_scores))))
    atomic_write_jsonl(out / "scores.jsonl", (
        {"id": pool[int(cand[j])].id, "votes": int(s1.votes[cand[j]]), "ntk_score": float(s2.scores[j]), "selected": bool(j in chosen_set)} for j in order))
    atomic_write_jsonl(out / "train.jsonl", [r.raw for r in domain] + [r.raw for r in selected])
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    pool_groups = collections.Counter(_group(r) for r in pool)
    sel_groups = collections.Counter(_group(r) for r in selected)
    src_pool = collections.Counter(str(r.raw.get("source", Path(r.path).name)) for r in pool)
    src_sel = collections.Counter(str(r.raw.get("source", Path(r.path).name)) for r in selected)
    manifest = {
        "tool": "ntkselect",
        "method": "ntk",
        "complete": True,
        "out": str(out),
        "command": " ".join(sys.argv),
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": package_versions(),
        "inputs": {
            "domain": {"path": os.path.abspath(cfg.domain), "sha256": sha256_path(cfg.domain), "records": len(domain)},
            "pool": {"path": os.path.abspath(cfg.pool), "sha256": sha256_path(cfg.pool), "records": len(pool_all),
                     "excluded_duplicates_of_domain": n_dup},
            "model": _model_fingerprint(model_path),
        },
        "token_convention": token_convention(dom_stats.template, tokenizer),
        "tokens": {"domain": dom_stats.to_dict(), "pool": pool_stats.to_dict()},
        "runtime": rt.describe(),
        "warmup": warm,
        "stage1": {"m": int(len(s1.selected)), "k_requested": cfg.knn_k, "k_used": s1.k_used, "voted_candidates": int((s1.votes > 0).sum()),
                   "tie_break": "votes desc, best cosine desc, pool position asc"},
        "stage2": {"grad_dim": s2.grad_dim, "proj_dim": s2.proj_dim, "projector": s2.projector, "seconds": s2.seconds, "tokens": s2.tokens,
                   "objective": "f(x) = (1/T) sum_t sum_k logit[t,k], via h_t . sum_k w_k",
                   "score": "mean_i <phi(g(x_i)), phi(g(c_j))> = <phi*(phi(mean_i g(x_i))), g(c_j)>",
                   "tie_break": "score desc, pool position asc"},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "summary": {
            "n_domain": len(domain), "n_pool": len(pool), "n_selected": len(selected),
            "composition": {k: [sel_groups[k], pool_groups[k]] for k, _ in sorted(pool_groups.items(), key=lambda kv: (-sel_groups[kv[0]], kv[0]))},
            "by_source": {k: [src_sel[k], n] for k, n in sorted(src_pool.items(), key=lambda kv: (-src_sel[kv[0]], kv[0]))},
            "score_range_selected": [float(sel_scores.min()), float(sel_scores.max())],
            "score_range_all": [float(s2.scores.min()), float(s2.scores.max())],
        },
    }
    atomic_write_json(out / "manifest.json", manifest)
    return SelectionResult(out=out, selected=selected, scores=sel_scores, manifest=manifest)
