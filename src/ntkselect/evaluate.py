"""``ntkselect evaluate``: does the selection help? Select, fine-tune and test, per method and seed.

For every seed and method the same steps run with the same recipe: select N pool examples
(``random``, ``embedding``, ``bm25``, ``less``, ``ntk``; ``domain-only`` selects nothing),
fine-tune a fresh LoRA adapter on D ∪ S (:mod:`ntkselect.finetune`), and score the domain test
set by option log-likelihood (:mod:`ntkselect.evaluation`). The base model without
fine-tuning is always a row. The test set never reaches selection or training: pool records
whose question equals a test question are excluded before any method runs, and each cell
checks that its training set shares no question with the test set.

Each (method, seed) cell is written atomically to ``cells/`` when it finishes, so a rerun of
the same command resumes where a crash left off; the configuration and input hashes are kept
in ``evaluate_config.json`` and a rerun with different ones is refused (``--overwrite``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import tempfile
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import SelectConfig, check_types, value_problem
from .data import Record, load_records, prompt_response, record_text, tokenize_records
from .errors import NtkSelectError
from .evaluation import evaluate_mc, mc_items
from .finetune import FinetuneRecipe, finetune
from .io import atomic_open, atomic_write_json, sha256_path
from .leak import TestQuestions
from .model import check_model_options, load_model, load_tokenizer
from .pipeline import _group, load_inputs, make_runtime, package_versions, write_selection
from .runfolder import EVALUATE, Run, check_paths, open_run
from .selectors import SELECTORS, SelectionContext, get_selector

__all__ = ["EvalConfig", "run_evaluation", "paired_sign_flip_test"]

BASELINE = "domain-only"
ALL_METHODS = (BASELINE, *SELECTORS)


def _opt(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EvalConfig:
    domain_train: str = _opt("", "domain training set D (any format select accepts)", required=True)
    domain_test: str = _opt("", "domain test set: multiple-choice records (prompt, options or lettered lines, answer)", required=True)
    pool: str = _opt("", "candidate pool C", required=True)
    n: int = _opt(0, "examples each method selects (N)", required=True)
    out: str = _opt("", "output folder: results.csv, results.md, results.png, cells/, selections/", required=True)
    methods: str = _opt("domain-only,random,embedding,bm25,less,ntk", "comma-separated: domain-only, random, embedding, bm25, less, ntk")
    seeds: str = _opt("3", "a count k (seeds 0..k-1) or a comma-separated list of seeds")
    model: str = _opt("default", "Hugging Face causal-LM folder; 'default' = embedded SmolLM2-135M-Instruct")
    template: str = _opt("auto", "prompt rendering for training and testing: auto, chat or plain", choices=("auto", "chat", "plain"))
    # -- selection (as in `ntkselect select`) ---------------------------------------------
    max_length: int = _opt(512, "maximum tokens per example during selection")
    warmup_epochs: float = _opt(1.0, "warm-up epochs on D (ntk, less, embedding)")
    warmup_lr: float = _opt(2e-4, "warm-up learning rate")
    knn_k: int = _opt(32, "ntk stage 1: votes per domain example")
    preselect_factor: float = _opt(4.0, "ntk stage 1 keeps M = factor x N")
    proj_dim: int = _opt(0, "ntk stage 2: 0 exact, p > 0 Rademacher projection (paper: 8192)")
    less_proj_dim: int = _opt(8192, "less: projection dimension (LESS: 8192)")
    lora_r: int = _opt(8, "LoRA rank for the warm-up and the fine-tune")
    lora_alpha: float = _opt(16.0, "LoRA alpha for the warm-up and the fine-tune")
    # -- fine-tuning recipe (identical for every method) -----------------------------------
    ft_epochs: float = _opt(2.0, "fine-tuning epochs on D ∪ S")
    ft_lr: float = _opt(2e-4, "fine-tuning learning rate (AdamW, linear warm-up and decay)")
    ft_batch_size: int = _opt(8, "fine-tuning batch size")
    ft_max_length: int = _opt(512, "fine-tuning maximum tokens per example")
    # -- execution ----------------------------------------------------------------------
    eval_max_length: int = _opt(2048, "maximum prompt + option tokens at test time (long prompts keep their end)")
    batch_size: int = _opt(16, "examples per batch for selection and testing")
    max_batch_tokens: int = _opt(8192, "padded tokens per batch")
    precision: str = _opt("auto", "auto (bfloat16 where supported), float32 or bfloat16", choices=("auto", "float32", "bfloat16"))
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    threads: int = _opt(0, "CPU threads (0 = torch's default)")
    overwrite: bool = _opt(False, "discard finished cells in --out and start over")

    def seed_list(self) -> list[int]:
        s = str(self.seeds).strip()
        try:
            if "," in s:
                out = [int(x) for x in s.split(",") if x.strip()]
            else:
                out = list(range(int(s)))
        except ValueError:
            raise NtkSelectError(f"--seeds must be a count or a comma-separated list of integers (got {self.seeds!r})") from None
        if not out or any(x < 0 for x in out) or len(set(out)) != len(out):
            raise NtkSelectError(f"--seeds must give at least one distinct non-negative seed (got {self.seeds!r})")
        return out

    def method_list(self) -> list[str]:
        out = [m.strip() for m in str(self.methods).split(",") if m.strip()]
        bad = [m for m in out if m not in ALL_METHODS]
        if bad or not out:
            raise NtkSelectError(f"--methods: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(ALL_METHODS)}")
        return list(dict.fromkeys(out))

    def recipe(self) -> FinetuneRecipe:
        return FinetuneRecipe(epochs=self.ft_epochs, lr=self.ft_lr, batch_size=self.ft_batch_size, max_length=self.ft_max_length,
                              lora_r=self.lora_r, lora_alpha=self.lora_alpha)

    def select_config(self, method: str, seed: int, out: str) -> SelectConfig:
        return SelectConfig(domain=self.domain_train, pool=self.pool, n=self.n, out=out, method=method if method in SELECTORS else "random",
                            model=self.model, template=self.template, max_length=self.max_length, seed=seed, lora_r=self.lora_r,
                            lora_alpha=self.lora_alpha, warmup_epochs=self.warmup_epochs, warmup_lr=self.warmup_lr, knn_k=self.knn_k,
                            preselect_factor=self.preselect_factor, proj_dim=self.proj_dim, less_proj_dim=self.less_proj_dim,
                            batch_size=self.batch_size, max_batch_tokens=max(self.max_batch_tokens, self.max_length), precision=self.precision,
                            device=self.device, threads=self.threads, overwrite=True)

    def validate(self) -> "EvalConfig":
        check_types(self)
        for f in fields(self):
            if f.metadata.get("required") and getattr(self, f.name) in ("", None, 0):
                raise NtkSelectError(f"--{f.name.replace('_', '-')} is required")
            if f.metadata.get("choices") and getattr(self, f.name) not in f.metadata["choices"]:
                raise NtkSelectError(f"--{f.name.replace('_', '-')} must be one of {', '.join(f.metadata['choices'])} (got {getattr(self, f.name)!r})")
        if self.n <= 0:
            raise NtkSelectError(f"--n must be a positive integer (got {self.n})")
        for name in ("eval_max_length",):
            if getattr(self, name) < 2:
                raise NtkSelectError(f"--{name.replace('_', '-')} must be at least 2")
        for name in ("ft_epochs", "ft_lr", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise NtkSelectError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        self.seed_list(), self.method_list(), self.recipe().validate()
        for m in self.method_list():
            self.select_config(m, 0, self.out or "-").validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_toml(cls, path: str, overrides: dict | None = None) -> "EvalConfig":
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise NtkSelectError(f"--config {path}: no such file") from None
        except tomllib.TOMLDecodeError as err:
            raise NtkSelectError(f"{path}: not valid TOML ({err}); fix the file") from None
        except (OSError, UnicodeDecodeError) as err:
            raise NtkSelectError(f"--config {path}: cannot read it ({getattr(err, 'strerror', None) or err}); pass a TOML file") from None
        data = data.get("evaluate", data)  # a file may hold an [evaluate] table or bare keys
        if not isinstance(data, dict):
            raise NtkSelectError(f"{path}: 'evaluate' must be a table ([evaluate]) of options; fix the file")
        names = {f.name: f for f in fields(cls)}
        unknown = [k for k in data if k.replace("-", "_") not in names]
        if unknown:
            raise NtkSelectError(f"{path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(names)}")
        for k, v in data.items():  # strict: a TOML boolean is not a number, a string is not a boolean
            f = names[k.replace("-", "_")]
            if f.name in ("seeds", "methods"):
                item = "seed" if f.name == "seeds" else "method name"
                if isinstance(v, bool) or not isinstance(v, (str, int, list)):
                    why = f"must be a {'count, ' if f.name == 'seeds' else ''}list or comma-separated string of {item}s"
                else:
                    bad_item = next((x for x in v if isinstance(x, bool) or not isinstance(x, (str, int))), None) if isinstance(v, list) else None
                    why = f"holds {bad_item!r}, not a {item}" if bad_item is not None else None
            else:
                why = value_problem(f.type if isinstance(f.type, str) else f.type.__name__, v)
            if why:
                raise NtkSelectError(f"{path}: {k} {why} (got {v!r}); fix the file")
        kw = {k.replace("-", "_"): (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in data.items()}
        for k in ("seeds", "methods"):
            if k in kw:
                kw[k] = str(kw[k])
        kw.update(overrides or {})
        try:
            return cls(**kw)
        except TypeError as err:
            raise NtkSelectError(f"{path}: {err}") from None


# -- statistics ---------------------------------------------------------------------------

def paired_sign_flip_test(diff: np.ndarray, n_perm: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of mean(diff) = 0 for paired per-question differences, by random sign
    flips (exact permutation test for small n). Add-one smoothing keeps p > 0."""
    diff = np.asarray(diff, dtype=np.float64)
    if len(diff) == 0 or not np.any(diff):
        return 1.0
    nz = diff[diff != 0]  # zero differences do not change under a flip
    obs = abs(diff.sum())
    if len(nz) <= 16:  # exact: every sign pattern
        signs = ((np.arange(2 ** len(nz))[:, None] >> np.arange(len(nz))) & 1) * 2 - 1
        stats = np.abs(signs @ nz)
        return float((stats >= obs - 1e-12).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for s in range(0, n_perm, 2000):
        b = min(2000, n_perm - s)
        signs = rng.integers(0, 2, size=(b, len(nz))) * 2 - 1
        hits += int((np.abs(signs @ nz) >= obs - 1e-12).sum())
    return float((hits + 1) / (n_perm + 1))


# -- the run ---------------------------------------------------------------------------------

def _qnorm(raw: dict) -> str:
    try:
        q = raw.get("prompt") or raw.get("question") or prompt_response(raw)[0]
    except NtkSelectError:
        q = record_text(raw)
    return " ".join(str(q).lower().split())


def _fingerprint(cfg: EvalConfig) -> dict:
    # seeds and methods are left out: cells are per (method, seed), so adding either reuses the rest
    keep = {k: v for k, v in cfg.to_dict().items() if k not in ("overwrite", "out", "threads", "device", "seeds", "methods")}
    return {"config": keep, "inputs": {k: sha256_path(getattr(cfg, k)) for k in ("domain_train", "domain_test", "pool")}}


def _prepare(cfg: EvalConfig, log, stack: contextlib.ExitStack) -> Run:
    """Lock --out and decide where this evaluation writes (runfolder.py): a rerun with the same
    configuration resumes in place, another one is refused; --overwrite writes the new evaluation
    aside and swaps it in only once it has finished. Only ntkselect's own entries are replaced."""
    check_model_options(cfg.model, "all-linear", cfg.lora_r, tokenizer=load_tokenizer(cfg.model))
    fp = _fingerprint(cfg)
    run = stack.enter_context(open_run(cfg.out, EVALUATE, _eval_inputs(cfg), log=log))
    out = run.out
    if run.state != "new" and not cfg.overwrite:
        old = run.setup()
        if old.get("fingerprint") != fp:
            changed = [k for k in fp["config"] if old.get("fingerprint", {}).get("config", {}).get(k) != fp["config"][k]]
            changed += [f"{k} (contents)" for k in fp["inputs"] if old.get("fingerprint", {}).get("inputs", {}).get(k) != fp["inputs"][k]]
            raise NtkSelectError(f"{out} holds an evaluation with a different configuration ({', '.join(changed) or 'format'}); "
                                 "pass --overwrite to start over or choose another --out")
        wdir = run.in_place(clear=False)
    elif run.state != "new":
        wdir = run.stage(reuse=lambda old: old.get("fingerprint") == fp)
        log(f"ntkselect evaluate: writing the new evaluation aside in {wdir}; it replaces the one in {out} once it has finished")
    else:
        wdir = run.in_place(clear=True)
    (wdir / "cells").mkdir(exist_ok=True)
    (wdir / "selections").mkdir(exist_ok=True)
    atomic_write_json(wdir / "evaluate_config.json", {"fingerprint": fp, "config": cfg.to_dict()})
    return run


def _eval_inputs(cfg: EvalConfig) -> dict:
    return {"--domain-train": cfg.domain_train, "--domain-test": cfg.domain_test, "--pool": cfg.pool,
            "--model": cfg.model if cfg.model not in ("", "default") and Path(cfg.model).is_dir() else None}


def _cell_path(out: Path, method: str, seed: int | None) -> Path:
    return out / "cells" / (f"{method}.json" if seed is None else f"{method}-seed{seed}.json")


def _composition(records: list[Record], top: int = 6) -> tuple[dict, dict]:
    import collections

    groups = collections.Counter(_group(r) for r in records)
    src = collections.Counter(str(r.raw.get("source", Path(r.path).name)) for r in records)
    return dict(groups.most_common(top)), dict(sorted(src.items(), key=lambda kv: -kv[1]))


def _test_model(model, tokenizer, items, rt, cfg: EvalConfig, desc: str) -> dict:
    res = evaluate_mc(model, tokenizer, items, rt, cfg.template, cfg.eval_max_length, desc=desc)
    # P(correct): the softmax over the options of the correct one's log-likelihood. Accuracy only
    # moves when an argmax flips; this moves with every question, so it sees smaller effects.
    p_correct = [float(np.exp(ll[it.answer] - np.logaddexp.reduce(ll))) for ll, it in zip(res.loglik, items)]
    return {"accuracy": res.accuracy, "mean_p_correct": float(np.mean(p_correct)), "p_correct": [round(p, 6) for p in p_correct], "n_test": len(items), "n_correct": int(res.correct.sum()), "correct": res.correct.astype(int).tolist(),
            "pred": res.pred.tolist(), "eval_seconds": res.seconds, "eval_tokens": res.tokens}


def run_evaluation(cfg: EvalConfig, log=print) -> dict:
    with contextlib.ExitStack() as stack:  # holds the lock on --out to the end (runfolder.py)
        return _run_evaluation(cfg, log, stack)


def _run_evaluation(cfg: EvalConfig, log, stack: contextlib.ExitStack) -> dict:
    cfg.validate()
    t_start = time.perf_counter()
    check_paths(cfg.out, EVALUATE, _eval_inputs(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seeds, methods = cfg.seed_list(), cfg.method_list()

    test_records = load_records(cfg.domain_test)
    if not test_records:
        raise NtkSelectError(f"{cfg.domain_test}: the test set is empty")
    items = mc_items(test_records)
    test_q = TestQuestions(test_records)  # leak.py: containment in every field a record trains on
    base_cfg = cfg.select_config("ntk", seeds[0], cfg.out)
    inp = load_inputs(base_cfg, log, exclude_texts=None)
    leak = [r.id for r in inp.domain if test_q.leaks(r.raw)]
    if leak:
        raise NtkSelectError(f"{cfg.domain_train}: {len(leak)} training question(s) also appear in {cfg.domain_test} (e.g. id {leak[0]!r}); "
                             "remove them, the test set must be unseen")
    # no method may select a test question: drop such pool records up front, for every method alike
    pool_keep = [i for i, r in enumerate(inp.pool) if not test_q.leaks(r.raw)]
    dropped = len(inp.pool) - len(pool_keep)
    if dropped:
        log(f"ntkselect evaluate: excluded {dropped} pool records whose question is in the test set")
        inp.pool = [inp.pool[i] for i in pool_keep]
        inp.pool_ex = [inp.pool_ex[i] for i in pool_keep]
        inp.excluded["test_questions"] = dropped
    if cfg.n > len(inp.pool):
        raise NtkSelectError(f"--n {cfg.n} is larger than the usable pool ({len(inp.pool)} records); lower --n")
    run = _prepare(cfg, log, stack)  # the inputs are checked: only now is --out touched
    out = run.dir
    tokenizer = inp.tokenizer
    rt = make_runtime(base_cfg, tokenizer)
    recipe = cfg.recipe()
    ft_cache: dict[str, list] = {}

    def ft_examples(records: list[Record]) -> list:
        key = "\x00".join(r.id for r in records)
        if key not in ft_cache:
            ft_cache.clear()
            ft_cache[key] = tokenize_records(records, tokenizer, recipe.max_length, cfg.template)[0]
        return ft_cache[key]

    # -- the base model: no fine-tuning, one row ------------------------------------------
    cell = _cell_path(out, "base", None)
    if not cell.exists():
        log("ntkselect evaluate: base model")
        model = load_model(cfg.model).to(rt.device)
        row = {"method": "base", "seed": None, "n_selected": 0, "selection_seconds": 0.0, "selection_tokens": 0,
               "finetune_seconds": 0.0, "finetune_tokens": 0, "test_overlap": 0, "composition": {}, "by_source": {}}
        row.update(_test_model(model, tokenizer, items, rt, cfg, "evaluate: base"))
        atomic_write_json(cell, row)
        del model

    for seed in seeds:
        todo = [m for m in methods if not _cell_path(out, m, seed).exists()]
        if not todo:
            continue
        scfg = cfg.select_config("ntk", seed, str(out))
        with tempfile.TemporaryDirectory(prefix=".work-", dir=out) as work:
            ctx = SelectionContext(scfg, inp.domain, inp.pool, inp.dom_ex, inp.pool_ex, rt, log, work_dir=work)
            for method in todo:
                log(f"ntkselect evaluate: seed {seed}, {method}")
                t = time.perf_counter()
                if method == BASELINE:
                    selected, sel_s, sel_tok, comp, src = [], 0.0, 0, {}, {}
                else:
                    mcfg = dataclasses.replace(scfg, method=method, out=str(Path(cfg.out) / "selections" / f"{method}-seed{seed}"))
                    ranking = get_selector(method).rank(ctx, cfg.n)
                    res = write_selection(out / "selections" / f"{method}-seed{seed}", mcfg, inp, ctx, ranking, rt, t)
                    selected = res.selected
                    sel_s, sel_tok = ctx.cost(ranking)
                    comp, src = _composition(selected)
                train = list(inp.domain) + selected
                overlap = sum(test_q.leaks(r.raw) for r in train)
                if overlap:
                    raise NtkSelectError(f"{method}, seed {seed}: {overlap} training examples share a question with the test set; refusing to report")
                model, ft = finetune(cfg.model, ft_examples(train), recipe, rt, seed, desc=f"fine-tune: {method}, seed {seed}")
                row = {"method": method, "seed": seed, "n_selected": len(selected), "selection_seconds": round(sel_s, 3), "selection_tokens": int(sel_tok),
                       "finetune_seconds": round(ft["seconds_total"], 3), "finetune_tokens": ft["tokens"], "finetune_loss_last": ft.get("loss_last"),
                       "test_overlap": overlap, "composition": comp, "by_source": src}
                row.update(_test_model(model, tokenizer, items, rt, cfg, f"evaluate: {method}, seed {seed}"))
                del model
                atomic_write_json(_cell_path(out, method, seed), row)
                log(f"ntkselect evaluate: seed {seed}, {method}: accuracy {row['accuracy']:.4f} ({row['n_correct']}/{row['n_test']})")
            ctx.release()

    manifest = write_results(cfg, out, seeds, methods, items, inp, time.perf_counter() - t_start)
    run.commit()  # with --overwrite: the new evaluation replaces the earlier one only now
    return manifest


def _load_cells(out: Path, seeds, methods) -> tuple[dict, dict]:
    base = json.loads(_cell_path(out, "base", None).read_text())
    cells = {(m, s): json.loads(_cell_path(out, m, s).read_text()) for m in methods for s in seeds}
    return base, cells


def write_results(cfg: EvalConfig, out: Path, seeds, methods, items, inp, seconds: float) -> dict:
    base, cells = _load_cells(out, seeds, methods)
    ref = BASELINE if BASELINE in methods else None
    summary = {}
    for m in methods:
        accs = np.array([cells[(m, s)]["accuracy"] for s in seeds])
        corr = np.mean([cells[(m, s)]["correct"] for s in seeds], axis=0)  # (n_test,) mean over seeds
        pcs = np.array([cells[(m, s)].get("mean_p_correct", np.nan) for s in seeds])
        row = {"mean": float(accs.mean()), "std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0, "seeds": len(seeds),
               "p_correct_mean": float(pcs.mean()), "p_correct_std": float(pcs.std(ddof=1)) if len(pcs) > 1 else 0.0,
               "selection_seconds": float(np.mean([cells[(m, s)]["selection_seconds"] for s in seeds])),
               "selection_tokens": float(np.mean([cells[(m, s)]["selection_tokens"] for s in seeds])),
               "finetune_seconds": float(np.mean([cells[(m, s)]["finetune_seconds"] for s in seeds]))}
        if ref and m != ref:
            rcorr = np.mean([cells[(ref, s)]["correct"] for s in seeds], axis=0)
            d = corr - rcorr
            deltas = [cells[(m, s)]["accuracy"] - cells[(ref, s)]["accuracy"] for s in seeds]
            row.update(delta=float(np.mean(deltas)), delta_std=float(np.std(deltas, ddof=1)) if len(deltas) > 1 else 0.0,
                       p_value=paired_sign_flip_test(d, seed=0), wins=int((d > 0).sum()), losses=int((d < 0).sum()))
            if all("p_correct" in cells[(x, s)] for x in (m, ref) for s in seeds):
                dp = np.mean([cells[(m, s)]["p_correct"] for s in seeds], 0) - np.mean([cells[(ref, s)]["p_correct"] for s in seeds], 0)
                row.update(p_correct_delta=float(dp.mean()), p_correct_p_value=paired_sign_flip_test(dp, seed=0))
        summary[m] = row
    bacc = base["accuracy"]

    # results.csv: one row per (method, seed), then one summary row per method
    cols = ["method", "seed", "accuracy", "n_correct", "n_test", "n_selected", "delta_vs_domain_only", "p_value", "selection_seconds",
            "selection_tokens", "finetune_seconds", "eval_seconds", "test_overlap", "by_source", "top_subjects"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    w.writerow(["base", "", f"{bacc:.6f}", base["n_correct"], base["n_test"], 0, "", "", 0, 0, 0, f"{base['eval_seconds']:.1f}", 0, "", ""])
    for m in methods:
        for s in seeds:
            c = cells[(m, s)]
            delta = f"{c['accuracy'] - cells[(ref, s)]['accuracy']:.6f}" if ref and m != ref else ""
            w.writerow([m, s, f"{c['accuracy']:.6f}", c["n_correct"], c["n_test"], c["n_selected"], delta, "", f"{c['selection_seconds']:.1f}",
                        c["selection_tokens"], f"{c['finetune_seconds']:.1f}", f"{c['eval_seconds']:.1f}", c["test_overlap"],
                        "; ".join(f"{k}:{v}" for k, v in c["by_source"].items()), "; ".join(f"{k}:{v}" for k, v in c["composition"].items())])
        r = summary[m]
        w.writerow([m, "mean", f"{r['mean']:.6f}", "", "", cells[(m, seeds[0])]["n_selected"], f"{r['delta']:.6f}" if "delta" in r else "",
                    f"{r['p_value']:.4g}" if "p_value" in r else "", f"{r['selection_seconds']:.1f}", int(r["selection_tokens"]),
                    f"{r['finetune_seconds']:.1f}", "", 0, "", ""])
        w.writerow([m, "std", f"{r['std']:.6f}", "", "", "", f"{r['delta_std']:.6f}" if "delta_std" in r else "", "", "", "", "", "", "", "", ""])
    with atomic_open(out / "results.csv") as f:
        f.write(buf.getvalue())

    # results.md
    n_test = base["n_test"]
    lines = [f"# ntkselect evaluate: {Path(cfg.domain_train).name} + N = {cfg.n} from {Path(cfg.pool).name}", "",
             f"Test: {n_test} questions from {Path(cfg.domain_test).name}; |D| = {len(inp.domain)}; pool {len(inp.pool)} usable records; "
             f"seeds {', '.join(map(str, seeds))}; model {cfg.model}.", "",
             "| method | accuracy (mean ± sd over seeds) | Δ vs domain-only (mean ± sd) | paired p | better / worse questions "
             "| P(correct) | Δ P(correct) | paired p | selection time | selection tokens | fine-tune time |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| base (no fine-tuning) | {100 * bacc:.2f} | {100 * (bacc - summary[ref]['mean']):+.2f} | | | {_pc(base.get('mean_p_correct'))} | | | | | |"
             if ref else f"| base (no fine-tuning) | {100 * bacc:.2f} | | | | {_pc(base.get('mean_p_correct'))} | | | | | |"]
    for m in methods:
        r = summary[m]
        d = f"{100 * r['delta']:+.2f} ± {100 * r['delta_std']:.2f}" if "delta" in r else ""
        p = f"{r['p_value']:.3g}" if "p_value" in r else ""
        wl = f"{r['wins']} / {r['losses']}" if "wins" in r else ""
        pc = f"{_pc(r['p_correct_mean'])} ± {100 * r['p_correct_std']:.2f}" if np.isfinite(r["p_correct_mean"]) else ""
        dpc = f"{100 * r['p_correct_delta']:+.2f}" if "p_correct_delta" in r else ""
        ppc = f"{r['p_correct_p_value']:.3g}" if "p_correct_p_value" in r else ""
        lines.append(f"| {m} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} | {d} | {p} | {wl} | {pc} | {dpc} | {ppc} | {r['selection_seconds']:.0f} s | "
                     f"{r['selection_tokens'] / 1e3:.0f}K | {r['finetune_seconds']:.0f} s |")
    lines += ["", "Accuracy in %, option log-likelihood scoring. P(correct): the softmax over the options' log-likelihoods of the "
              "correct one, in %, averaged over questions (it moves with every question, not only when the argmax flips). "
              "Δ: per-seed difference to domain-only (same seed, same recipe). "
              "Paired p: two-sided sign-flip permutation test over test questions on per-question accuracy averaged over seeds. "
              "Selection cost counts the shared warm-up and embeddings for every method that uses them, as if run alone.", "",
              "## What each method selected (seed " + str(seeds[0]) + ")", "", "| method | by source | top subjects |", "| --- | --- | --- |"]
    for m in methods:
        c = cells[(m, seeds[0])]
        lines.append(f"| {m} | {', '.join(f'{k} {v}' for k, v in c['by_source'].items()) or '-'} | "
                     f"{', '.join(f'{k} {v}' for k, v in c['composition'].items()) or '-'} |")
    lines += ["", "## Fine-tuning recipe (every method)", "", "```json", json.dumps(cfg.recipe().to_dict(), indent=1), "```", "",
              f"Test-set overlap with every training set: {max(c['test_overlap'] for c in cells.values())} (must be 0). "
              f"Pool records excluded as test questions: {inp.excluded.get('test_questions', 0)}.", ""]
    with atomic_open(out / "results.md") as f:
        f.write("\n".join(lines))
    _plot(out / "results.png", methods, seeds, cells, summary, bacc)

    manifest = {"tool": "ntkselect", "command": "evaluate", "config": cfg.to_dict(), "recipe": cfg.recipe().to_dict(), "seeds": seeds,
                "methods": methods, "versions": package_versions(),
                "inputs": {k: {"path": os.path.abspath(getattr(cfg, k)), "sha256": sha256_path(getattr(cfg, k))} for k in ("domain_train", "domain_test", "pool")},
                "excluded_pool_records": inp.excluded, "n_test": n_test, "base_accuracy": bacc, "summary": summary,
                "seconds_this_invocation": round(seconds, 1)}
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def _pc(x) -> str:
    return f"{100 * x:.2f}" if x is not None and np.isfinite(x) else ""


def _plot(path: Path, methods, seeds, cells, summary, base_acc: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the table carries every number; the plot needs the 'report' extra
    fig, ax = plt.subplots(figsize=(1.3 * len(methods) + 2, 3.6), dpi=120)
    x = np.arange(len(methods))
    means = [100 * summary[m]["mean"] for m in methods]
    sds = [100 * summary[m]["std"] for m in methods]
    ax.bar(x, means, yerr=sds, capsize=4, color=["#999999" if m == BASELINE else "#d62728" if m == "ntk" else "#1f77b4" for m in methods])
    for i, m in enumerate(methods):
        ax.scatter([i] * len(seeds), [100 * cells[(m, s)]["accuracy"] for s in seeds], color="black", s=10, zorder=3)
    ax.axhline(100 * base_acc, color="black", linestyle="--", linewidth=1, label=f"base {100 * base_acc:.1f}")
    lo = min(min(means) - max(sds + [0]) - 2, 100 * base_acc - 2)
    ax.set_ylim(max(0, lo), min(100, max(means) + max(sds + [0]) + 2))
    ax.set_xticks(x, methods)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"mean ± sd over {len(seeds)} seed(s); dots: seeds")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb", encoding=None) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
