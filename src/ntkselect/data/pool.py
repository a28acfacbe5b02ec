"""The pool on disk: read once, tokenised in batches, kept as compact token arrays.

A pool of millions of records does not fit in memory as Python objects (a tokenised record
costs about 40 bytes per token as lists of ints, where int32 ids need 4). :func:`build_store`
reads the pool file once (hashing the same bytes as it reads them, so a pipe works), checks
each record, drops the ones a run excludes, tokenises the rest with the tokenizer's batch API
(:func:`~ntkselect.data.records.tokenize_batch`, the same ids and masks as one record at a
time) and appends them to a :class:`TokenStore` folder::

    shard-00000/   up to SHARD_ROWS records each, in pool order
        ids.bin      int32   every record's token ids, concatenated           (tokens,)
        mask.bin     uint8   1 at the trained tokens                          (tokens,)
        tok_off.npy  int64   where each record's tokens start; last = end     (rows + 1,)
        rec.bin      bytes   each record as compact JSON (its fields unchanged)
        rec_off.npy  int64   where each record's JSON starts; last = end      (rows + 1,)
        id.bin, id_off.npy   each record's id (UTF-8), the same way
        line.npy     int64   the record's line (row) in the pool file          (rows,)
        meta.npy     int32   [trained tokens, truncated, group code, source code] (rows, 4)
    duplicates.npy int64 [row, the earlier row with the same text] of every row that repeats an
                   earlier record's text exactly (the 128-bit BLAKE2 of ``record_text``): kept
                   in the store, but not a candidate (:attr:`TokenStore.keep`)     (dups, 2)
    store.json     written last: what the store was made from (the file's SHA-256, size and
                   modification time, the tokenizer's fingerprint, --max-length, the template,
                   the exclusions) and its totals; a folder without it is never trusted.

The driver then holds only per-record numbers (lengths, trained-token counts, group codes: a
few bytes each) and memory maps; :class:`PoolRecords` and :class:`PoolExamples` read a record
or a tokenised example back by offset when a stage asks for it (the M stage-2 candidates, the
N selected records), and behave as the lists of :class:`~ntkselect.data.records.Record` and
:class:`~ntkselect.data.records.TokenizedExample` every selector already takes.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from ntkselect.data.records import (
    TOKENIZE_BATCH,
    Record,
    RecordStream,
    TokenizedExample,
    TokenizeStats,
    check_id,
    check_record,
    parse_json_line,
    record_text,
    resolve_template,
    tokenize_batch,
)
from ntkselect.errors import NtkSelectError
from ntkselect.files import atomic_write_json
from ntkselect.progress import Progress

__all__ = [
    "SHARD_ROWS",
    "FORMAT",
    "TokenStore",
    "PoolRecords",
    "PoolExamples",
    "PoolScan",
    "build_store",
    "scan_pool",
    "find_store",
    "source_stat",
    "tokenizer_fingerprint",
    "lengths_of",
    "trained_of",
    "ids_of",
    "default_workers",
    "group_of",
    "source_of",
]

logger = logging.getLogger(__name__)

SHARD_ROWS = 1 << 16  # records per token-store shard
FORMAT = 2  # the store's layout version; a store of another version is rebuilt (2: duplicates.npy)


@functools.lru_cache(maxsize=256)
def _file_name(path: str) -> str:
    return Path(path).name


def group_of(raw: dict, path: str) -> str:
    """The record's subject/source group (the manifest's composition)."""
    return str(raw.get("subject") or raw.get("source") or raw.get("category") or _file_name(path))


def source_of(raw: dict, path: str) -> str:
    return str(raw["source"]) if "source" in raw else _file_name(path)


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what decides the ids: the tokenizer's serialised model, its special tokens and
    chat template, and its class (about a second for a 49K vocabulary, so kept per object)."""
    key = id(tokenizer)
    hit = _FINGERPRINTS.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    fp = _fingerprint(tokenizer)
    _FINGERPRINTS[key] = (tokenizer, fp)
    return fp


_FINGERPRINTS: dict[int, tuple[Any, str]] = {}


def _fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for k in ("padding", "truncation"):  # call settings that batching changes on the object, not the ids of a text
            spec.pop(k, None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:  # a slow tokenizer: its vocabulary
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    chat = getattr(tokenizer, "chat_template", None)
    h.update(json.dumps(chat if isinstance(chat, (str, dict)) else None, sort_keys=True).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, getattr(tokenizer, "add_bos_token", None)]).encode())
    return h.hexdigest()


def source_stat(path: str | os.PathLike) -> dict | None:
    """What identifies the pool file's current contents without reading it (as make and git's
    index do): its absolute path, size, modification time in ns and inode; None for a pipe or
    a folder, which are always read again."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError:
        return None
    import stat as _stat

    if not _stat.S_ISREG(st.st_mode):
        return None
    return {"path": os.path.abspath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


# --------------------------------------------------------------------------- writing


class _ShardWriter:
    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.ids = open(folder / "ids.bin", "wb")
        self.mask = open(folder / "mask.bin", "wb")
        self.rec = open(folder / "rec.bin", "wb")
        self.idf = open(folder / "id.bin", "wb")
        self.tok_off, self.rec_off, self.id_off = [np.zeros(1, np.int64)], [0], [0]
        self.lines: list[int] = []
        self.meta: list[np.ndarray] = []
        self.rows = 0

    def add(self, part: _Chunk, a: int, b: int, groups: list[int], sources: list[int]) -> None:
        """Rows [a, b) of a tokenised chunk."""
        t0, t1 = int(part.tok_off[a]), int(part.tok_off[b])
        self.ids.write(part.ids[t0:t1].tobytes())
        self.mask.write(part.mask[t0:t1].tobytes())
        self.tok_off.append(self.tok_off[-1][-1] + part.tok_off[a + 1 : b + 1] - t0)
        for k in range(a, b):
            blob, rid = part.blobs[k], part.rids[k].encode("utf-8")
            self.rec.write(blob)
            self.rec_off.append(self.rec_off[-1] + len(blob))
            self.idf.write(rid)
            self.id_off.append(self.id_off[-1] + len(rid))
        self.lines.extend(part.lines[a:b])
        self.meta.append(np.stack([part.trained[a:b], part.truncated[a:b], np.asarray(groups, np.int32), np.asarray(sources, np.int32)], 1).astype(np.int32))
        self.rows += b - a

    def close(self) -> None:
        for f in (self.ids, self.mask, self.rec, self.idf):
            f.close()
        np.save(self.folder / "tok_off.npy", np.concatenate(self.tok_off).astype(np.int64))
        np.save(self.folder / "rec_off.npy", np.asarray(self.rec_off, dtype=np.int64))
        np.save(self.folder / "id_off.npy", np.asarray(self.id_off, dtype=np.int64))
        np.save(self.folder / "line.npy", np.asarray(self.lines, dtype=np.int64))
        np.save(self.folder / "meta.npy", np.concatenate(self.meta) if self.meta else np.zeros((0, 4), np.int32))


def _batches(stream: Iterable, size: int) -> Iterable[list]:
    batch: list = []
    for rec in stream:
        batch.append(rec)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Codes:
    """Small integer codes for repeated strings (group and source names)."""

    def __init__(self):
        self.names: list[str] = []
        self.index: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        code = self.index.get(name)
        if code is None:
            code = self.index[name] = len(self.names)
            self.names.append(name)
        return code


def _estimate_total(prog: Progress, stream: RecordStream, batch: int) -> None:
    done, size = stream.bytes_read, stream.size
    if done and size:  # records in the file ~ records so far x bytes in the file / bytes read so far
        prog.set_total(round((prog.done + batch) * size / done))


def _drop_reason(rec: Record, drop: Sequence[tuple[str, Callable[[Record], bool]]]) -> str | None:
    for reason, test in drop:
        if test(rec):
            return reason
    return None


@dataclass
class _Chunk:
    """What a worker returns for one chunk of the pool, in file order: every checked record's
    id and line (for the file-wide unique-id check), the first error, and the kept records'
    tokens as flat arrays."""

    checked: list[tuple[str, int, bool]]  # (id, line, id is the row number) of every checked record
    error: NtkSelectError | None  # the first bad record's error (checks before tokenising)
    excluded: Counter
    rids: list[str]  # the kept records'
    lines: list[int]
    blobs: list[bytes]  # each kept record's JSON
    groups: list[str]
    sources: list[str]
    ids: np.ndarray  # (tokens,) int32
    mask: np.ndarray  # (tokens,) uint8
    tok_off: np.ndarray  # (kept + 1,) int64
    trained: np.ndarray  # (kept,) int64
    truncated: np.ndarray  # (kept,) int64 0/1
    text_hash: np.ndarray  # (kept, 16) uint8: BLAKE2 of each kept record's text, for the duplicate check
    stats: dict


_W: dict[str, Any] = {}  # the running pass's settings: read by _work, here or in a forked worker


def _work(chunk: list) -> _Chunk:
    w = _W
    name, tok = w["name"], w["tokenizer"]
    checked: list[tuple[str, int, bool]] = []
    kept: list[Record] = []
    blobs: list[bytes] = []
    excluded: Counter = Counter()
    error: NtkSelectError | None = None
    for row, line, payload, blob in chunk:
        try:
            raw = parse_json_line(name, line, payload) if w["parse"] else payload
            rec, implicit = check_record(name, row, line, raw)
        except NtkSelectError as err:
            error = err
            break
        checked.append((rec.id, rec.line, implicit))
        reason = _drop_reason(rec, w["drop"])
        if reason is not None:
            excluded[reason] += 1
            continue
        kept.append(rec)
        blobs.append(blob if blob is not None else json.dumps(raw, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    exs: list[TokenizedExample] = []
    if error is None and kept:
        try:
            exs = tokenize_batch(kept, tok, w["max_length"], w["template"])
        except NtkSelectError as err:
            error, kept = err, []
    stats = TokenizeStats()
    for e in exs:
        stats.add(e)
    lens = np.asarray([len(e.input_ids) for e in exs], dtype=np.int64)
    return _Chunk(
        checked=checked,
        error=error,
        excluded=excluded,
        rids=[r.id for r in kept],
        lines=[r.line for r in kept],
        blobs=blobs if exs else [],
        groups=[group_of(r.raw, r.path) for r in kept],
        sources=[source_of(r.raw, r.path) for r in kept],
        ids=np.fromiter((i for e in exs for i in e.input_ids), dtype=np.int32, count=int(lens.sum())),
        mask=np.fromiter((m for e in exs for m in e.train_mask), dtype=np.uint8, count=int(lens.sum())),
        tok_off=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        trained=np.asarray([sum(e.train_mask) for e in exs], dtype=np.int64),
        truncated=np.asarray([e.truncated for e in exs], dtype=np.int64),
        text_hash=np.frombuffer(
            b"".join(hashlib.blake2b(record_text(r.raw).encode("utf-8"), digest_size=16).digest() for r in kept[: len(exs)]), np.uint8
        ).reshape(-1, 16),
        stats=stats.to_dict(),
    )


def _worker_signals() -> None:
    """In a forked worker: Ctrl-C is the driver's to handle (it stops the workers), and SIGTERM
    (how the driver stops them) ends the worker at once; neither prints a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def default_workers() -> int:
    """Worker processes for the pool pass: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _chunk_results(chunks: Iterable[list], workers: int) -> Iterator[Iterator[_Chunk]]:
    """:func:`_work` of each chunk, in order: here (``workers`` <= 1), or in that many forked
    processes with at most two chunks each in flight, so the pool is never read ahead."""
    it = iter(chunks)
    first = next(it, None)
    second = next(it, None) if first is not None else None
    if second is None or workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        # one chunk (a small pool: not worth starting processes), one worker, or no fork
        yield map(_work, itertools.chain([c for c in (first, second) if c is not None], it))
        return
    # the workers tokenise one text at a time each; the setting keeps the fast tokenizer from
    # warning (on stderr) that it was forked after using its thread pool
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_signals)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved

    def ordered() -> Iterator[_Chunk]:
        pending: collections.deque = collections.deque()
        for chunk in itertools.chain([first, second], it):
            pending.append(pool.apply_async(_work, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    try:
        yield ordered()
    finally:
        pool.terminate()
        pool.join()


def build_store(
    path: str | os.PathLike,
    tokenizer,
    max_length: int,
    template: str,
    folder: str | os.PathLike,
    drop: Sequence[tuple[str, Callable[[Record], bool]]] = (),
    exclusion_key: str = "",
    progress: bool = True,
    check: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> TokenStore:
    """Read ``path`` once into a new token store at ``folder`` (which must not exist): every
    record checked, the ones a ``drop`` test (reason, predicate) matches counted and left out,
    the rest tokenised in batches, by ``workers`` processes (the same bytes for any number);
    ``store.json`` last. A bad record stops the pass with its one-line error and the
    half-written folder removed: the first error in file order, where within each chunk of
    TOKENIZE_BATCH records the checks of every record come before tokenising. ``check(rows
    kept, records in the file)`` runs at the end of the pass, before anything more is shown
    (e.g. --n against the pool)."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    try:
        return _build(path, tokenizer, max_length, template, folder, drop, exclusion_key, progress, check, workers)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _pass(path, tokenizer, max_length: int, template: str, drop, workers: int, progress: bool):
    """The one pass over the pool: (stream, progress, chunk results context)."""
    stream = RecordStream(path)
    resolved = resolve_template(tokenizer, template)
    _W.clear()
    _W.update(
        name=stream.name,
        parse=stream.parses_lines,
        tokenizer=tokenizer,
        max_length=max_length,
        template="auto" if template == "auto" else resolved,  # "auto" stays unresolved so that messages records without a chat template stop
        drop=list(drop),
    )
    prog = Progress(f"reading and tokenising {path}", None, enabled=progress, interval=10.0, show_end=False)

    def chunks():
        for chunk in _batches(stream.items(), TOKENIZE_BATCH):
            _estimate_total(prog, stream, len(chunk))
            yield chunk

    return stream, resolved, prog, _chunk_results(chunks(), workers)


def _duplicates(hashes: list[np.ndarray]) -> np.ndarray:
    """(dups, 2) int64 [row, first row with the same text] for every row whose text hash an
    earlier row has (rows in pool order)."""
    h = np.concatenate(hashes) if hashes else np.zeros((0, 16), np.uint8)
    if len(h) == 0:
        return np.zeros((0, 2), np.int64)
    keys = np.ascontiguousarray(h).view(np.dtype((np.void, 16))).ravel()  # (rows,) one 16-byte key each
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    origin = first[inverse.ravel()]  # (rows,) the first row with each row's text
    rows = np.flatnonzero(origin != np.arange(len(h)))
    return np.stack([rows, origin[rows]], 1).astype(np.int64)


def _accept(stream: RecordStream, part: _Chunk, seen: dict, stats: TokenizeStats, excluded: Counter) -> None:
    """The driver's share of a chunk, in file order: the unique-id check, then its error."""
    for rid, line, implicit in part.checked:
        check_id(stream.name, Record(id=rid, raw={}, path=stream.name, line=line), implicit, seen)
    if part.error is not None:
        raise part.error
    stream.records += len(part.checked)
    excluded.update(part.excluded)
    for k in ("examples", "tokens", "trained_tokens", "truncated"):
        setattr(stats, k, getattr(stats, k) + part.stats[k])


def _build(path, tokenizer, max_length, template, folder: Path, drop, exclusion_key: str, progress: bool, check, workers: int) -> TokenStore:
    t0 = time.perf_counter()
    stat_before = source_stat(path)
    stream, resolved, prog, results = _pass(path, tokenizer, max_length, template, drop, workers, progress)
    stats = TokenizeStats(template=resolved)
    excluded: Counter[str] = Counter()
    seen: dict[str, tuple[int, bool]] = {}  # id -> (line, whether it is the row number): ids are unique in a file
    groups, sources = _Codes(), _Codes()
    shards = 0
    shard_rows = SHARD_ROWS  # read at call time (tests make it small)
    writer: _ShardWriter | None = None
    hashes: list[np.ndarray] = []
    with results as parts:
        for part in parts:
            _accept(stream, part, seen, stats, excluded)
            hashes.append(part.text_hash)
            at, n = 0, len(part.rids)
            while at < n:
                if writer is None:
                    writer = _ShardWriter(folder / f"shard-{shards:05d}")
                take = min(shard_rows - writer.rows, n - at)
                writer.add(part, at, at + take, [groups(g) for g in part.groups[at : at + take]], [sources(s) for s in part.sources[at : at + take]])
                at += take
                if writer.rows == shard_rows:
                    writer.close()
                    writer, shards = None, shards + 1
            prog.update(len(part.checked), int(part.tok_off[-1]))
    if writer is not None:
        writer.close()
        shards += 1
    stream.finish()
    dups = _duplicates(hashes)
    if len(dups):
        excluded["duplicates_in_pool"] = len(dups)
    if check is not None:
        check(stats.examples - len(dups), stream.records)
    prog.set_total(prog.done)  # the estimate from the bytes read becomes the count
    prog.close()
    stat_after = source_stat(path)
    if stat_before != stat_after:
        raise NtkSelectError(f"{path}: the file changed while it was being read; rerun once it is complete")
    np.save(folder / "duplicates.npy", dups)
    meta = {
        "format": FORMAT,
        "source": {"name": str(path), "stat": stat_after, "sha256": stream.sha256, "records": stream.records},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "template": template,
        "exclusion_key": exclusion_key,
        "rows": stats.examples,
        "shards": shards,
        "shard_rows": shard_rows,
        "excluded": dict(excluded),
        "stats": stats.to_dict(),
        "groups": groups.names,
        "sources": sources.names,
        "workers": workers,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_json(folder / "store.json", meta)
    return TokenStore(folder)


def find_store(folders: Iterable[str | os.PathLike], path, tokenizer, max_length: int, template: str, exclusion_key: str, log=None) -> TokenStore | None:
    """A finished token store among ``folders`` made from this very pool file (same path,
    size, modification time and inode) with this tokenizer, --max-length, template and
    exclusions; one made otherwise is named and not used."""
    log = log or logger.info
    stat = source_stat(path)
    if stat is None:
        return None
    for f in folders:
        marker = Path(f) / "store.json"
        if not marker.exists():
            continue
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        want = {
            "the store format": (meta.get("format"), FORMAT),
            "the pool file": ((meta.get("source") or {}).get("stat"), stat),
            "the tokenizer": (meta.get("tokenizer"), tokenizer_fingerprint(tokenizer)),
            "--max-length": (meta.get("max_length"), max_length),
            "--template": (meta.get("template"), template),
            "the excluded records": (meta.get("exclusion_key"), exclusion_key),
        }
        changed = [k for k, (a, b) in want.items() if a != b]
        if changed:
            log(f"ntkselect: not reusing the tokenised pool in {f}: {', '.join(changed)} changed; tokenising again")
            continue
        return TokenStore(f)
    return None


# --------------------------------------------------------------------------- reading


class TokenStore:
    """A finished token store folder (see the module docstring). Tokens, records and ids are read
    with ``pread`` when asked for: memory-mapping them would put every page a stage reads into the
    process's resident memory (about 5 bytes per token of the pool once stage 1 has read it all);
    ``mmap=True`` maps them instead (measured side by side in ``benchmarks/pool_scale.py``)."""

    def __init__(self, folder: str | os.PathLike, mmap: bool = False):
        self.mmap = mmap
        self._open(folder)

    def reopen(self) -> None:
        """Open the store again at ``self.folder`` (after it was moved)."""
        self.close()
        self._open(self.folder)

    def _open(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "store.json").read_text())
        self.n = int(self.meta["rows"])
        self.shard_rows = int(self.meta["shard_rows"])
        self.name = self.meta["source"]["name"]
        self.sha256 = self.meta["source"]["sha256"]
        self._shards: list[dict] = []
        lengths, meta = [], []
        for s in range(int(self.meta["shards"])):
            d = self.folder / f"shard-{s:05d}"
            sh = {k: np.load(d / f"{k}.npy", mmap_mode="r") for k in ("tok_off", "rec_off", "id_off", "line", "meta")}
            sh["dir"] = d
            self._shards.append(sh)
            lengths.append(np.diff(sh["tok_off"]))
            meta.append(np.asarray(sh["meta"]))
        #: (n,) int64 tokens per record; (n,) int64 trained tokens; (n,) bool truncated; (n,) group and source codes
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        m = np.concatenate(meta) if meta else np.zeros((0, 4), np.int32)
        self.trained = m[:, 0].astype(np.int64)
        self.truncated = m[:, 1].astype(bool)
        self.group_codes, self.source_codes = m[:, 2], m[:, 3]
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._fds: dict[tuple[int, str], int] = {}
        #: (dups, 2) [row, the earlier row with its text]; ``keep``: the other rows, the candidates (None: all rows)
        self.duplicates = np.load(self.folder / "duplicates.npy")
        self.keep = np.setdiff1d(np.arange(self.n, dtype=np.int64), self.duplicates[:, 0]) if len(self.duplicates) else None

    def _read(self, s: int, name: str, dtype, a: int, b: int) -> np.ndarray:
        """Items [a, b) of shard ``s``'s file ``name``."""
        if self.mmap:
            return self._map(s, name, dtype)[a:b]
        fd = self._fds.get((s, name))
        if fd is None:
            fd = self._fds[(s, name)] = os.open(self._shards[s]["dir"] / name, os.O_RDONLY)
        size = np.dtype(dtype).itemsize
        data = os.pread(fd, (b - a) * size, a * size)
        return np.frombuffer(data, dtype=dtype)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _map(self, s: int, name: str, dtype) -> np.ndarray:
        key = (s, name)
        arr = self._maps.get(key)
        if arr is None:
            p = self._shards[s]["dir"] / name
            arr = np.memmap(p, dtype=dtype, mode="r") if p.stat().st_size else np.zeros(0, dtype)
            self._maps[key] = arr
        return arr

    def _where(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return divmod(i, self.shard_rows)

    def example(self, i: int) -> TokenizedExample:
        s, j = self._where(i)
        off = self._shards[s]["tok_off"]
        a, b = int(off[j]), int(off[j + 1])
        ids = self._read(s, "ids.bin", np.int32, a, b)
        mask = self._read(s, "mask.bin", np.uint8, a, b)
        return TokenizedExample(input_ids=ids.tolist(), train_mask=mask.astype(bool).tolist(), truncated=bool(self.truncated[i]))

    def _bytes(self, i: int, name: str, offsets: str) -> bytes:
        s, j = self._where(i)
        off = self._shards[s][offsets]
        return self._read(s, name, np.uint8, int(off[j]), int(off[j + 1])).tobytes()

    def record_id(self, i: int) -> str:
        return self._bytes(i, "id.bin", "id_off").decode("utf-8")

    def record(self, i: int) -> Record:
        s, j = self._where(i)
        raw = json.loads(self._bytes(i, "rec.bin", "rec_off").decode("utf-8"))
        return Record(id=self.record_id(i), raw=raw, path=self.name, line=int(self._shards[s]["line"][j]))

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.folder.rglob("*") if f.is_file())


class _View(Sequence):
    """Rows ``index`` (default: all) of a :class:`TokenStore`, as a sequence."""

    def __init__(self, store: TokenStore, index: np.ndarray | None = None):
        self.store = store
        self.sel = None if index is None else np.asarray(index, dtype=np.int64)  # (n,) store rows, or None: all

    def __len__(self) -> int:
        return self.store.n if self.sel is None else len(self.sel)

    def row(self, i: int) -> int:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i if self.sel is None else int(self.sel[i])

    def rows(self) -> np.ndarray:
        return np.arange(self.store.n, dtype=np.int64) if self.sel is None else self.sel

    def _get(self, row: int):
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> list: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(self.row(k)) for k in range(*i.indices(len(self)))]
        return self._get(self.row(int(i)))

    def __iter__(self):
        for k in range(len(self)):
            yield self[k]

    def subset(self, keep: Sequence[int]):
        """The view of positions ``keep`` of this one."""
        return type(self)(self.store, self.rows()[np.asarray(keep, dtype=np.int64)])


class PoolExamples(_View):
    """The pool's tokenised examples, read back from the store when indexed."""

    def _get(self, row: int) -> TokenizedExample:
        return self.store.example(row)

    @property
    def lengths(self) -> np.ndarray:
        return self.store.lengths[self.rows()]

    @property
    def trained(self) -> np.ndarray:
        return self.store.trained[self.rows()]


class _Ids(_View):
    def _get(self, row: int) -> str:
        return self.store.record_id(row)


class PoolRecords(_View):
    """The pool's records (id, fields, file and line), read back from the store when indexed."""

    def _get(self, row: int) -> Record:
        return self.store.record(row)

    @property
    def ids(self) -> Sequence[str]:
        return _Ids(self.store, self.sel)

    def counts(self, what: str) -> Counter[str]:
        """{name: records} of the ``"group"`` (subject/source) or ``"source"`` of every record."""
        codes = self.store.group_codes if what == "group" else self.store.source_codes
        names = self.store.meta["groups" if what == "group" else "sources"]
        n = np.bincount(np.asarray(codes)[self.rows()], minlength=len(names))
        return Counter({names[k]: int(c) for k, c in enumerate(n) if c})


def lengths_of(examples: Sequence) -> np.ndarray:
    """(n,) int64 token counts of a list of examples or a :class:`PoolExamples` (without reading it back)."""
    if isinstance(examples, PoolExamples):
        return examples.lengths
    return np.asarray([len(e.input_ids) for e in examples], dtype=np.int64)


def trained_of(examples: Sequence) -> np.ndarray:
    if isinstance(examples, PoolExamples):
        return examples.trained
    return np.asarray([sum(e.train_mask[1:]) for e in examples], dtype=np.int64)


def ids_of(records: Sequence) -> Sequence[str]:
    """The records' ids (without reading a :class:`PoolRecords` back)."""
    if isinstance(records, PoolRecords):
        return records.ids
    return [r.id for r in records]


# --------------------------------------------------------------------------- the dry run's pass


class PoolScan:
    """What the dry run needs of the pool: its lengths and trained-token counts, from the same
    single pass (nothing written)."""

    def __init__(self, lengths, trained, stats: TokenizeStats, records_in_file: int, excluded: dict, sha256: str, seconds: float, nbytes: int):
        self.lengths, self.trained, self.stats, self.bytes = lengths, trained, stats, nbytes
        self.records_in_file, self.excluded, self.sha256, self.seconds = records_in_file, excluded, sha256, seconds
        self.workers = 1


def scan_pool(
    path,
    tokenizer,
    max_length: int,
    template: str,
    drop: Sequence[tuple[str, Callable[[Record], bool]]] = (),
    progress: bool = True,
    check=None,
    workers: int = 1,
) -> PoolScan:
    """The same pass as :func:`build_store`, keeping only per-record numbers (nothing written)."""
    t0 = time.perf_counter()
    stream, resolved, prog, results = _pass(path, tokenizer, max_length, template, drop, workers, progress)
    stats = TokenizeStats(template=resolved)
    excluded: Counter[str] = Counter()
    seen: dict[str, tuple[int, bool]] = {}
    lengths: list[np.ndarray] = []
    trained: list[np.ndarray] = []
    hashes: list[np.ndarray] = []
    nbytes = 0
    with results as parts:
        for part in parts:
            _accept(stream, part, seen, stats, excluded)
            hashes.append(part.text_hash)
            lengths.append(np.diff(part.tok_off))
            trained.append(part.trained)
            nbytes += sum(len(b) + 1 for b in part.blobs)  # the records' JSON, for the disk estimate
            prog.update(len(part.checked), int(part.tok_off[-1]))
    stream.finish()
    dups = _duplicates(hashes)
    if len(dups):
        excluded["duplicates_in_pool"] = len(dups)
    if check is not None:
        check(stats.examples - len(dups), stream.records)
    prog.set_total(prog.done)  # the estimate from the bytes read becomes the count
    prog.close()
    cat = lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64)  # noqa: E731
    keep = np.setdiff1d(np.arange(stats.examples), dups[:, 0])  # the candidates: duplicates left out, as in a run
    scan = PoolScan(cat(lengths)[keep], cat(trained)[keep], stats, stream.records, dict(excluded), stream.sha256, time.perf_counter() - t0, nbytes)
    scan.workers = workers
    return scan
