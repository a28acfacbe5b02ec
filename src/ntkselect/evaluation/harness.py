"""``ntkselect evaluate``: does the selection help? Select, fine-tune and test, per method and seed.

For every seed and method the same steps run with the same recipe: select N pool examples
(``random``, ``embedding``, ``bm25``, ``less``, ``tsds``, ``ntk``; ``domain-only`` selects nothing;
``oracle`` draws N more in-domain examples from ``--domain-extra``), fine-tune a fresh LoRA
adapter on D ∪ S (:mod:`ntkselect.training.finetune`), and score the domain test set two ways
(:mod:`ntkselect.evaluation.metrics`): the held-out loss (mean NLL per trained token of every test
record's response, the training convention's tokens) and, for test records that carry
options, accuracy by option log-likelihood. The base model without fine-tuning is always a
row. The oracle and random rows calibrate the benchmark: a domain only counts where the
oracle's loss beats random's with p < 0.05, and every method's "gap closed" is
(L_random − L_method) / (L_random − L_oracle) (:mod:`ntkselect.evaluation.stats`). The test set never reaches selection or training: pool records
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
import logging
import os
import shutil
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ntkselect.config import SelectConfig, check_types, value_problem
from ntkselect.data.leak import TestQuestions
from ntkselect.data.records import Record, load_records, tokenize_records
from ntkselect.errors import NtkSelectError
from ntkselect.evaluation.metrics import evaluate_mc, heldout_loss, is_mc_record, loss_pass_probes, mc_from_probes, mc_items
from ntkselect.evaluation.records import RecordSet, device_label
from ntkselect.evaluation.stats import bootstrap_indices, gap_closed, paired_bootstrap, paired_sign_flip_test
from ntkselect.files import atomic_open, atomic_write_json, sha256_path
from ntkselect.model.loading import MODEL_DTYPES, check_model_options, load_model, load_tokenizer
from ntkselect.model.memory import with_second_model
from ntkselect.pipeline import load_inputs, make_runtime, package_versions, record_group, write_selection
from ntkselect.runs.folder import EVALUATE, Run, check_paths, open_run
from ntkselect.runs.plan import model_facts
from ntkselect.runs.preflight import preflight_select
from ntkselect.runs.shards import digest
from ntkselect.selection import SelectionContext, get_selector, selector_names
from ntkselect.training.finetune import FinetuneRecipe, finetune, finetune_options

__all__ = ["EvalConfig", "run_evaluation", "paired_sign_flip_test"]

logger = logging.getLogger(__name__)

BASELINE = "domain-only"
ORACLE = "oracle"


def all_methods() -> tuple[str, ...]:
    """The rows ``--methods`` may ask for: the baseline, the oracle and every registered selector."""
    return (BASELINE, ORACLE, *selector_names())


#: the significance level at which the oracle must beat random for a domain to count
CALIBRATION_ALPHA = 0.05


def _opt(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EvalConfig:
    domain_train: str = _opt("", "domain training set D (any format select accepts)", required=True)
    domain_test: str = _opt(
        "",
        "domain test set: any prompt/response, chat or text records (scored by held-out loss); "
        "records with options (or lettered lines) and an answer are also scored for accuracy",
        required=True,
    )
    pool: str = _opt("", "candidate pool C", required=True)
    domain_extra: str = _opt(
        "", "more in-domain records from D's distribution, for the 'oracle' row (N drawn per seed); must be disjoint from D and the test set"
    )
    n: int = _opt(0, "examples each method selects (N)", required=True)
    out: str = _opt("", "output folder: results.csv, results.md, results.png, cells/, selections/", required=True)
    methods: str = _opt("domain-only,random,embedding,bm25,less,ntk", f"comma-separated, from: {', '.join(all_methods())} (oracle needs --domain-extra)")
    seeds: str = _opt("3", "a count k (seeds 0..k-1) or a comma-separated list of seeds")
    model: str = _opt("default", "Hugging Face causal-LM folder; 'default' = embedded SmolLM2-135M-Instruct")
    template: str = _opt("auto", "prompt rendering for training and testing: auto, chat or plain", choices=("auto", "chat", "plain"))
    # -- selection (as in `ntkselect select`) ---------------------------------------------
    max_length: int = _opt(512, "maximum tokens per example during selection")
    warmup_epochs: float = _opt(1.0, "warm-up epochs on D (ntk, less, embedding, tsds)")
    warmup_lr: float = _opt(2e-4, "warm-up learning rate")
    knn_k: int = _opt(32, "ntk stage 1: votes per domain example")
    preselect_factor: float = _opt(4.0, "ntk stage 1 keeps M = factor x N")
    proj_dim: int = _opt(0, "ntk stage 2: 0 exact, p > 0 Rademacher projection (paper: 8192)")
    less_proj_dim: int = _opt(8192, "less: projection dimension (LESS: 8192)")
    tsds_alpha: float = _opt(0.5, "tsds: alignment vs diversity weight (TSDS: 0.5)")
    tsds_c: float = _opt(5.0, "tsds: C, scale of the transport cost (TSDS: 5.0)")
    tsds_sigma: float = _opt(0.75, "tsds: KDE kernel size, 0 = no near-duplicate penalty (TSDS: 0.75)")
    tsds_max_k: int = _opt(5000, "tsds: neighbours per domain example (TSDS max_K: 5000; capped at pool / 10)")
    tsds_kde_k: int = _opt(1000, "tsds: KDE neighbours (TSDS kde_K: 1000; capped at pool / 10)")
    kernel: str = _opt("sum", "ntk-plus: kernel objective, sum, trace or loss", choices=("sum", "trace", "loss"))
    probes: int = _opt(16, "ntk-trace (ntk-plus --kernel trace): sign vectors over the vocabulary")
    normalise: bool = _opt(False, "ntk-plus: divide scores by the candidate's gradient norm")
    diverse: bool = _opt(False, "ntk-plus: greedy score-minus-redundancy selection")
    diversity_lambda: float = _opt(0.5, "ntk-diverse (ntk-plus --diverse): redundancy weight, 0 = top N")
    ensemble: bool = _opt(False, "ntk-plus: average the kernel over warm-up checkpoints")
    checkpoints: int = _opt(3, "ntk-ensemble (ntk-plus --ensemble): warm-up checkpoints")
    cosine: bool = _opt(False, "ntk-plus: the cosine kernel (ntk-cos alone)")
    weighted_vote: bool = _opt(False, "ntk-plus, ntk-rules: stage 1 by --vote-weight (ntk-vote alone)")
    vote_weight: str = _opt("rank", "ntk-vote (ntk-plus / ntk-rules --weighted-vote): rank or similarity", choices=("rank", "similarity"))
    features: str = _opt("unit", "ntk-rules: gradient features unit, centre or whiten", choices=("unit", "centre", "whiten"))
    aggregate: str = _opt("mean", "ntk-rules: mean, max, rr (round robin) or tsds", choices=("mean", "max", "rr", "tsds"))
    feature_dim: int = _opt(8192, "ntk-max, ntk-rr, ntk-whiten, ntk-tsds, ntk-rules: feature projection dimension")
    whiten_shrinkage: float = _opt(0.5, "ntk-whiten, ntk-tsds (ntk-rules --features whiten): covariance shrinkage rho in (0, 1]")
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
    model_dtype: str = _opt(
        "auto", "dtype of the model's weights: auto (the checkpoint's own on CUDA, float32 on a CPU), bfloat16, float16 or float32", choices=MODEL_DTYPES
    )
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    threads: int = _opt(0, "CPU threads (0 = torch's default)")
    overwrite: bool = _opt(False, "discard finished cells in --out and start over")
    records: str = _opt(
        "",
        "folder of benchmark records to keep in the repository: finished cells are read from it (a rerun on a fresh clone skips them) "
        "and written to it, one JSON per cell, under <device>-<precision>/",
    )

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
        known = all_methods()
        bad = [m for m in out if m not in known]
        if bad or not out:
            raise NtkSelectError(f"--methods: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(known)}")
        return list(dict.fromkeys(out))

    def recipe(self) -> FinetuneRecipe:
        return FinetuneRecipe(
            epochs=self.ft_epochs, lr=self.ft_lr, batch_size=self.ft_batch_size, max_length=self.ft_max_length, lora_r=self.lora_r, lora_alpha=self.lora_alpha
        )

    def select_config(self, method: str, seed: int, out: str) -> SelectConfig:
        """The selection options of ``method`` (the baseline and the oracle select nothing: random's).

        Every option this config shares with :class:`SelectConfig` by name is passed on: the
        shared ones (model, LoRA, warm-up, batching) and each registered selector's own
        (``options`` of its registration), so a selector's option reaches ``evaluate`` by
        adding a field of the same name here."""
        shared = {f.name for f in fields(SelectConfig)} & {f.name for f in fields(self)}
        kw = {name: getattr(self, name) for name in sorted(shared)}
        kw.update(
            domain=self.domain_train,
            out=out,
            method=method if method in selector_names() else "random",
            seed=seed,
            max_batch_tokens=max(self.max_batch_tokens, self.max_length),
            overwrite=True,
        )
        return SelectConfig(**kw)

    def validate(self) -> EvalConfig:
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
        if ORACLE in self.method_list() and not self.domain_extra:
            raise NtkSelectError("--methods oracle needs --domain-extra: a file of further in-domain records to draw the oracle's N from")
        for m in self.method_list():
            self.select_config(m, 0, self.out or "-").validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_toml(cls, path: str, overrides: dict | None = None) -> EvalConfig:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
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
            why: str | None
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
        kw: dict[str, Any] = {k.replace("-", "_"): (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in data.items()}
        for k in ("seeds", "methods"):
            if k in kw:
                kw[k] = str(kw[k])
        kw.update(overrides or {})
        try:
            return cls(**kw)
        except TypeError as err:
            raise NtkSelectError(f"{path}: {err}") from None


# -- the run ---------------------------------------------------------------------------------


#: options added after evaluations were run (besides tsds_*): at their defaults they leave the fingerprint as it was
_LATER_OPTIONS: tuple[str, ...] = ("domain_extra", "kernel", "probes", "normalise", "diverse", "diversity_lambda", "ensemble", "checkpoints")
_LATER_OPTIONS += ("cosine", "weighted_vote", "vote_weight", "features", "aggregate", "feature_dim", "whiten_shrinkage")  # issue 25


def _fingerprint(cfg: EvalConfig) -> dict:
    # seeds and methods are left out: cells are per (method, seed), so adding either reuses the rest
    keep = {k: v for k, v in cfg.to_dict().items() if k not in ("overwrite", "out", "threads", "device", "seeds", "methods", "records")}
    # options added after evaluations were run count only when changed, so such an evaluation still resumes (and takes --methods tsds)
    keep = {k: v for k, v in keep.items() if not ((k.startswith("tsds_") or k in _LATER_OPTIONS) and v == EvalConfig.__dataclass_fields__[k].default)}
    return {"config": keep, "inputs": {k: sha256_path(getattr(cfg, k)) for k in _input_fields(cfg)}}


def _input_fields(cfg: EvalConfig) -> tuple[str, ...]:
    return ("domain_train", "domain_test", "pool") + (("domain_extra",) if cfg.domain_extra else ())


def _records_fingerprint(fp: dict) -> dict:
    """The fingerprint without the input paths (their contents' hashes stay): the same files
    in another checkout, under another path, give the same records."""
    paths = ("domain_train", "domain_test", "pool", "domain_extra")
    return {"config": {k: v for k, v in fp["config"].items() if k not in paths}, "inputs": fp["inputs"]}


def _meta(cfg: EvalConfig, inp, test) -> dict:
    """What the results' text says about the inputs, besides the cells: enough to render the
    tables from the records alone (:func:`results_markdown`)."""
    return {
        "domain_train": Path(cfg.domain_train).name,
        "domain_test": Path(cfg.domain_test).name,
        "pool": Path(cfg.pool).name,
        "n": cfg.n,
        "n_domain": len(inp.domain),
        "n_pool": len(inp.pool),
        "n_test": len(test.records),
        "n_test_mc": len(test.items),
        "model": cfg.model,
        "recipe": cfg.recipe().to_dict(),
        "excluded_test_questions": inp.excluded.get("test_questions", 0),
    }


def _refuse(cfg: EvalConfig, run: Run) -> dict | None:
    """In the locked --out: refuse an earlier evaluation with another configuration (without
    --overwrite), before the inputs are read; the fingerprint of this one (None for a new --out:
    it is taken once the inputs have been read)."""
    if run.state == "new" or cfg.overwrite:
        return None
    fp = _fingerprint(cfg)
    old = run.setup()
    if old.get("fingerprint") != fp:
        changed = [k for k in fp["config"] if old.get("fingerprint", {}).get("config", {}).get(k) != fp["config"][k]]
        changed += [f"{k} (contents)" for k in fp["inputs"] if old.get("fingerprint", {}).get("inputs", {}).get(k) != fp["inputs"][k]]
        raise NtkSelectError(
            f"{run.out} holds an evaluation with a different configuration ({', '.join(changed) or 'format'}); "
            "pass --overwrite to start over or choose another --out"
        )
    return fp


def _prepare(cfg: EvalConfig, run: Run, fp: dict | None, log, before_write=None) -> Run:
    """Decide where this evaluation writes in the locked --out (runfolder.py): a rerun with the
    same configuration resumes in place (another one was refused by :func:`_refuse`);
    --overwrite writes the new evaluation aside and swaps it in only once it has finished. Only
    ntkselect's own entries are replaced."""
    check_model_options(cfg.model, "all-linear", cfg.lora_r, tokenizer=load_tokenizer(cfg.model))
    fp = fp or _fingerprint(cfg)
    out = run.out
    if before_write is not None:
        before_write()  # e.g. the preflight: after every refusal of --out, before anything is written to it
    if run.state != "new" and not cfg.overwrite:
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
    return {
        "--domain-train": cfg.domain_train,
        "--domain-test": cfg.domain_test,
        "--pool": cfg.pool,
        "--domain-extra": cfg.domain_extra or None,
        "--model": cfg.model if cfg.model not in ("", "default") and Path(cfg.model).is_dir() else None,
    }


def _cell_path(out: Path, method: str, seed: int | None) -> Path:
    return out / "cells" / (f"{method}.json" if seed is None else f"{method}-seed{seed}.json")


def _composition(records: list[Record], top: int = 6) -> dict:
    """What a training addition is made of: top subjects, sources, and (for benchmark pools
    whose records carry a ``relation`` field) how many are related to the domain."""
    import collections

    groups = collections.Counter(record_group(r) for r in records)
    src = collections.Counter(str(r.raw.get("source", Path(r.path).name)) for r in records)
    rel = collections.Counter(str(r.raw["relation"]) for r in records if "relation" in r.raw)
    return {
        "composition": dict(groups.most_common(top)),
        "by_source": dict(sorted(src.items(), key=lambda kv: -kv[1])),
        "by_relation": dict(sorted(rel.items())),
    }


@dataclass
class _TestSet:
    """The test records, scored two ways: every record by held-out loss, those that carry
    options also by accuracy."""

    records: list[Record]
    examples: list  # TokenizedExample per record, the training convention's trained tokens
    items: list  # MCItem for the multiple-choice records
    questions: TestQuestions  # the leak check (leak.py)
    mc_index: list[int] = field(default_factory=list)  # the record of each item


def _test_model(model, tokenizer, test: _TestSet, rt, cfg: EvalConfig, desc: str) -> dict:
    # an item whose options are single tokens right after the prompt (MMLU: the response "B. ...")
    # is scored from the loss pass's logits at that position: the same prefix, no second pass
    probes = loss_pass_probes(tokenizer, test.items, [test.examples[i] for i in test.mc_index], cfg.template, cfg.eval_max_length)
    lr = heldout_loss(
        model, test.examples, rt, ids=[r.id for r in test.records], desc=f"{desc} (loss)", probes={test.mc_index[k]: v for k, v in probes.items()}
    )
    row: dict[str, Any] = {
        "loss": lr.mean,
        "losses": [float(x) for x in lr.loss],
        "loss_tokens": int(lr.tokens.sum()),
        "n_test": len(test.records),
        "n_test_mc": len(test.items),
        "eval_seconds": lr.seconds,
        "eval_tokens": int(sum(len(e.input_ids) for e in test.examples)),
    }
    if not test.items:
        return {**row, "accuracy": None, "mean_p_correct": None, "n_correct": None}
    loglik: list = [lr.probes.get(test.mc_index[k]) for k in range(len(test.items))]
    rest = [k for k in range(len(test.items)) if k not in probes]
    more_s, more_tok = 0.0, 0
    if rest:  # the others need their own pass
        more = evaluate_mc(model, tokenizer, [test.items[k] for k in rest], rt, cfg.template, cfg.eval_max_length, desc=desc)
        for k, ll in zip(rest, more.loglik):
            loglik[k] = ll
        more_s, more_tok = more.seconds, more.tokens
    res = mc_from_probes(test.items, loglik)
    # P(correct): the softmax over the options of the correct one's log-likelihood. Accuracy only
    # moves when an argmax flips; this moves with every question, so it sees smaller effects.
    p_correct = [float(np.exp(ll[it.answer] - np.logaddexp.reduce(ll))) for ll, it in zip(res.loglik, test.items)]
    row.update(
        {
            "accuracy": res.accuracy,
            "mean_p_correct": float(np.mean(p_correct)),
            "p_correct": [round(p, 6) for p in p_correct],
            "n_correct": int(res.correct.sum()),
            "correct": res.correct.astype(int).tolist(),
            "pred": res.pred.tolist(),
            "mc_from_loss_pass": len(probes),
            "eval_seconds": lr.seconds + more_s,
            "eval_tokens": row["eval_tokens"] + more_tok,
        }
    )
    return row


def _warmup_is_finetune(ctx: SelectionContext, recipe: FinetuneRecipe, examples: list, seed: int) -> bool:
    """Whether the seed's warm-up on D is exactly the domain-only fine-tune: the same training
    loop with the same options (learning rate, epochs, batch size, LoRA, seed, no dropout) on the
    same tokens. The benchmark's configs warm up at another learning rate, so there it is not."""
    if dataclasses.asdict(ctx.lora_options()) != dataclasses.asdict(finetune_options(recipe, seed)):
        return False
    same = lambda a, b: list(a.input_ids) == list(b.input_ids) and list(a.train_mask) == list(b.train_mask)  # noqa: E731
    return len(ctx.dom_ex) == len(examples) and all(same(a, b) for a, b in zip(ctx.dom_ex, examples))


def _load_extra(cfg: EvalConfig, domain: list[Record], test: _TestSet) -> list[Record]:
    """The oracle's source: further in-domain records, refused if any repeats a D or test question."""
    if not cfg.domain_extra:
        return []
    extra = load_records(cfg.domain_extra)
    dom_q = TestQuestions(domain)  # the same containment check, with D's questions as the ones to protect
    for r in extra:
        if test.questions.leaks(r.raw) or dom_q.leaks(r.raw):
            side = "test set" if test.questions.leaks(r.raw) else "training set D"
            raise NtkSelectError(f"{cfg.domain_extra}: record {r.id!r} repeats a question of the {side}; the oracle's records must be unseen, remove it")
    return extra


def _oracle_pick(extra: list[Record], n: int, seed: int) -> list[Record]:
    """N distinct records of --domain-extra, a seeded uniform sample (file order kept)."""
    rng = np.random.default_rng([seed, 0x4F52434C])
    idx = np.sort(rng.choice(len(extra), size=n, replace=False))
    return [extra[int(i)] for i in idx]


def run_evaluation(cfg: EvalConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run the evaluation; progress messages go to ``log`` (default: this module's logger, at INFO)."""
    with contextlib.ExitStack() as stack:  # holds the lock on --out to the end (runfolder.py)
        return _run_evaluation(cfg, log or logger.info, stack)


def _run_evaluation(cfg: EvalConfig, log, stack: contextlib.ExitStack) -> dict:
    cfg.validate()
    t_start = time.perf_counter()
    check_paths(cfg.out, EVALUATE, _eval_inputs(cfg))
    # the lock is the first thing that touches --out (runfolder.py): a second evaluation into it is refused here
    run = stack.enter_context(open_run(cfg.out, EVALUATE, _eval_inputs(cfg), log=log))
    fp = _refuse(cfg, run)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seeds, methods = cfg.seed_list(), cfg.method_list()
    test_records = load_records(cfg.domain_test)
    if not test_records:
        raise NtkSelectError(f"{cfg.domain_test}: the test set is empty")
    mc_index = [i for i, r in enumerate(test_records) if is_mc_record(r)]
    items = mc_items([test_records[i] for i in mc_index])
    test_q = TestQuestions(test_records)  # leak.py: containment in every field a record trains on
    base_cfg = cfg.select_config("ntk", seeds[0], cfg.out)
    # no method may select a test question: such pool records are left out as the pool is read, for every method alike
    leaks = ("test_questions", lambda r: test_q.leaks(r.raw), sha256_path(cfg.domain_test))
    inp = load_inputs(base_cfg, log, exclude_texts=None, drop=[leaks], temp_dir=run.out)
    stack.callback(inp.close)  # the temporary token store goes with the run
    if inp.excluded.get("test_questions"):
        log(f"ntkselect evaluate: excluded {inp.excluded['test_questions']} pool records whose question is in the test set")
    tokenizer = inp.tokenizer
    test_ex = tokenize_records(test_records, tokenizer, cfg.eval_max_length, cfg.template)[0]
    test = _TestSet(test_records, test_ex, items, test_q, mc_index)
    extra = _load_extra(cfg, inp.domain, test)
    if ORACLE in methods and len(extra) < cfg.n:
        raise NtkSelectError(f"--domain-extra {cfg.domain_extra} has {len(extra)} records, fewer than --n {cfg.n}; the oracle draws N of them")
    leak = [r.id for r in inp.domain if test_q.leaks(r.raw)]
    if leak:
        raise NtkSelectError(
            f"{cfg.domain_train}: {len(leak)} training question(s) also appear in {cfg.domain_test} (e.g. id {leak[0]!r}); "
            "remove them, the test set must be unseen"
        )
    if cfg.n > len(inp.pool):
        raise NtkSelectError(f"--n {cfg.n} is larger than the usable pool ({len(inp.pool)} records); lower --n")
    # the model through every path the methods and the fine-tune use, on a tiny batch: an unsupported one fails now
    preflight = []
    rt = make_runtime(base_cfg, tokenizer, inp.setup)
    fp = fp or _fingerprint(cfg)
    label = device_label(rt)  # the device type and precision: cells of another are never mixed in
    meta = _meta(cfg, inp, test)
    recs: list[RecordSet] = []

    def before_write() -> None:
        if cfg.records:  # a records folder of another configuration is refused before anything is written
            recs.append(RecordSet.open(cfg.records, _records_fingerprint(fp), label, meta))
        preflight.append(preflight_select(base_cfg, inp.dom_ex, tokenizer.pad_token_id, methods=methods, finetune=True, log=log, setup=inp.setup))

    _prepare(cfg, run, fp, log, before_write=before_write)
    checked = preflight[0]  # the inputs and the model are checked: only now is --out written
    out = run.dir
    assert checked is not None and out is not None  # the fine-tune uses the model; _prepare chose the folder
    rec_set = recs[0] if recs else None
    rt.memory = checked.memory  # batches sized to the memory budget (ntkselect.model.memory)
    if rt.device.type == "cuda" and checked.memory is not None:
        # the selection's warmed-up model and each fine-tune's fresh one are on the device at once; the preflight budgeted one
        itemsize = torch.empty((), dtype=rt.model_dtype).element_size()
        rt.memory = with_second_model(checked.memory, rt.device, itemsize * model_facts(base_cfg)["params"])
    recipe = cfg.recipe()
    ft_cache: dict[str, list] = {}

    def ft_examples(records: list[Record]) -> list:
        key = "\x00".join(r.id for r in records)
        if key not in ft_cache:
            ft_cache.clear()
            ft_cache[key] = tokenize_records(records, tokenizer, recipe.max_length, cfg.template)[0]
        return ft_cache[key]

    def done(method: str, seed: int | None) -> bool:
        """Whether the cell is finished: in --out (then also kept in the records), or in the
        records (then copied into --out)."""
        path = _cell_path(out, method, seed)
        if path.exists():
            row = json.loads(path.read_text())
            if row.get("label", label) != label:
                raise NtkSelectError(
                    f"{path}: computed on {row['label']}, this run is on {label}; cells of different devices or precisions are not mixed: choose another --out"
                )
            if rec_set is not None and "label" in row and rec_set.get(method, seed) is None:
                rec_set.put(row, rt)
            return True
        row = rec_set.get(method, seed) if rec_set is not None else None
        if row is None:
            return False
        atomic_write_json(path, row)
        log(f"ntkselect evaluate: {method}{'' if seed is None else f', seed {seed}'}: taken from {rec_set.path(method, seed) if rec_set else ''}")
        return True

    def finished(row: dict) -> None:
        atomic_write_json(_cell_path(out, row["method"], row["seed"]), row)
        if rec_set is not None:
            rec_set.put(row, rt)

    # -- the base model: no fine-tuning, one row ------------------------------------------
    if not done("base", None):
        log("ntkselect evaluate: base model")
        model = load_model(cfg.model, rt.model_dtype, rt.device)
        row = {
            "method": "base",
            "seed": None,
            "label": label,
            "n_selected": 0,
            "selection_seconds": 0.0,
            "selection_tokens": 0,
            "finetune_seconds": 0.0,
            "finetune_tokens": 0,
            "test_overlap": 0,
            **_composition([]),
        }
        row.update(_test_model(model, tokenizer, test, rt, cfg, "evaluate: base"))
        finished(row)
        del model

    for seed in seeds:
        todo = [m for m in methods if not done(m, seed)]
        if not todo:
            continue
        scfg = cfg.select_config("ntk", seed, str(out))
        # the seed's shared selection work (warm-up, embeddings, shards) is kept in --out under a key of
        # everything it is computed from, so an interrupted seed resumes it; it goes once the seed is done
        work = out / "work" / f"seed{seed}"
        ctx = SelectionContext(scfg, inp.domain, inp.pool, inp.dom_ex, inp.pool_ex, rt, log, work_dir=str(work), key=digest(fp, seed, label), setup=inp.setup)
        try:
            for method in todo:
                log(f"ntkselect evaluate: seed {seed}, {method}")
                t = time.perf_counter()
                sel_s, sel_tok = 0.0, 0
                if method == BASELINE:
                    selected = []
                elif method == ORACLE:
                    selected = _oracle_pick(extra, cfg.n, seed)
                else:
                    mcfg = dataclasses.replace(scfg, method=method, out=str(Path(cfg.out) / "selections" / f"{method}-seed{seed}"))
                    ranking = get_selector(method).rank(ctx, cfg.n)
                    res = write_selection(out / "selections" / f"{method}-seed{seed}", mcfg, inp, ctx, ranking, rt, t)
                    selected = res.selected
                    sel_s, sel_tok = ctx.cost(ranking)
                train = list(inp.domain) + selected
                overlap = sum(test_q.leaks(r.raw) for r in train)
                if overlap:
                    raise NtkSelectError(f"{method}, seed {seed}: {overlap} training examples share a question with the test set; refusing to report")
                if method == BASELINE and _warmup_is_finetune(ctx, recipe, ft_examples(train), seed):
                    # the seed's warm-up is this very fine-tune (same loop, options and tokens): train it once
                    model = ctx.model()
                    ft: dict[str, Any] = {
                        "seconds_total": ctx.shared_seconds.get("warmup", 0.0),
                        "tokens": int(round(sum(len(e.input_ids) for e in ft_examples(train)) * recipe.epochs)),
                        "loss_last": (ctx.warmup_summary or {}).get("loss_last"),
                        "shared": "warmup",
                    }
                else:
                    model, ft = finetune(cfg.model, ft_examples(train), recipe, rt, seed, desc=f"fine-tune: {method}, seed {seed}")
                row = {
                    "method": method,
                    "seed": seed,
                    "label": label,
                    "n_selected": len(selected),
                    "selection_seconds": round(sel_s, 3),
                    "selection_tokens": int(sel_tok),
                    "finetune_seconds": round(ft["seconds_total"], 3),
                    "finetune_tokens": ft["tokens"],
                    "finetune_loss_last": ft.get("loss_last"),
                    **({"finetune_shared": ft["shared"]} if "shared" in ft else {}),
                    "test_overlap": overlap,
                    "selected_ids": [r.id for r in selected],
                    **_composition(selected),
                }
                row.update(_test_model(model, tokenizer, test, rt, cfg, f"evaluate: {method}, seed {seed}"))
                del model
                finished(row)
                acc = f", accuracy {row['accuracy']:.4f} ({row['n_correct']}/{row['n_test_mc']})" if row["accuracy"] is not None else ""
                log(f"ntkselect evaluate: seed {seed}, {method}: held-out loss {row['loss']:.4f}{acc}")
        finally:
            ctx.release()
        shutil.rmtree(work, ignore_errors=True)  # ntkselect's own scratch, under the run's own work/
    with contextlib.suppress(OSError):
        (out / "work").rmdir()  # only when empty

    manifest = write_results(cfg, out, seeds, methods, inp, time.perf_counter() - t_start, meta)
    run.commit()  # with --overwrite: the new evaluation replaces the earlier one only now
    return manifest


def _load_cells(out: Path, seeds, methods) -> tuple[dict, dict]:
    base = json.loads(_cell_path(out, "base", None).read_text())
    cells = {(m, s): json.loads(_cell_path(out, m, s).read_text()) for m in methods for s in seeds}
    return base, cells


def _sd(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(x.std(ddof=1)) if len(x) > 1 else 0.0


def summarise_loss(cells: dict, methods, seeds, n_boot: int = 2000) -> dict:
    """Per method: the held-out loss (mean, sd over seeds); against domain-only and random: the
    paired per-example difference (mean, sign-flip p over examples on the seed-averaged
    difference, bootstrap interval over seeds and examples); with an oracle, the gap closed."""
    L = {m: np.array([cells[(m, s)]["losses"] for s in seeds], dtype=np.float64) for m in methods}  # (seeds, examples)
    idx = bootstrap_indices(len(seeds), next(iter(L.values())).shape[1], n_boot)
    out: dict[str, dict] = {}
    for m in methods:
        per_seed = L[m].mean(axis=1)
        row: dict[str, Any] = {"loss_mean": float(per_seed.mean()), "loss_std": _sd(per_seed)}
        for ref, tag in ((BASELINE, "vs_domain_only"), ("random", "vs_random")):
            if ref in L and ref != m:
                d = L[m] - L[ref]  # (seeds, examples): negative = lower loss than ref
                lo, hi = paired_bootstrap(L[m], L[ref], idx)
                row[tag] = {
                    "delta": float(d.mean()),
                    "ci95": [lo, hi],
                    "p_value": paired_sign_flip_test(d.mean(axis=0), seed=0),
                    "better": int((d.mean(axis=0) < 0).sum()),
                    "worse": int((d.mean(axis=0) > 0).sum()),
                }
        if ORACLE in L and "random" in L and m not in (ORACLE, "random"):
            g = gap_closed(L[m], L["random"], L[ORACLE], idx)
            row["gap_closed"] = {"value": g.value, "ci95": [g.low, g.high]}
        out[m] = row
    return out


def calibration(loss: dict, methods) -> dict:
    """Whether this benchmark can see a difference: the oracle's loss beats random's with
    p < CALIBRATION_ALPHA. Without both rows there is no calibration."""
    if ORACLE not in methods or "random" not in methods:
        return {"checked": False, "sensitive": None, "reason": "needs the oracle and random rows"}
    v = loss[ORACLE]["vs_random"]
    ok = v["delta"] < 0 and v["p_value"] < CALIBRATION_ALPHA
    return {"checked": True, "sensitive": bool(ok), "oracle_minus_random": v["delta"], "p_value": v["p_value"], "ci95": v["ci95"], "alpha": CALIBRATION_ALPHA}


def summarise_accuracy(cells: dict, methods, seeds) -> dict:
    """As before issue 10: accuracy and P(correct) per method, deltas to domain-only, for the
    multiple-choice test records; empty when the test set has none."""
    if any(cells[(m, s)].get("accuracy") is None for m in methods for s in seeds):
        return {}
    ref = BASELINE if BASELINE in methods else None
    summary = {}
    for m in methods:
        accs = np.array([cells[(m, s)]["accuracy"] for s in seeds])
        corr = np.mean([cells[(m, s)]["correct"] for s in seeds], axis=0)  # (n_test,) mean over seeds
        pcs = np.array([cells[(m, s)].get("mean_p_correct", np.nan) for s in seeds])
        row = {"mean": float(accs.mean()), "std": _sd(accs), "p_correct_mean": float(pcs.mean()), "p_correct_std": _sd(pcs)}
        if ref and m != ref:
            d = corr - np.mean([cells[(ref, s)]["correct"] for s in seeds], axis=0)
            deltas = [cells[(m, s)]["accuracy"] - cells[(ref, s)]["accuracy"] for s in seeds]
            row.update(
                delta=float(np.mean(deltas)),
                delta_std=_sd(deltas),
                p_value=paired_sign_flip_test(d, seed=0),
                wins=int((d > 0).sum()),
                losses=int((d < 0).sum()),
            )
            if all("p_correct" in cells[(x, s)] for x in (m, ref) for s in seeds):
                dp = np.mean([cells[(m, s)]["p_correct"] for s in seeds], 0) - np.mean([cells[(ref, s)]["p_correct"] for s in seeds], 0)
                row.update(p_correct_delta=float(dp.mean()), p_correct_p_value=paired_sign_flip_test(dp, seed=0))
        summary[m] = row
    return summary


def _cost(cells: dict, m: str, seeds) -> dict:
    return {k: float(np.mean([cells[(m, s)][k] for s in seeds])) for k in ("selection_seconds", "selection_tokens", "finetune_seconds")}


def write_results(cfg: EvalConfig, out: Path, seeds, methods, inp, seconds: float, meta: dict) -> dict:
    base, cells = _load_cells(out, seeds, methods)
    loss = summarise_loss(cells, methods, seeds)
    acc = summarise_accuracy(cells, methods, seeds)
    calib = calibration(loss, methods)
    cost = {m: _cost(cells, m, seeds) for m in methods}
    _write_csv(out / "results.csv", methods, seeds, base, cells, loss, acc, cost)
    with atomic_open(out / "results.md") as f:
        f.write(results_markdown(meta, methods, seeds, base, cells))
    plot_results(out / "results.png", methods, seeds, cells, base)
    summary = {m: {**loss[m], **({"accuracy": acc[m]} if acc else {}), **cost[m], "seeds": len(seeds)} for m in methods}
    manifest = {
        "tool": "ntkselect",
        "command": "evaluate",
        "config": cfg.to_dict(),
        "recipe": cfg.recipe().to_dict(),
        "seeds": seeds,
        "methods": methods,
        "versions": package_versions(),
        "inputs": {k: {"path": os.path.abspath(getattr(cfg, k)), "sha256": sha256_path(getattr(cfg, k))} for k in _input_fields(cfg)},
        "excluded_pool_records": inp.excluded,
        "n_test": base["n_test"],
        "n_test_mc": base.get("n_test_mc", 0),
        "base": {"loss": base["loss"], "accuracy": base.get("accuracy")},
        "base_accuracy": base.get("accuracy"),
        "calibration": calib,
        "summary": summary,
        "seconds_this_invocation": round(seconds, 1),
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def _f(x, fmt: str = ".4f") -> str:
    return "" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, fmt)


def _write_csv(path: Path, methods, seeds, base, cells, loss, acc, cost) -> None:
    """One row per (method, seed), then mean and sd rows per method."""
    cols = [
        "method",
        "seed",
        "loss",
        "loss_delta_vs_domain_only",
        "loss_delta_vs_random",
        "loss_p_vs_random",
        "gap_closed",
        "gap_closed_low",
        "gap_closed_high",
        "accuracy",
        "n_correct",
        "n_test",
        "n_selected",
        "delta_vs_domain_only",
        "p_value",
        "selection_seconds",
        "selection_tokens",
        "finetune_seconds",
        "eval_seconds",
        "test_overlap",
        "by_relation",
        "by_source",
        "top_subjects",
    ]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    blank = {c: "" for c in cols}

    def put(**kw):
        w.writerow([kw.get(c, blank[c]) for c in cols])

    put(
        method="base",
        loss=_f(base["loss"], ".6f"),
        accuracy=_f(base.get("accuracy"), ".6f"),
        n_correct=_f(base.get("n_correct"), "d"),
        n_test=base["n_test"],
        n_selected=0,
        eval_seconds=f"{base['eval_seconds']:.1f}",
        test_overlap=0,
    )
    for m in methods:
        for s in seeds:
            c = cells[(m, s)]
            dl = {
                tag: f"{c['loss'] - cells[(ref, s)]['loss']:.6f}"
                for ref, tag in ((BASELINE, "loss_delta_vs_domain_only"), ("random", "loss_delta_vs_random"))
                if ref in methods and ref != m
            }
            da = {"delta_vs_domain_only": f"{c['accuracy'] - cells[(BASELINE, s)]['accuracy']:.6f}"} if acc and BASELINE in methods and m != BASELINE else {}
            put(
                method=m,
                seed=s,
                loss=f"{c['loss']:.6f}",
                accuracy=_f(c.get("accuracy"), ".6f"),
                n_correct=_f(c.get("n_correct"), "d"),
                n_test=c["n_test"],
                n_selected=c["n_selected"],
                selection_seconds=f"{c['selection_seconds']:.1f}",
                selection_tokens=c["selection_tokens"],
                finetune_seconds=f"{c['finetune_seconds']:.1f}",
                eval_seconds=f"{c['eval_seconds']:.1f}",
                test_overlap=c["test_overlap"],
                by_relation="; ".join(f"{k}:{v}" for k, v in c.get("by_relation", {}).items()),
                by_source="; ".join(f"{k}:{v}" for k, v in c["by_source"].items()),
                top_subjects="; ".join(f"{k}:{v}" for k, v in c["composition"].items()),
                **dl,
                **da,
            )
        r, a = loss[m], acc.get(m, {})
        g = r.get("gap_closed", {})
        put(
            method=m,
            seed="mean",
            loss=f"{r['loss_mean']:.6f}",
            loss_delta_vs_domain_only=_f(r.get("vs_domain_only", {}).get("delta"), ".6f"),
            loss_delta_vs_random=_f(r.get("vs_random", {}).get("delta"), ".6f"),
            loss_p_vs_random=_f(r.get("vs_random", {}).get("p_value"), ".4g"),
            gap_closed=_f(g.get("value")),
            gap_closed_low=_f((g.get("ci95") or [None])[0]),
            gap_closed_high=_f((g.get("ci95") or [None, None])[1]),
            accuracy=_f(a.get("mean"), ".6f"),
            n_selected=cells[(m, seeds[0])]["n_selected"],
            delta_vs_domain_only=_f(a.get("delta"), ".6f"),
            p_value=_f(a.get("p_value"), ".4g"),
            selection_seconds=f"{cost[m]['selection_seconds']:.1f}",
            selection_tokens=int(cost[m]["selection_tokens"]),
            finetune_seconds=f"{cost[m]['finetune_seconds']:.1f}",
            test_overlap=0,
        )
        put(method=m, seed="std", loss=f"{r['loss_std']:.6f}", accuracy=_f(a.get("std"), ".6f"), delta_vs_domain_only=_f(a.get("delta_std"), ".6f"))
    with atomic_open(path) as f:
        f.write(buf.getvalue())


def _ci(v: dict | None, scale: float = 1.0, fmt: str = "+.4f") -> str:
    if not v:
        return ""
    lo, hi = v["ci95"]
    return f"[{format(scale * lo, fmt)}, {format(scale * hi, fmt)}]" if np.isfinite(lo) and np.isfinite(hi) else "n/a"


def results_markdown(meta: dict, methods, seeds, base: dict, cells: dict, level: int = 1) -> str:
    """The results' text from the cells and :func:`_meta` alone (results.md; the records'
    tables in docs/RESULTS.md). ``level`` is the depth of its first heading."""
    loss = summarise_loss(cells, methods, seeds)
    acc = summarise_accuracy(cells, methods, seeds)
    calib = calibration(loss, methods)
    cost = {m: _cost(cells, m, seeds) for m in methods}
    h1, h2 = "#" * level, "#" * (level + 1)
    n_test, n_mc = base["n_test"], base.get("n_test_mc", 0)
    lines = [
        f"{h1} ntkselect evaluate: {meta['domain_train']} + N = {meta['n']} from {meta['pool']}",
        "",
        f"Test: {n_test} records from {meta['domain_test']} ({n_mc} with options); |D| = {meta['n_domain']}; "
        f"pool {meta['n_pool']} usable records; seeds {', '.join(map(str, seeds))}; model {meta['model']}.",
        "",
    ]
    if calib["checked"]:
        verdict = (
            "**The benchmark is sensitive here:** the oracle's held-out loss beats random's "
            f"by {calib['oracle_minus_random']:+.4f} nats/token (95% CI {_ci(calib)}, paired p = {calib['p_value']:.3g} < {calib['alpha']})."
        )
        if not calib["sensitive"]:
            verdict = (
                "**This domain does not count:** the oracle does not beat random with p < "
                f"{calib['alpha']} (oracle − random {calib['oracle_minus_random']:+.4f}, p = {calib['p_value']:.3g}), so this benchmark "
                "cannot tell selectors apart at these sizes and this recipe; change them on this check alone, never on a selector's result."
            )
        lines += [verdict, ""]
    else:
        lines += [
            "Calibration not checked: add the `oracle` (with --domain-extra) and `random` rows to see whether this benchmark can tell selectors apart.",
            "",
        ]
    lines += [
        f"{h2} Held-out domain loss",
        "",
        "| method | loss (mean ± sd over seeds) | Δ vs domain-only [95% CI] | Δ vs random [95% CI] | paired p vs random "
        "| better / worse examples vs random | gap closed [95% CI] | related selected | selection time | selection tokens | fine-tune time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| base (no fine-tuning) | {base['loss']:.4f} | | | | | | | | | |",
    ]
    for m in methods:
        r, c = loss[m], cost[m]
        dd, dr = r.get("vs_domain_only"), r.get("vs_random")
        g = r.get("gap_closed")
        lines.append(
            f"| {m} | {r['loss_mean']:.4f} ± {r['loss_std']:.4f} | {_delta(dd)} | {_delta(dr)} | {_f(dr and dr['p_value'], '.3g')} | "
            f"{_better(dr)} | {_gap(g)} | {_related(cells, m, seeds)} | {c['selection_seconds']:.0f} s | "
            f"{c['selection_tokens'] / 1e3:.0f}K | {c['finetune_seconds']:.0f} s |"
        )
    lines += [
        "",
        "Loss: mean negative log-likelihood per trained token of each test record's response (the tokens training trains on), "
        "averaged over records, in nats. Δ < 0: lower loss than the reference. Intervals: percentile bootstrap (2,000 resamples of "
        "seeds and test records). Paired p: two-sided sign-flip test over test records on the seed-averaged difference. "
        "Gap closed = (L_random − L_method) / (L_random − L_oracle): 0 is random, 1 is the oracle. "
        "Related selected: the share of S whose pool record is labelled related to the domain, mean over seeds. "
        "Selection cost counts the shared warm-up and embeddings for every method that uses them, as if run alone.",
        "",
    ]
    if acc:
        ref = BASELINE if BASELINE in methods else None
        bacc = base["accuracy"]
        lines += [
            f"{h2} Accuracy (option log-likelihood)",
            "",
            "| method | accuracy (mean ± sd over seeds) | Δ vs domain-only (mean ± sd) | paired p | better / worse questions "
            "| P(correct) | Δ P(correct) | paired p |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| base (no fine-tuning) | {100 * bacc:.2f} | {_f(100 * (bacc - acc[ref]['mean']) if ref else None, '+.2f')} | | "
            f"| {_pc(base.get('mean_p_correct'))} | | |",
        ]
        for m in methods:
            r = acc[m]
            d = f"{100 * r['delta']:+.2f} ± {100 * r['delta_std']:.2f}" if "delta" in r else ""
            lines.append(
                f"| {m} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} | {d} | {_f(r.get('p_value'), '.3g')} | "
                f"{_wins(r)} | {_pc(r['p_correct_mean'])} ± {100 * r['p_correct_std']:.2f} | "
                f"{_f(100 * r['p_correct_delta'] if 'p_correct_delta' in r else None, '+.2f')} | {_f(r.get('p_correct_p_value'), '.3g')} |"
            )
        lines += [
            "",
            f"Accuracy in % over the {n_mc} test records with options. P(correct): the softmax over the options' log-likelihoods "
            "of the correct one, in %. Δ: per-seed difference to domain-only. Paired p: sign-flip test over questions on "
            "per-question accuracy averaged over seeds.",
            "",
        ]
    lines += [f"{h2} What each method selected (seed {seeds[0]})", ""]
    lines += ["| method | related / unrelated | by source | top subjects |", "| --- | --- | --- | --- |"]
    for m in methods:
        c = cells[(m, seeds[0])]
        lines.append(
            f"| {m} | {', '.join(f'{k} {v}' for k, v in c.get('by_relation', {}).items()) or '-'} | "
            f"{', '.join(f'{k} {v}' for k, v in c['by_source'].items()) or '-'} | {', '.join(f'{k} {v}' for k, v in c['composition'].items()) or '-'} |"
        )
    lines += [
        "",
        f"{h2} Fine-tuning recipe (every method)",
        "",
        "```json",
        json.dumps(meta["recipe"], indent=1),
        "```",
        "",
        f"Test-set overlap with every training set: {max(c['test_overlap'] for c in cells.values())} (must be 0). "
        f"Pool records excluded as test questions: {meta['excluded_test_questions']}.",
        "",
    ]
    return "\n".join(lines)


def _related(cells: dict, m: str, seeds) -> str:
    """Share of the selection labelled ``relation: related`` (benchmark pools), mean over seeds."""
    shares = [
        cells[(m, s)]["by_relation"].get("related", 0) / cells[(m, s)]["n_selected"]
        for s in seeds
        if cells[(m, s)].get("n_selected") and cells[(m, s)].get("by_relation")
    ]
    return f"{100 * np.mean(shares):.0f}%" if len(shares) == len(seeds) else ""


def _delta(v: dict | None) -> str:
    return f"{v['delta']:+.4f} {_ci(v)}" if v else ""


def _better(v: dict | None) -> str:
    return f"{v['better']} / {v['worse']}" if v else ""


def _gap(g: dict | None) -> str:
    return f"{g['value']:.2f} {_ci(g, fmt='.2f')}" if g else ""


def _wins(r: dict) -> str:
    return f"{r['wins']} / {r['losses']}" if "wins" in r else ""


def _pc(x) -> str:
    return f"{100 * x:.2f}" if x is not None and np.isfinite(x) else ""


def plot_results(path: Path, methods, seeds, cells, base) -> None:
    """Held-out loss (left) and, with options in the test set, accuracy (right), per method."""
    loss = summarise_loss(cells, methods, seeds, n_boot=1)
    acc = summarise_accuracy(cells, methods, seeds)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the tables carry every number; the plot needs the 'report' extra
    panels = [("loss", "held-out loss (nats / token)", lambda c: c["loss"], {m: (loss[m]["loss_mean"], loss[m]["loss_std"]) for m in methods}, base["loss"])]
    if acc:
        panels.append(
            (
                "accuracy",
                "test accuracy (%)",
                lambda c: 100 * c["accuracy"],
                {m: (100 * acc[m]["mean"], 100 * acc[m]["std"]) for m in methods},
                100 * base["accuracy"],
            )
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (1.1 * len(methods) + 2), 3.6), dpi=120, squeeze=False)
    x = np.arange(len(methods))
    colour = {BASELINE: "#999999", ORACLE: "#2ca02c", "ntk": "#d62728", "random": "#8c564b"}
    for ax, (_, label, get, ms, b) in zip(axes[0], panels):
        means = [ms[m][0] for m in methods]
        sds = [ms[m][1] for m in methods]
        ax.bar(x, means, yerr=sds, capsize=4, color=[colour.get(m, "#1f77b4") for m in methods])
        for i, m in enumerate(methods):
            ax.scatter([i] * len(seeds), [get(cells[(m, s)]) for s in seeds], color="black", s=10, zorder=3)
        ax.axhline(b, color="black", linestyle="--", linewidth=1, label=f"base {b:.3g}")
        vals = means + [b]
        pad = 0.1 * (max(vals) - min(vals) + max(sds + [0]) + 1e-9)
        ax.set_ylim(min(vals) - max(sds + [0]) - pad, max(vals) + max(sds + [0]) + pad)
        ax.set_xticks(x, methods, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"mean ± sd over {len(seeds)} seed(s); dots: seeds", fontsize=9)
    fig.tight_layout()
    with atomic_open(path, "wb", encoding=None) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
