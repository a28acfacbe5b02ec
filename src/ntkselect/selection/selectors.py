"""Selectors: NTK-Selector and the baselines it is compared with, behind one interface.

Every selector takes the same inputs (a :class:`SelectionContext`: the domain set D, the pool
C, the tokenized examples, the run options) and returns the same output (a :class:`Ranking`:
pool indices best first, with their scores), so ``ntkselect select --method X`` writes the
same files for every X and ``ntkselect evaluate`` compares them on equal terms.

The context does the expensive shared work lazily and once: the warm-up LoRA fine-tune on D
(used by ``ntk``, ``less``, ``embedding`` and ``tsds``) and the stage-1 embeddings (``ntk``,
``embedding`` and ``tsds``). Each selector reports the shared parts it used, so its cost (wall time and
tokens processed) counts them as if it had run alone.

==========  ================================================================================
random      a seeded uniform sample of the pool
embedding   stage 1's embeddings alone: top N by mean cosine to D
bm25        lexical: mean BM25 score of each candidate over the domain examples as queries
less        LESS (Xia et al. 2024): warm-up LoRA, Adam-preconditioned per-example loss
            gradients of the candidates, SGD gradients of D, Rademacher-projected, cosine,
            max over D
tsds        TSDS (Liu et al. 2024) on stage 1's embeddings: optimal transport to D with a KDE
            near-duplicate penalty gives a probability per candidate (:mod:`ntkselect.selection.tsds`);
            N distinct drawn without replacement in proportion to it
ntk         NTK-Selector: stage-1 votes keep M = factor x N, stage-2 Jacobian-free NTK mean score
==========  ================================================================================
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from ntkselect.config import SelectConfig
from ntkselect.data.records import Record, record_text
from ntkselect.errors import NtkSelectError
from ntkselect.grads.fused import flatten_grads, lora_parameters
from ntkselect.model.loading import load_model
from ntkselect.files import atomic_open, atomic_write_json
from ntkselect.grads.projection import RademacherProjector
from ntkselect.model.runtime import Runtime
from ntkselect.runs.shards import LocalExecutor, RayExecutor, ShardSpec, ShardStore, digest, plan_shards, run_sharded
from ntkselect.selection.ntk.stage1 import embed, preselect
from ntkselect.selection.ntk.stage2 import domain_vector, projected_features
from ntkselect.selection.tsds import draw_order, tsds
from ntkselect.training.warmup import WarmupOptions, add_lora, per_example_loss, warmup

__all__ = ["Ranking", "SelectionContext", "Selector", "SELECTORS", "get_selector", "METHODS"]

logger = logging.getLogger(__name__)


@dataclass
class Ranking:
    """A selector's output: pool indices best first (at least N of them) and their scores."""

    order: np.ndarray  # (K,) int64 pool indices, best first, K >= N
    scores: np.ndarray  # (K,) float64, the score of order[j]
    columns: dict = field(default_factory=dict)  # extra per-candidate columns for scores.jsonl, aligned with order
    info: dict = field(default_factory=dict)  # for the manifest
    seconds: float = 0.0  # this selector's own work
    tokens: int = 0  # tokens this selector's own work processed
    shared: tuple[str, ...] = ()  # shared context work it relies on ("warmup", "embeddings")
    timings: dict = field(default_factory=dict)  # per-stage seconds for the manifest (default: {"select": seconds})


def _ordered(idx: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by score descending, then by pool position: deterministic under ties."""
    idx = np.asarray(idx, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    o = np.lexsort((idx, -scores))
    return idx[o], scores[o]


class SelectionContext:
    """Inputs of a selection plus the shared, lazily computed work (warm-up, embeddings).

    With a ``work_dir`` every expensive piece is kept on disk with a completion marker: the
    warm-up adapter and its optimizer moments, each shard of pool embeddings, stage-2 scores
    and LESS features (:mod:`ntkselect.runs.shards`). ``key`` names what the run is computed from
    (configuration, input and model hashes); a marker with another key is never trusted, so a
    rerun resumes exactly where a crash stopped and cannot mix results of different runs."""

    def __init__(self, cfg: SelectConfig, domain: Sequence[Record], pool: Sequence[Record], dom_ex: Sequence, pool_ex: Sequence,
                 rt: Runtime, log=None, work_dir: str | None = None, key: str = "", log_path: str | None = None):
        self.cfg, self.domain, self.pool, self.dom_ex, self.pool_ex, self.rt, self.log = cfg, domain, pool, dom_ex, pool_ex, rt, log or logger.info
        self.work_dir = work_dir
        self.key = key or digest(cfg.to_dict())
        self.store = ShardStore(Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="ntkselect-")), log_path)
        self._model = None
        self._fresh = None  # a checked fresh model to use instead of loading one (adopt)
        self._adam: dict | None = None
        self._emb: tuple[np.ndarray, list[np.ndarray]] | None = None
        self._executor = None
        self.warmup_summary: dict | None = None
        self.shared_seconds: dict[str, float] = {}
        self.shared_tokens: dict[str, int] = {}
        self.resumed: dict[str, bool] = {}

    @property
    def has_model(self) -> bool:
        return self._model is not None

    def adopt(self, checked) -> None:
        """Use the preflight's model (the base model with this run's fresh adapter) instead of
        loading it again, and its measured memory costs for the batches (:mod:`ntkselect.model.memory`)."""
        if checked is None:
            return
        self._fresh = checked.model
        self.rt.memory = checked.memory

    def _lora_options(self) -> WarmupOptions:
        cfg = self.cfg
        return WarmupOptions(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.target_modules(),
                             epochs=cfg.warmup_epochs, lr=cfg.warmup_lr, batch_size=cfg.warmup_batch_size, seed=cfg.seed)

    def model(self):
        """The model with the warmed-up LoRA adapter (trained on D once, kept on disk, reused)."""
        if self._model is None:
            from peft import get_peft_model_state_dict, set_peft_model_state_dict

            cfg, t = self.cfg, time.perf_counter()
            wdir = self.store.root / "warmup"
            marker = wdir / "warmup.done"
            fresh, self._fresh = self._fresh, None
            model = fresh if fresh is not None else add_lora(load_model(cfg.model).to(self.rt.device), self._lora_options())
            done = marker.exists() and json.loads(marker.read_text()).get("key") == self.key
            if done:  # resume: the adapter and moments of the finished warm-up, bit for bit
                state = torch.load(wdir / "state.pt", map_location="cpu", weights_only=True)
                set_peft_model_state_dict(model, state["adapter"])
                self._adam = {k: tuple(v) for k, v in state["adam"].items()}
                self._adam.update(state["adam_meta"])
                self.warmup_summary = json.loads(marker.read_text())["summary"]
                model.eval()
                self.resumed["warmup"] = True
                self.log("ntkselect: warm-up already done, loaded its adapter")
            else:
                self._adam = {}
                self.warmup_summary = warmup(model, self.dom_ex, self._lora_options(), self.rt, adam_state=self._adam)
                adam = {k: list(v) for k, v in self._adam.items() if not k.startswith("_")}
                meta = {k: v for k, v in self._adam.items() if k.startswith("_")}
                with atomic_open(wdir / "state.pt", "wb", encoding=None) as f:
                    torch.save({"adapter": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}, "adam": adam, "adam_meta": meta}, f)
                atomic_write_json(marker, {"key": self.key, "summary": self.warmup_summary})
                self.store.log({"event": "warmup_done", "seconds": round(self.warmup_summary.get("seconds", 0.0), 3)})
            self._model = model
            self.shared_seconds["warmup"] = (self.warmup_summary or {}).get("seconds", 0.0) if done else time.perf_counter() - t
            steps = self.warmup_summary["steps"] * cfg.warmup_batch_size
            self.shared_tokens["warmup"] = int(round(sum(len(e.input_ids) for e in self.dom_ex) * steps / max(1, len(self.dom_ex))))
        return self._model

    def adam_state(self) -> dict:
        self.model()
        return self._adam or {}

    def executor(self):
        """Where shards run: this process, or Ray actors that rebuild the warmed-up model."""
        if self._executor is None:
            if self.cfg.executor == "ray":
                from peft import get_peft_model_state_dict

                model, rt = self.model(), self.rt
                spec = {"model": self.cfg.model, "lora": dataclasses.asdict(self._lora_options()),
                        "adapter_state": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()},
                        "dtype": str(rt.dtype).replace("torch.", ""), "batch_size": rt.batch_size, "max_batch_tokens": rt.max_batch_tokens,
                        "padding_side": rt.padding_side, "pad_id": rt.pad_id, "memory": rt.memory, "device_type": rt.device.type}
                self._executor = RayExecutor(spec, self.cfg.ray_address or None, self.cfg.ray_workers, log=self.log)
            else:
                self._executor = LocalExecutor(self.model, self.rt)
        return self._executor

    def shards(self, n: int) -> list[ShardSpec]:
        return plan_shards(n, self.cfg.shard_size)

    def embeddings(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """(n_domain, d) and the pool's (rows, d) float32 shards: stage-1 embeddings of the warmed-up model."""
        if self._emb is None:
            model = self.model()
            t = time.perf_counter()
            dom = embed(model, self.dom_ex, self.rt, desc="stage 1: domain embeddings", ids=[r.id for r in self.domain])
            pool = run_sharded("stage1", "embed", self.pool_ex, self.shards(len(self.pool_ex)), digest(self.key, "embed"), self.store,
                               self.executor(), {}, "stage 1: pool embeddings", self.rt.progress, ids=[r.id for r in self.pool])
            self._emb = (dom, pool)
            self.shared_seconds["embeddings"] = time.perf_counter() - t
            self.shared_tokens["embeddings"] = sum(len(e.input_ids) for e in self.dom_ex) + sum(len(e.input_ids) for e in self.pool_ex)
        return self._emb

    def cost(self, ranking: Ranking) -> tuple[float, int]:
        """(seconds, tokens) of a selection run alone: its own work plus the shared parts it used."""
        secs = ranking.seconds + sum(self.shared_seconds.get(k, 0.0) for k in ranking.shared)
        toks = ranking.tokens + sum(self.shared_tokens.get(k, 0) for k in ranking.shared)
        return secs, toks

    def release(self) -> None:
        if self._executor is not None:
            self._executor.close()
        self._executor = None
        self._model = None
        self._fresh = None
        self._adam = None
        self._emb = None


class Selector(Protocol):
    name: str
    uses_model: bool  # whether it needs the warmed-up model (and so writes adapter/)

    def rank(self, ctx: SelectionContext, n: int) -> Ranking: ...


class RandomSelector:
    name, uses_model = "random", False

    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        t = time.perf_counter()
        u = np.random.default_rng([ctx.cfg.seed, 0x52414E44]).random(len(ctx.pool))  # (n_pool,) seeded uniform keys
        order, scores = _ordered(np.arange(len(ctx.pool)), u)
        return Ranking(order, scores, info={"rule": "seeded uniform keys (numpy default_rng([seed, tag])), highest first"},
                       seconds=time.perf_counter() - t)


class EmbeddingSelector:
    name, uses_model = "embedding", True

    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        dom, pool = ctx.embeddings()
        t = time.perf_counter()
        d = dom / np.maximum(np.linalg.norm(dom, axis=1, keepdims=True), 1e-12)  # (n_dom, d)
        centre = d.mean(0).astype(np.float64)  # mean_i x̂_i: mean cosine = x̂_j · centre
        parts = []
        for shard in pool:  # one memory-mapped shard at a time
            x = np.asarray(shard, dtype=np.float64)  # (s, d)
            parts.append((x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)) @ centre)
        scores = np.concatenate(parts) if parts else np.zeros(0)
        order, sc = _ordered(np.arange(len(ctx.pool)), scores)
        own = time.perf_counter() - t
        return Ranking(order, sc, info={"rule": "mean cosine of the stage-1 embedding to the domain embeddings"},
                       seconds=own, shared=("warmup", "embeddings"), timings={"embeddings": ctx.shared_seconds.get("embeddings", 0.0), "select": own})


_WORD = re.compile(r"\w+", re.UNICODE)


class BM25Selector:
    name, uses_model = "bm25", False

    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        try:
            import bm25s
        except ImportError:
            raise NtkSelectError("--method bm25 needs the bm25s package: pip install 'ntkselect[baselines]'") from None
        t = time.perf_counter()
        corpus = [record_text(r.raw) for r in ctx.pool]
        queries = [record_text(r.raw) for r in ctx.domain]
        tok = bm25s.tokenize(corpus, stopwords="en", show_progress=False)
        retriever = bm25s.BM25()  # Lucene variant, k1 = 1.5, b = 0.75
        retriever.index(tok, show_progress=False)
        vocab = tok.vocab  # {word: id}
        q_tok = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
        scores = np.zeros(len(corpus))
        for words in q_tok:
            known = [w for w in words if w in vocab]
            if known:
                scores += retriever.get_scores(known)
        scores /= max(1, len(queries))
        order, sc = _ordered(np.arange(len(corpus)), scores)
        return Ranking(order, sc, info={"rule": "mean over domain queries of the BM25 score (bm25s, Lucene, k1=1.5, b=0.75, English stopwords)",
                                        "bm25s": getattr(bm25s, "__version__", "?")}, seconds=time.perf_counter() - t)


class LessSelector:
    name, uses_model = "less", True

    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        cfg, rt = ctx.cfg, ctx.rt
        if cfg.warmup_epochs <= 0:
            raise NtkSelectError("--method less needs --warmup-epochs > 0: its candidate gradients are preconditioned by the warm-up's Adam state")
        model = ctx.model()
        state = ctx.adam_state()
        t = time.perf_counter()
        names_shapes = [(nm, p.shape) for nm, p in lora_parameters(model)]
        names = [nm for nm, _ in names_shapes]
        dim = sum(math.prod(s) for _, s in names_shapes)
        m = flatten_grads({nm: state[nm][0].unsqueeze(0) for nm in names}, names)[0].to(rt.device).float()  # (D,)
        v = flatten_grads({nm: state[nm][1].unsqueeze(0) for nm in names}, names)[0].to(rt.device).float()  # (D,)
        (b1, b2), eps = state["_betas"], state["_eps"]
        # LESS's Γ (applied per shard, ntkselect.runs.shards._task_less): one more Adam step's update
        # direction from the warm-up's moments, m' / sqrt(v' + eps), as in its code (no bias correction)
        p = cfg.less_proj_dim
        projector = RademacherProjector(dim, p, cfg.seed, device=rt.device)
        dom = projected_features(model, ctx.dom_ex, projector, rt, objective=per_example_loss, chunk_bytes=2 << 30,
                                 desc="less: domain gradients", ids=[r.id for r in ctx.domain])  # (n_dom, p)
        payload = {"m": m.cpu(), "v": v.cpu(), "b1": b1, "b2": b2, "eps": eps, "dim": dim, "proj_dim": p, "seed": cfg.seed, "chunk_bytes": 2 << 30}
        shards = run_sharded("less", "less", ctx.pool_ex, ctx.shards(len(ctx.pool_ex)), digest(ctx.key, "less", p), ctx.store, ctx.executor(),
                             payload, "less: pool gradients", rt.progress, ids=[r.id for r in ctx.pool])
        d = torch.from_numpy(dom).double()
        d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-30)  # (n_dom, p)
        parts = []
        for shard in shards:
            x = torch.from_numpy(np.asarray(shard)).double()  # (s, p)
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
            parts.append((x @ d.T).max(dim=1).values.numpy())  # max over D of the cosine
        scores = np.concatenate(parts)
        order, sc = _ordered(np.arange(len(ctx.pool)), scores)
        toks = 2 * (sum(len(e.input_ids) for e in ctx.dom_ex) + sum(len(e.input_ids) for e in ctx.pool_ex))  # forward + backward
        return Ranking(order, sc, seconds=time.perf_counter() - t, tokens=toks, shared=("warmup",), info={
            "rule": "max over D of cos(phi(Gamma(grad loss(c))), phi(grad loss(x_i))); Gamma = Adam step from the warm-up's moments",
            "proj_dim": p, "grad_dim": dim, "projector": projector.describe(), "adam_betas": [b1, b2], "adam_eps": eps,
            "checkpoints": "the single warm-up checkpoint (LESS averages several, weighted by learning rate)"})


class TsdsSelector:
    name, uses_model = "tsds", True

    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        cfg = ctx.cfg
        dom, pool = ctx.embeddings()
        t = time.perf_counter()
        r = tsds(dom, pool, alpha=cfg.tsds_alpha, c=cfg.tsds_c, sigma=cfg.tsds_sigma, max_k=cfg.tsds_max_k, kde_k=cfg.tsds_kde_k)
        order = draw_order(r.probs, r.nearest, cfg.seed)
        nonzero = int((r.probs > 0).sum())
        ctx.log(f"ntkselect: tsds K = {r.k}, KDE K = {r.kde_k}, {r.neighbourhood} candidates in the domain's neighbourhoods, "
                f"{nonzero} with nonzero probability" + ("" if r.stopped else "; the alpha/C condition never held, every domain example spread over all K"))
        if nonzero < n:
            ctx.log(f"ntkselect: tsds: only {nonzero} candidates have nonzero probability; the other {n - nonzero} selected are the "
                    "zero-probability candidates with the best cosine to the domain")
        own = time.perf_counter() - t
        return Ranking(order, r.probs[order], columns={"kde": r.kde[order]}, seconds=own, shared=("warmup", "embeddings"),
                       timings={"embeddings": ctx.shared_seconds.get("embeddings", 0.0), "select": own}, info={
            "rule": "TSDS (Liu et al. 2024, KNN-KDE as in the authors' tsds.py): score = the candidate's probability; order = a seeded "
                    "draw without replacement in proportion to it, then the zero-probability candidates",
            "alpha": cfg.tsds_alpha, "C": cfg.tsds_c, "sigma": cfg.tsds_sigma, "max_k": cfg.tsds_max_k, "kde_k": cfg.tsds_kde_k,
            "k_used": r.k, "kde_k_used": r.kde_k, "caps": "K = min(max_k, pool // 10) >= 2, KDE K = min(kde_k, pool // 10) >= 1",
            "embeddings": "stage-1 embeddings, L2-normalised; Euclidean distance",
            "search": "exact float64 kNN (the original: approximate FAISS IndexIVFFlat); the KDE among the candidates in the neighbourhoods",
            "kernel": "max(0, 1 - |x - y|^2 / sigma^2) summed over the KDE K nearest, the candidate itself included",
            "level_s": r.level, "stopped_by_alpha_c": r.stopped, "neighbourhood": r.neighbourhood, "nonzero_probability": nonzero,
            "capped_domain_examples": r.capped_queries, "mean_near_duplicates": r.near_duplicates,
            "sampling": "Efraimidis-Spirakis without replacement: keys u^(1/p), u from numpy default_rng([seed, 0x54534453]), highest first "
                        "(the original draws N with replacement, np.random.multinomial); then p = 0 candidates by best cosine to D, then pool position",
            "seconds": r.seconds})


@dataclass
class _Stage2:
    scores: np.ndarray
    grad_dim: int
    proj_dim: int
    projector: dict | None
    seconds: dict
    tokens: dict


def _stage2(ctx: SelectionContext, cand: np.ndarray) -> _Stage2:
    """Stage 2 on the preselected candidates: v once on the driver (kept on disk), then the
    candidates' scores ⟨v, g(c)⟩ shard by shard on the executor."""
    cfg, rt, model = ctx.cfg, ctx.rt, ctx.model()
    vdir = ctx.store.root / "stage2"
    vkey = digest(ctx.key, "vector", cfg.proj_dim)
    marker = vdir / "vector.done"
    t = time.perf_counter()
    if marker.exists() and json.loads(marker.read_text()).get("key") == vkey:
        vec = torch.load(vdir / "vector.pt", map_location="cpu", weights_only=True)
        info = json.loads(marker.read_text())["info"]
        ctx.resumed["stage2_vector"] = True
    else:
        vec, info = domain_vector(model, ctx.dom_ex, rt, cfg.proj_dim, cfg.seed, domain_ids=[r.id for r in ctx.domain])
        vec = {k: v.detach().cpu() for k, v in vec.items()}
        with atomic_open(vdir / "vector.pt", "wb", encoding=None) as f:
            torch.save(vec, f)
        atomic_write_json(marker, {"key": vkey, "info": info})
    t_vec = time.perf_counter() - t
    t = time.perf_counter()
    cand_ex = [ctx.pool_ex[int(i)] for i in cand]
    ids = [ctx.pool[int(i)].id for i in cand]
    key = digest(ctx.key, "score", cfg.proj_dim, ids)
    parts = run_sharded("stage2", "score", cand_ex, ctx.shards(len(cand_ex)), key, ctx.store, ctx.executor(), {"vec": vec},
                        "stage 2: candidates", rt.progress, ids=ids)
    scores = np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])
    secs = {**info["seconds"], "vector_total": t_vec, "candidates": time.perf_counter() - t}
    return _Stage2(scores, info["grad_dim"], cfg.proj_dim, info["projector"], secs,
                   {"domain": info["tokens"], "candidates": sum(len(e.input_ids) for e in cand_ex)})


class NtkSelector:
    name, uses_model = "ntk", True

    def rank(self, ctx: SelectionContext, n: int) -> Ranking:
        cfg = ctx.cfg
        dom_emb, pool_emb = ctx.embeddings()
        t = time.perf_counter()
        s1 = preselect(dom_emb, pool_emb, int(round(cfg.preselect_factor * n)), cfg.knn_k)
        cand = s1.selected
        t2 = time.perf_counter()
        s2 = _stage2(ctx, cand)
        order, sc = _ordered(cand, s2.scores)
        votes = s1.votes[order]
        ctx.log(f"ntkselect: stage 1 kept {len(cand)} candidates (K = {s1.k_used}, {int((s1.votes > 0).sum())} got a vote)")
        toks = 2 * (s2.tokens["domain"] + s2.tokens["candidates"])
        timings = {"stage1": ctx.shared_seconds.get("embeddings", 0.0) + (t2 - t), "stage2": time.perf_counter() - t2}
        return Ranking(order, sc, columns={"votes": votes}, seconds=time.perf_counter() - t, tokens=toks, shared=("warmup", "embeddings"), timings=timings, info={
            "stage1": {"m": int(len(cand)), "k_requested": cfg.knn_k, "k_used": s1.k_used, "voted_candidates": int((s1.votes > 0).sum()),
                       "tie_break": "votes desc, best cosine desc, pool position asc", "seconds": s1.seconds},
            "stage2": {"grad_dim": s2.grad_dim, "proj_dim": s2.proj_dim, "projector": s2.projector, "seconds": s2.seconds, "tokens": s2.tokens,
                       "objective": "f(x) = (1/T) sum_t sum_k logit[t,k], via h_t . sum_k w_k",
                       "score": "mean_i <phi(g(x_i)), phi(g(c_j))> = <phi*(phi(mean_i g(x_i))), g(c_j)>",
                       "tie_break": "score desc, pool position asc"}})


SELECTORS: dict[str, type] = {s.name: s for s in (NtkSelector, RandomSelector, EmbeddingSelector, BM25Selector, LessSelector, TsdsSelector)}
METHODS = tuple(SELECTORS)


def get_selector(name: str) -> Selector:
    if name not in SELECTORS:
        raise NtkSelectError(f"--method {name!r} is not a selector; use one of {', '.join(SELECTORS)}")
    return SELECTORS[name]()
