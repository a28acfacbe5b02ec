"""The whole selection: inputs → selector (for NTK: warm-up → stage 1 → stage 2) → outputs.

:func:`select` is what ``ntkselect select`` calls. Every output is written atomically and
``manifest.json`` is written last, so a folder with a manifest holds a finished run.
"""

from __future__ import annotations

import collections
import importlib.metadata
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ntkselect.config import SelectConfig
from ntkselect.data.pool import PoolExamples, PoolRecords, TokenStore, build_store, default_workers, find_store, group_of, ids_of, source_of
from ntkselect.data.records import Record, RecordStream, TokenizeStats, record_text, token_convention, tokenize_records
from ntkselect.errors import NtkSelectError
from ntkselect.files import atomic_replace_dir, atomic_write_json, atomic_write_jsonl, sha256_path
from ntkselect.model.adapters import save_adapter
from ntkselect.model.loading import check_model_options
from ntkselect.model.runtime import Runtime
from ntkselect.runs.folder import SELECT, Run, check_paths, open_run
from ntkselect.runs.manifest import output_hashes
from ntkselect.runs.preflight import preflight_select
from ntkselect.runs.setup import RunSetup, make_runtime
from ntkselect.runs.shards import digest
from ntkselect.selection import Ranking, SelectionContext, get_selector, selector_spec
from ntkselect.selection.ntk_variants.selector import ignored_options

__all__ = ["SelectionResult", "Inputs", "select", "select_in", "load_inputs", "make_runtime", "write_selection", "package_versions", "summarise"]

logger = logging.getLogger(__name__)

OUTPUTS = ("selected.jsonl", "scores.jsonl", "train.jsonl", "manifest.json", "adapter")  # also work/, shards.jsonl, run.json: runfolder.SELECT


@dataclass
class SelectionResult:
    out: Path
    selected: list[Record]  # in rank order
    scores: np.ndarray  # (N,) float64, the selected examples' scores
    manifest: dict = field(default_factory=dict)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("ntkselect", "torch", "transformers", "peft", "numpy", "safetensors", "pyarrow", "datasets", "bm25s", "ray"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


#: options that change how the work runs, not what it computes: a run may resume with other values
EXECUTION_ONLY = (
    "out",
    "overwrite",
    "threads",
    "device",
    "executor",
    "ray_address",
    "ray_workers",
    "batch_size",
    "max_batch_tokens",
    "padding_side",
    "shard_size",
    "dry_run",
)


def run_fingerprint(cfg: SelectConfig, hashes: dict | None = None, setup: RunSetup | None = None) -> dict:
    """What a run's results depend on: the options, the inputs' contents (``hashes``: their
    sha256 as read, else hashed now) and the model (``setup``'s fingerprint, else resolved now)."""
    return {
        "config": {k: v for k, v in cfg.to_dict().items() if k not in EXECUTION_ONLY},
        "inputs": hashes or {"domain": sha256_path(cfg.domain), "pool": sha256_path(cfg.pool)},
        "model": (setup or RunSetup.of(cfg)).model_fingerprint,
    }


def _diff(old: dict, new: dict) -> list[str]:
    out = [k for k in new["config"] if old.get("config", {}).get(k) != new["config"][k]]
    out += [f"{k} contents" for k in new["inputs"] if old.get("inputs", {}).get(k) != new["inputs"][k]]
    if old.get("model") != new["model"]:
        out.append("model files")
    return out or ["format"]


def _prepare_out(cfg: SelectConfig, run: Run, fp: dict, log: Callable[[str], None], before_write=None) -> Path:
    """Decide where this run writes, in the run folder ``run`` (locked, see runfolder.py).

    ``run.json`` (written first) records what the run is computed from; ``manifest.json``
    (written last) marks a finished run. A finished run is refused without --overwrite. An
    unfinished run resumes if the configuration, inputs and model are the same and is refused
    otherwise. With --overwrite an earlier run (finished or not) stays in place while the new one
    is written aside; it is replaced only once the new run has succeeded. Only entries that
    ntkselect's record says this command created are ever removed."""
    out = run.out
    state = run.state
    if state == "finished" and not cfg.overwrite:
        raise NtkSelectError(f"{out} already holds a finished run (manifest.json); pass --overwrite to replace it or choose another --out")
    if state == "unfinished" and not cfg.overwrite:
        old = run.setup()
        if old.get("fingerprint") != fp:
            raise NtkSelectError(
                f"{out} holds an unfinished run with a different setup (changed: {', '.join(_diff(old.get('fingerprint', {}), fp))}); "
                "rerun with the same options to resume it, or pass --overwrite to start over"
            )
    if before_write is not None:
        before_write()  # the preflight: after every refusal of --out, before anything is written to it
    if state == "unfinished" and not cfg.overwrite:
        log(f"ntkselect: resuming the unfinished run in {out}")
        return run.in_place(clear=False)
    if state != "new":
        wdir = run.stage(reuse=lambda old: old.get("fingerprint") == fp)
        again = (wdir / "run.json").exists()
        log(f"ntkselect: {'resuming' if again else 'writing'} the new run aside in {wdir}; it replaces the {state} run in {out} once it has succeeded")
    else:
        stale = run.present()
        if stale:
            log(f"ntkselect: {out} holds an unfinished run ({', '.join(stale)}); starting over")
        wdir = run.in_place(clear=True)
    if not (wdir / "run.json").exists():
        atomic_write_json(wdir / "run.json", {"fingerprint": fp, "key": digest(fp)})
    return wdir


def record_group(rec: Record) -> str:
    return group_of(rec.raw, rec.path)


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
    lines.append(
        f"  {manifest.get('method', 'ntk')} scores: selected {lo:.4g} .. {hi:.4g}; "
        f"all ranked candidates {s['score_range_all'][0]:.4g} .. {s['score_range_all'][1]:.4g}"
    )
    lines.append("  time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in manifest["timings"].items()))
    return "\n".join(lines)


@dataclass
class Inputs:
    """Loaded and tokenized inputs of a selection (shared by every method). D is held in
    memory; the pool lives in a token store on disk (:mod:`ntkselect.data.pool`) and
    ``pool`` / ``pool_ex`` read a record or an example back when indexed."""

    domain: list[Record]
    pool: Sequence[Record]  # usable pool (a PoolRecords): exact duplicates of domain records and of earlier pool records removed
    pool_records_in_file: int
    excluded: dict  # {reason: count}
    tokenizer: Any  # a Hugging Face tokenizer
    dom_ex: list
    pool_ex: Sequence  # a PoolExamples
    dom_stats: TokenizeStats
    pool_stats: TokenizeStats
    seconds: float
    hashes: dict = field(default_factory=dict)  # {"domain": sha256, "pool": sha256} of the bytes read
    store: TokenStore | None = None
    owned: bool = False  # whether the store is a temporary one that close() removes
    pool_pass_seconds: float | None = None  # the pool's one read-and-tokenise pass (None: a finished store was reused)
    setup: RunSetup | None = None  # the run's model, tokenizer, device, precision and these hashes, resolved once

    def close(self) -> None:
        """Remove a temporary token store (one not moved into a run folder) and its temporary folder."""
        if self.owned and self.store is not None:
            tmp = self.store.folder.parent
            shutil.rmtree(tmp if tmp.name.startswith(".ntkpool-") else self.store.folder, ignore_errors=True)
            self.owned = False

    def move_store(self, folder: Path) -> None:
        """Keep the token store at ``folder`` (a run's work folder) from now on, for resumes."""
        if self.store is None or self.store.folder == Path(folder):
            return
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(self.store.folder, folder)
        self.store.folder = folder
        self.store.reopen()
        self.owned = False


def _pool_tests(cfg: SelectConfig, domain: list[Record], exclude_texts: set[str] | None, exclude_reason: str, drop) -> tuple[list, str]:
    """The (reason, predicate) tests that leave pool records out, and a key naming them."""
    tests: list = []
    dom_texts = {record_text(r.raw) for r in domain}
    key_parts: list[Any] = [sorted(dom_texts) if not cfg.keep_domain_duplicates else None]
    if not cfg.keep_domain_duplicates:
        tests.append(("duplicates_of_domain", lambda r: record_text(r.raw) in dom_texts))
    if exclude_texts:
        reason = exclude_reason or "excluded"
        tests.append((reason, lambda r: record_text(r.raw) in exclude_texts))
        key_parts.append([reason, sorted(exclude_texts)])
    for reason, test, part in drop:
        tests.append((reason, test))
        key_parts.append([reason, part])
    return tests, digest(key_parts)


def _temp_store(where: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A new temporary folder ``.ntkpool-XXXXXXXX`` in ``where``: the locked run folder ``out``
    (on its file system, so moving the store into the run is a rename; swept by a later run if
    this one is killed), or beside ``out`` for callers without a run folder."""
    try:
        Path(where).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".ntkpool-", dir=where))
    except OSError as err:
        raise NtkSelectError(f"cannot write to --out {out}: {err.strerror or err}; choose a writable folder") from None


def load_inputs(
    cfg: SelectConfig,
    log: Callable[[str], None] | None = None,
    exclude_texts: set[str] | None = None,
    exclude_reason: str = "",
    drop: Sequence[tuple[str, Callable[[Record], bool], Any]] = (),
    store_dir: str | os.PathLike | None = None,
    reuse: Sequence[str | os.PathLike] = (),
    temp_dir: str | os.PathLike | None = None,
    setup: RunSetup | None = None,
) -> Inputs:
    """Read, de-duplicate and tokenize D (into memory) and C (streamed once into a token store).
    ``exclude_texts`` drops further pool records (``ntkselect evaluate`` passes the test set's
    texts, so no method can select a test question); ``drop`` are further (reason, predicate,
    key) tests. The store is made in ``store_dir`` (default: a temporary folder in ``temp_dir``,
    the run folder the caller has locked, else beside ``cfg.out``; :meth:`Inputs.close` removes
    it), or a finished one in ``reuse`` made from the same file, tokenizer and options is used:
    ``reuse`` inside a run folder only while the caller holds its lock (runs/folder.py).
    ``setup`` (default: a new one for ``cfg``) gives the tokenizer and keeps the inputs' hashes;
    the inputs keep it (``.setup``) for the rest of the run."""
    log = log or logger.info
    setup = setup or RunSetup.of(cfg)
    t = time.perf_counter()
    dstream = RecordStream(cfg.domain)
    domain = list(dstream)
    tokenizer = setup.tokenizer
    dom_ex, dom_stats = tokenize_records(domain, tokenizer, cfg.max_length, cfg.template)
    tests, key = _pool_tests(cfg, domain, exclude_texts, exclude_reason, drop)
    store = find_store(reuse, cfg.pool, tokenizer, cfg.max_length, cfg.template, key, log=log)
    owned = False
    pass_s = None
    if store is not None:
        log(f"ntkselect: reusing the tokenised pool in {store.folder} ({store.n} records)")
    else:
        if store_dir is None:
            where = temp_dir if temp_dir is not None else Path(cfg.out).absolute().parent
            store_dir, owned = _temp_store(where, cfg.out) / "pool", True

        def check(rows: int, records: int) -> None:
            if cfg.n > rows:
                dropped = records - rows
                why = f", after excluding {dropped} duplicate records (of domain or test records, or of earlier pool records)" if dropped else ""
                raise NtkSelectError(f"--n {cfg.n} is larger than the pool ({rows} usable records in {cfg.pool}{why}); lower --n or add candidates")

        try:
            workers = cfg.threads or default_workers()  # processes that parse and tokenise the pool
            t_pass = time.perf_counter()
            store = build_store(cfg.pool, tokenizer, cfg.max_length, cfg.template, store_dir, tests, key, progress=True, check=check, workers=workers)
        except BaseException:
            if owned:
                shutil.rmtree(Path(store_dir).parent, ignore_errors=True)
            raise
        pass_s = time.perf_counter() - t_pass
    inp = Inputs(
        domain,
        PoolRecords(store, store.keep),  # a record that repeats an earlier one's text is not a candidate
        int(store.meta["source"]["records"]),
        {},
        tokenizer,
        dom_ex,
        PoolExamples(store, store.keep),
        dom_stats,
        TokenizeStats(**store.meta["stats"]),
        time.perf_counter() - t,
        hashes=setup.hashes,
        store=store,
        owned=owned,
        pool_pass_seconds=pass_s,
        setup=setup,
    )
    setup.hashes.update(domain=dstream.sha256, pool=store.sha256)
    try:
        ex = store.meta["excluded"]
        inp.excluded = {"duplicates_of_domain": int(ex.get("duplicates_of_domain", 0))}
        if inp.excluded["duplicates_of_domain"]:
            log(f"ntkselect: excluded {inp.excluded['duplicates_of_domain']} pool records that duplicate a domain record exactly")
        if exclude_texts:
            reason = exclude_reason or "excluded"
            inp.excluded[reason] = int(ex.get(reason, 0))
            if inp.excluded[reason]:
                log(f"ntkselect: excluded {inp.excluded[reason]} pool records ({reason})")
        for reason, _, _ in drop:
            if ex.get(reason):
                inp.excluded[reason] = int(ex[reason])
        if len(store.duplicates):
            inp.excluded["duplicates_in_pool"] = len(store.duplicates)
            row, first = (int(x) for x in store.duplicates[0])
            lines = store.record(row).line, store.record(first).line
            logger.warning(
                f"ntkselect: warning: {len(store.duplicates)} records of --pool {cfg.pool} repeat the text of an earlier record exactly "
                f"(e.g. line {lines[0]} repeats line {lines[1]}); only the first copy is a candidate, so none is selected twice"
            )
        if cfg.n > len(inp.pool):
            dropped = inp.pool_records_in_file - len(inp.pool)
            why = f", after excluding {dropped} duplicate records (of domain or test records, or of earlier pool records)" if dropped else ""
            raise NtkSelectError(f"--n {cfg.n} is larger than the pool ({len(inp.pool)} usable records in {cfg.pool}{why}); lower --n or add candidates")
        for name, st in (("domain", dom_stats), ("pool", inp.pool_stats)):
            if st.truncated:
                log(f"ntkselect: truncated {st.truncated} of {st.examples} {name} examples to --max-length {cfg.max_length}")
    except BaseException:
        inp.close()
        raise
    return inp


def _run_inputs(cfg: SelectConfig, model_path: str | None = None) -> dict:
    return {"--domain": cfg.domain, "--pool": cfg.pool, "--model": model_path if model_path and Path(model_path).is_dir() else None}


def select(cfg: SelectConfig, log: Callable[[str], None] | None = None) -> SelectionResult:
    """Run ``cfg.method`` on ``cfg.domain`` and ``cfg.pool`` and write the run folder ``cfg.out``.
    Progress messages go to ``log`` (default: this module's logger, at INFO)."""
    log = log or logger.info
    cfg.validate()
    t_start = time.perf_counter()
    check_paths(cfg.out, SELECT, _run_inputs(cfg))  # before the inputs are read: fail in a second
    setup = RunSetup.of(cfg)  # the run's model, tokenizer, device and precision, each resolved once
    # the lock is the first thing that touches --out: a second run into a folder another live run
    # owns is refused before it reads, reuses, moves or deletes anything in it (runs/folder.py)
    with open_run(cfg.out, SELECT, _run_inputs(cfg, setup.model_path), log=log) as run:
        return select_in(run, cfg, log, t_start, setup)


def select_in(run: Run, cfg: SelectConfig, log: Callable[[str], None], t_start: float | None = None, setup: RunSetup | None = None) -> SelectionResult:
    """:func:`select` in a run folder this process has locked (``open_run(cfg.out, SELECT, ...)``)."""
    t_start = time.perf_counter() if t_start is None else t_start
    for line in ignored_options(cfg):  # e.g. --kernel trace with --method ntk
        logger.warning(line)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if run.state == "finished" and not cfg.overwrite:  # refused before the inputs are read
        raise NtkSelectError(f"{run.out} already holds a finished run (manifest.json); pass --overwrite to replace it or choose another --out")
    # bad input fails before --out is written; a tokenised pool left by an unfinished run of the
    # same pool file, tokenizer and options is reused (moved into the run below); a new one is
    # built in a temporary folder inside the locked --out
    inp = load_inputs(cfg, log, reuse=_stores_in(run.out), temp_dir=run.out, setup=setup)
    try:
        return _select(cfg, inp, log, t_start, run)
    finally:
        inp.close()


def _stores_in(out: str | os.PathLike) -> list[Path]:
    """Where an earlier run in ``out`` keeps its tokenised pool: in place, or written aside."""
    out = Path(out)
    return [out / "work" / "pool", out / SELECT.staging / "work" / "pool"]


def _select(cfg: SelectConfig, inp: Inputs, log: Callable[[str], None], t_start: float, run: Run | None = None) -> SelectionResult:
    setup = inp.setup = inp.setup or RunSetup.of(cfg)
    if run is None:  # (tests with inputs of their own): lock --out here
        with open_run(cfg.out, SELECT, _run_inputs(cfg, setup.model_path), log=log) as locked:
            return _select(cfg, inp, log, t_start, locked)
    if selector_spec(cfg.method).uses_model:
        check_model_options(setup.model_path, cfg.target_modules(), cfg.lora_r, "--lora-target-modules", "--lora-r", tokenizer=inp.tokenizer)
    fp = run_fingerprint(cfg, inp.hashes, setup)
    origin = None
    if inp.store is not None and not inp.owned:
        # a reused store sits inside --out, which preparing the run may clear: hold it aside
        # meanwhile, in a temporary folder inside the locked --out (a rename; swept if killed)
        origin = inp.store.folder
        inp.move_store(_temp_store(run.out, cfg.out) / "pool")
        inp.owned = True
    # an unsupported model fails in the preflight, in seconds, after --out's refusals and before it is written
    preflight = []
    try:
        wdir = _prepare_out(
            cfg,
            run,
            fp,
            log,
            before_write=lambda: preflight.append(preflight_select(cfg, inp.dom_ex, inp.tokenizer.pad_token_id, keep=True, log=log, setup=setup)),
        )
    except BaseException:
        if origin is not None and inp.store is not None:  # refused: put the reused store back where the earlier run keeps it
            aside = inp.store.folder.parent
            inp.move_store(origin)
            shutil.rmtree(aside, ignore_errors=True)
        raise
    checked = preflight[0]
    if inp.store is not None:
        tmp = inp.store.folder.parent if inp.owned else None
        inp.move_store(wdir / "work" / "pool")  # kept until the run has finished: a rerun after a crash reuses it
        if tmp is not None and tmp.name.startswith(".ntkpool-"):
            shutil.rmtree(tmp, ignore_errors=True)
    rt = make_runtime(cfg, inp.tokenizer, setup)
    ctx = SelectionContext(
        cfg,
        inp.domain,
        inp.pool,
        inp.dom_ex,
        inp.pool_ex,
        rt,
        log,
        work_dir=str(wdir / "work"),
        key=digest(fp),
        log_path=str(wdir / "shards.jsonl"),
        setup=setup,
    )
    ctx.adopt(checked)
    ctx.store.log(
        {"event": "start", "method": cfg.method, "executor": cfg.executor, "shard_size": cfg.shard_size, "pool": len(inp.pool), "domain": len(inp.domain)}
    )
    try:
        ranking = get_selector(cfg.method).rank(ctx, cfg.n)
        result = write_selection(wdir, cfg, inp, ctx, ranking, rt, t_start, input_hashes=fp["inputs"])
    finally:
        ctx.release()
    ctx.store.log({"event": "finish", "seconds": round(time.perf_counter() - t_start, 3)})
    shutil.rmtree(wdir / "work", ignore_errors=True)  # the manifest now vouches for the results; shards are no longer needed
    run.commit()  # with --overwrite: the new run replaces the earlier one only now
    return result


def write_selection(
    out: Path, cfg: SelectConfig, inp: Inputs, ctx: SelectionContext, ranking: Ranking, rt: Runtime, t_start: float, input_hashes: dict | None = None
) -> SelectionResult:
    """Write selected.jsonl, scores.jsonl, train.jsonl, adapter/ (when the method uses the
    warmed-up model: its registration's ``uses_model``) and, last, manifest.json: the same files
    for every method. ``out`` is where they are written; ``cfg.out`` where the run lives (they differ while a replacement is written aside).
    ``input_hashes`` are the inputs' sha256 taken when the run started (else hashed now)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if selector_spec(cfg.method).uses_model and ctx.has_model:
        tmp_adapter = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out))
        save_adapter(ctx.model(), tmp_adapter)
        atomic_replace_dir(tmp_adapter, out / "adapter")
    pool, domain, method = inp.pool, inp.domain, cfg.method
    if len(ranking.order) < cfg.n or len(set(ranking.order[: cfg.n].tolist())) != cfg.n:
        raise NtkSelectError(f"{method}: the selector returned fewer than --n {cfg.n} distinct candidates")
    chosen = ranking.order[: cfg.n]
    selected = [pool[int(i)] for i in chosen]  # N records read back from the token store
    sel_scores = ranking.scores[: cfg.n]
    atomic_write_jsonl(
        out / "selected.jsonl",
        ({**r.raw, "selection_score": float(s), "selection_rank": k + 1, "selection_method": method} for k, (r, s) in enumerate(zip(selected, sel_scores))),
    )
    cols = ranking.columns
    ids = ids_of(pool)

    def score_rows():
        for j, i in enumerate(ranking.order):
            row = {"id": ids[int(i)], "score": float(ranking.scores[j]), "rank": j + 1, "selected": j < cfg.n}
            row.update({k: (v[j].item() if hasattr(v[j], "item") else v[j]) for k, v in cols.items()})
            yield row

    atomic_write_jsonl(out / "scores.jsonl", score_rows())
    atomic_write_jsonl(out / "train.jsonl", [r.raw for r in domain] + [r.raw for r in selected])
    write_s = time.perf_counter() - t
    sel_seconds, sel_tokens = ctx.cost(ranking)
    timings = {"load": inp.seconds}
    if "warmup" in ranking.shared:
        timings["warmup"] = ctx.shared_seconds.get("warmup", 0.0)
    timings.update(ranking.timings or {"select": ranking.seconds})
    timings["write"] = write_s
    timings["total"] = time.perf_counter() - t_start

    pool_groups = pool.counts("group") if isinstance(pool, PoolRecords) else collections.Counter(record_group(r) for r in pool)
    sel_groups = collections.Counter(record_group(r) for r in selected)
    src_pool = pool.counts("source") if isinstance(pool, PoolRecords) else collections.Counter(source_of(r.raw, r.path) for r in pool)
    src_sel = collections.Counter(source_of(r.raw, r.path) for r in selected)
    hashes = input_hashes or inp.hashes or {"domain": sha256_path(cfg.domain), "pool": sha256_path(cfg.pool)}
    manifest = {
        "tool": "ntkselect",
        "method": method,
        "complete": True,
        "out": str(Path(cfg.out)),
        "command": " ".join(sys.argv),
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": package_versions(),
        "inputs": {
            "domain": {"path": os.path.abspath(cfg.domain), "sha256": hashes["domain"], "records": len(domain)},
            "pool": {
                "path": os.path.abspath(cfg.pool),
                "sha256": hashes["pool"],
                "records": inp.pool_records_in_file,
                "excluded_duplicates_of_domain": inp.excluded.get("duplicates_of_domain", 0),
                "excluded": inp.excluded,
            },
            "model": (inp.setup or RunSetup.of(cfg)).model_fingerprint,
        },
        "outputs": output_hashes(out),  # what `report` and `diagnose --run` check the files against
        "token_convention": token_convention(inp.dom_stats.template, inp.tokenizer),
        "tokens": {"domain": inp.dom_stats.to_dict(), "pool": inp.pool_stats.to_dict()},
        "runtime": rt.describe(),
        "warmup": ctx.warmup_summary if "warmup" in ranking.shared else None,
        "selector": ranking.info,
        **{k: v for k, v in ranking.info.items() if k in ("stage1", "stage2")},
        "execution": {
            "executor": cfg.executor,
            "shard_size": cfg.shard_size,
            "pool_shards": -(-len(pool) // cfg.shard_size),
            "resumed": {**ctx.resumed, "shards_found_done": ctx.store.skipped},
            "shard_log": "shards.jsonl",
        },
        "cost": {
            "seconds": round(sel_seconds, 3),
            "tokens": int(sel_tokens),
            "note": "the selection's own work plus the shared warm-up / embeddings it used, as if run alone",
        },
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "load": {
            # timings.load is all of reading D and C (tokenizer start-up included); this is the pool's pass alone
            "pool_pass_seconds": None if inp.pool_pass_seconds is None else round(inp.pool_pass_seconds, 3),
            "pool_store_reused": inp.pool_pass_seconds is None,
        },
        "summary": {
            "n_domain": len(domain),
            "n_pool": len(pool),
            "n_selected": len(selected),
            "composition": {k: [sel_groups[k], pool_groups[k]] for k, _ in sorted(pool_groups.items(), key=lambda kv: (-sel_groups[kv[0]], kv[0]))},
            "by_source": {k: [src_sel[k], n] for k, n in sorted(src_pool.items(), key=lambda kv: (-src_sel[kv[0]], kv[0]))},
            "score_range_selected": [float(sel_scores.min()), float(sel_scores.max())],
            "score_range_all": [float(ranking.scores.min()), float(ranking.scores.max())],
        },
    }
    atomic_write_json(out / "manifest.json", manifest)
    return SelectionResult(out=Path(cfg.out), selected=selected, scores=sel_scores, manifest=manifest)
