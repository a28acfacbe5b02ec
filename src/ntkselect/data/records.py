"""Reading user data files and turning records into training tokens.

Two halves:

* :func:`load_records` reads JSONL, JSON, CSV, Parquet or a ``datasets.save_to_disk``
  folder into :class:`Record` objects, checking every record up front so that a bad line
  fails in seconds with a message naming the file, the line and the fix, rather than an
  hour into gradient extraction.
* :func:`tokenize_record` fixes *which* tokens an example trains on (its labels). Every
  method that scores an example (loss, gradients, NTK features) must see the same tokens,
  so this convention lives in one place and :func:`token_convention` writes it into the
  run manifest.
"""

from __future__ import annotations

import csv
import datetime as _dt
import decimal
import functools
import hashlib
import io
import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ntkselect.errors import NtkSelectError
from ntkselect.files import sha256_path

__all__ = [
    "Record",
    "TokenizedExample",
    "TokenizeStats",
    "SUPPORTED_EXTENSIONS",
    "RECORD_SHAPES",
    "load_records",
    "record_kind",
    "prompt_response",
    "record_text",
    "resolve_template",
    "tokenize_record",
    "tokenize_batch",
    "tokenize_records",
    "RecordStream",
    "is_pipe",
    "check_record",
    "check_id",
    "parse_json_line",
    "token_convention",
]

SUPPORTED_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
# Line-oriented formats report "line N" (a physical line the user can jump to); the rest
# report "row N" (1-based position of the record).
_LINE_FORMATS = (".jsonl", ".ndjson", ".csv")
# Human-readable list of the shapes, in the order they are checked.
RECORD_SHAPES = ("messages", "prompt+response", "instruction+output (+input)", "question+answer", "text")
_KNOWN_FIELDS = ("messages", "prompt", "response", "instruction", "input", "output", "question", "answer", "text")
_TEMPLATES = ("auto", "chat", "plain")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """One user record and where it came from (for error messages and the output)."""

    id: str  # the record's "id" field as str, else its 0-based row number in its file
    raw: dict  # the user's record, unchanged (JSON-serialisable)
    path: str  # the file (or dataset folder) it came from
    line: int  # JSONL/CSV: physical line in the file; JSON/Parquet/HF: 1-based row number


class _Bad(Exception):
    """A problem with one record; the caller adds the file and line."""


@functools.lru_cache(maxsize=256)
def _word(path: str) -> str:
    return "line" if Path(path).suffix.lower() in _LINE_FORMATS else "row"


def location(path: str, line: int) -> str:
    return f"{path} {_word(path)} {line}"


def _jsonable(value: Any) -> Any:
    """Plain Python (JSON-serialisable) version of a value read from Parquet/Arrow/datasets."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    # numpy scalars / arrays and pyarrow scalars all expose one of these.
    if hasattr(value, "as_py"):
        return _jsonable(value.as_py())
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value).hex()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    return str(value)


def _present(raw: dict, key: str) -> bool:
    # Parquet/datasets give every row every column, so a missing field arrives as None (or as
    # NaN from a pandas float column); JSON's non-standard NaN is treated the same way.
    value = raw.get(key)
    return value is not None and not (isinstance(value, float) and value != value)


def _as_str(raw: dict, key: str) -> str:
    value = raw[key]
    if isinstance(value, str):
        return value
    # Numbers are common in answers (e.g. "answer": 42); anything else is a data mistake.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise _Bad(f"field {key!r} is {value}, not text; store it as text")
        return str(value)
    raise _Bad(f"field {key!r} must be a string, found {type(value).__name__}; store it as text")


def _check_messages(raw: dict) -> list[dict]:
    msgs = raw["messages"]
    hint = 'messages must be a list of {"role": ..., "content": "..."} objects with at least one assistant message'
    if not isinstance(msgs, list) or not msgs:
        found = "an empty list" if isinstance(msgs, list) else f"a {type(msgs).__name__}"
        raise _Bad(f"{hint}; found {found}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _Bad(f"{hint}; message {i} is {json.dumps(m, default=str)[:80]}")
    assistants = [m for m in msgs if m["role"] == "assistant"]
    if not assistants:
        roles = ", ".join(dict.fromkeys(m["role"] for m in msgs))
        raise _Bad(f"{hint}; found only roles {roles}")
    for i, m in enumerate(msgs):
        # An empty assistant turn is the messages form of an empty response.
        if m["role"] == "assistant" and not m["content"].strip():
            raise _Bad(f"message {i} (assistant) has empty content; give it the response text or remove the record")
    return msgs


def _classify(raw: Any) -> str:
    """Validate one record and return its kind; raises :class:`_Bad`."""
    if not isinstance(raw, dict):
        raise _Bad(f"a record must be a JSON object ({{...}}), found {type(raw).__name__}; put each record in an object")
    if _present(raw, "messages"):
        _check_messages(raw)
        return "messages"
    for p_key, r_key in (("prompt", "response"), ("instruction", "output"), ("question", "answer")):
        if _present(raw, p_key) and _present(raw, r_key):
            _as_str(raw, p_key)
            if p_key == "instruction" and _present(raw, "input"):
                _as_str(raw, "input")
            if not _as_str(raw, r_key).strip():
                raise _Bad(f"empty response: field {r_key!r} is empty; give it the response text or remove the record")
            return "prompt_response"
    if _present(raw, "text"):
        if not _as_str(raw, "text").strip():
            raise _Bad("empty text: field 'text' is empty or only whitespace; give it text or remove the record")
        return "text"
    have = ", ".join(repr(k) for k in raw if raw[k] is not None) or "no fields"
    partial = [k for k in _KNOWN_FIELDS if _present(raw, k)]
    extra = f" (it has {', '.join(partial)} without its partner)" if partial else ""
    raise _Bad(f"no recognised fields{extra}: the record has {have}; give it one of {', '.join(RECORD_SHAPES)} (rename your columns to these)")


def record_kind(raw: dict) -> str:
    """``"messages"``, ``"prompt_response"`` or ``"text"``; raises NtkSelectError for a bad record."""
    try:
        return _classify(raw)
    except _Bad as err:
        raise NtkSelectError(str(err)) from None


def prompt_response(raw: dict) -> tuple[str, str]:
    """(prompt, response) of a prompt/response-shaped record (prompt+response,
    instruction+output(+input), question+answer)."""
    kind = record_kind(raw)
    if kind != "prompt_response":
        raise NtkSelectError(f"prompt_response() needs a prompt/response record, got a {kind} record")
    return _prompt_response(raw)


def _prompt_response(raw: dict) -> tuple[str, str]:
    # raw is a checked prompt/response record
    if _present(raw, "prompt") and _present(raw, "response"):
        return _as_str(raw, "prompt"), _as_str(raw, "response")
    if _present(raw, "instruction") and _present(raw, "output"):
        parts = [_as_str(raw, "instruction")]
        if _present(raw, "input") and _as_str(raw, "input").strip():
            parts.append(_as_str(raw, "input"))
        # Skip an empty instruction rather than start the prompt with a blank line.
        return "\n\n".join(p for p in parts if p), _as_str(raw, "output")
    return _as_str(raw, "question"), _as_str(raw, "answer")


def record_text(raw: dict) -> str:
    """Plain text of any record, for lexical methods and duplicate detection."""
    kind = record_kind(raw)
    if kind == "text":
        return _as_str(raw, "text")
    if kind == "prompt_response":
        prompt, response = prompt_response(raw)
        return prompt + "\n" + response
    return "\n".join(m["content"] for m in raw["messages"])


# --------------------------------------------------------------------------- readers
# Each reader yields (line, raw) pairs; load_records does the shared checks.


def _short(err: BaseException) -> str:
    if isinstance(err, RecursionError):
        return "it is nested too deeply"
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "digits" in msg:
        return "an integer has more digits than Python reads; store it as a string"
    return msg if len(msg) < 160 else msg[:157] + "..."


def _read_jsonl(path: Path, name: str, h: Any = None) -> Iterable[tuple]:  # (line, record, its bytes)
    for lineno, line, chunk in _jsonl_lines(path, name, h):
        yield lineno, parse_json_line(name, lineno, line), chunk


def parse_json_line(name: str, lineno: int, line: str) -> Any:
    """The value of one JSON line, or the one-line error naming it."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise NtkSelectError(f"{name} line {lineno}: not valid JSON ({err.msg} at column {err.colno}); fix or remove the line") from None
    except (ValueError, RecursionError) as err:  # an integer of thousands of digits, nesting too deep
        raise NtkSelectError(f"{name} line {lineno}: cannot read this JSON ({_short(err)}); fix or remove the line") from None


def _jsonl_lines(path: Path, name: str, h: Any = None) -> Iterable[tuple[int, str, bytes]]:
    """(line number, text, bytes) of each non-blank line, unparsed. Streamed line by line (a pipe
    works; the file is never held whole); ``h`` (a hashlib object) sees every byte read. Split on
    b"\n" ourselves so line numbers are physical lines and a bad byte names its line."""
    with open(path, "rb") as f:
        for lineno, chunk in enumerate(_hashed_lines(f, h), 1):
            if lineno == 1 and chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
            try:
                line = chunk.decode("utf-8")
            except UnicodeDecodeError as err:
                raise NtkSelectError(f"{name} line {lineno}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8") from None
            if not line.strip():
                continue
            yield lineno, line, chunk


def _hashed_lines(f, h: Any = None, block: int = 1 << 20) -> Iterable[bytes]:
    """The b"\n"-separated lines of a binary stream (without the b"\n"; a last line without
    one included), read in blocks that ``h`` also sees: bytes.split(b"\n") of the whole stream."""
    rest = b""
    while data := f.read(block):
        if h is not None:
            h.update(data)
        parts = (rest + data).split(b"\n")
        rest = parts.pop()
        yield from parts
    yield rest


class _HashingRaw(io.RawIOBase):
    """A readable raw stream that passes every byte read from ``f`` to ``h``."""

    def __init__(self, f, h: Any):
        self.f, self.h = f, h

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        n = len(data)
        b[:n] = data
        if self.h is not None and n:
            self.h.update(data)
        return n


def _read_json(path: Path, name: str, h: Any = None) -> Iterable[tuple]:
    # A JSON array is parsed whole (its format has no record boundaries to stream on); use
    # JSON Lines for pools too large to hold in memory.
    with open(path, "rb") as f:
        data = f.read()
    if h is not None:
        h.update(data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise NtkSelectError(f"{name}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8") from None
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        hint = "; for one object per line name the file .jsonl" if "Extra data" in err.msg else ""
        raise NtkSelectError(f"{name} line {err.lineno}: not valid JSON ({err.msg} at column {err.colno}); fix the file{hint}") from None
    except (ValueError, RecursionError) as err:  # an integer of thousands of digits, nesting too deep
        raise NtkSelectError(f"{name}: cannot read this JSON ({_short(err)}); fix the file") from None
    if isinstance(data, dict) and any(_present(data, k) for k in _SHAPE_KEYS):
        # one record (a conversation, a prompt/response pair), not a container of records: said so
        # in one line rather than read as a list of its messages
        raise NtkSelectError(
            f"{name}: holds a single record (an object with {', '.join(repr(k) for k in _SHAPE_KEYS if k in data)}), not an array of records; "
            "wrap it in [ ] or write it as one line of a .jsonl file"
        )
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise NtkSelectError(
                f'{name}: expected a JSON array of records or an object holding one list (like {{"data": [...]}}), '
                f"found an object with {len(lists)} list fields; make the file a JSON array of records"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise NtkSelectError(f"{name}: expected a JSON array of records, found a {type(data).__name__}; make the file a JSON array of objects")
    return list(enumerate(data, 1))


_SHAPE_KEYS = ("messages", "text", "prompt", "response", "instruction", "output", "question", "answer")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape decodes an invalid byte to


def _read_csv(path: Path, name: str, h: Any = None) -> Iterable[tuple]:
    try:
        # csv module, not pandas: every cell stays a string and empty cells stay "". Streamed
        # (a pipe works), every byte read passing through ``h``.
        # Bytes that are not UTF-8 decode to lone surrogates (surrogateescape), found in the row that holds them: the error names its line.
        with open(path, "rb") as raw, io.TextIOWrapper(io.BufferedReader(_HashingRaw(raw, h)), newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.reader(f)
            header: list[str] | None = None
            prev = 0  # reader.line_num after the previous row: the next row starts on prev + 1
            for row in reader:
                start, prev = prev + 1, reader.line_num
                if not row:
                    continue  # blank line
                bad = next((k for k, c in enumerate(row) if _NOT_UTF8.search(c)), None)
                if bad is not None:
                    col = f"column {bad + 1}" + (f" ({header[bad]!r})" if header and bad < len(header) else "")
                    raise NtkSelectError(f"{name} line {start}: not UTF-8 text (in {col}); save the file as UTF-8")
                if header is None:
                    header = row
                    dupes = sorted({c for c in header if header.count(c) > 1})
                    if dupes:
                        raise NtkSelectError(f"{name} line {start}: duplicate column name(s) {', '.join(map(repr, dupes))} in the header; rename them")
                    continue
                if len(row) != len(header):
                    raise NtkSelectError(
                        f"{name} line {start}: {len(row)} fields but the header has {len(header)} columns; quote fields that contain commas or line breaks"
                    )
                yield start, dict(zip(header, row))
    except UnicodeDecodeError as err:
        raise NtkSelectError(f"{name}: not UTF-8 text ({err.reason}); save the file as UTF-8") from None
    except csv.Error as err:
        raise NtkSelectError(f"{name}: not valid CSV ({err}); fix the file") from None


def _read_parquet(path: Path, name: str, h: Any = None) -> Iterable[tuple]:
    import pyarrow.parquet as pq

    # Parquet needs random access (its footer comes last), so it is hashed by its own pass
    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=4096)  # streamed: one row batch in memory at a time
        row = 0
        for batch in batches:
            for r in batch.to_pylist():
                row += 1
                yield row, _jsonable(r)
    except NtkSelectError:
        raise
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise NtkSelectError(f"{name}: cannot read as Parquet ({str(err).splitlines()[0]}); check the file") from None


def _read_hf(path: Path, name: str, h: Any = None) -> Iterable[tuple]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # FileNotFoundError / ValueError depending on what is missing
        raise NtkSelectError(
            f"{name}: is a folder but not a dataset saved with datasets' save_to_disk ({str(err).splitlines()[0]}); "
            f"pass a {', '.join(SUPPORTED_EXTENSIONS)} file or a save_to_disk folder"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if len(splits) != 1:
            raise NtkSelectError(
                f"{name}: holds several splits ({', '.join(splits)}); pass one split's folder, e.g. {path / splits[0]}"
                if splits
                else f"{name}: has no records; add at least one record"
            )
        ds = ds[splits[0]]
    return _iter_dataset(ds)


def _iter_dataset(ds) -> Iterable[tuple]:
    row = 0
    for batch in ds.with_format("arrow").iter(batch_size=4096):  # memory-mapped Arrow, a batch at a time
        for r in batch.to_pylist():
            row += 1
            yield row, _jsonable(r)


def _unencodable(raw: dict) -> str | None:
    """The field of a record holding a string that cannot be written as UTF-8 (a lone
    surrogate, as a JSON escape like \\ud800 gives), as the field's name; None when none does."""

    def bad(value: Any) -> bool:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
            return False
        if isinstance(value, dict):
            return any(bad(k) or bad(v) for k, v in value.items())
        if isinstance(value, list):
            return any(bad(v) for v in value)
        return False

    for k, v in raw.items():
        if bad(k):
            return f"name {k.encode('utf-8', 'backslashreplace').decode()!r}"
        if bad(v):
            return repr(k)
    return None


def _checked_record(name: str, row: int, line: int, raw: Any, seen: dict[str, tuple[int, bool]]) -> Record:
    """One validated :class:`Record`; ``seen`` collects the ids of the file so far."""
    rec, implicit = check_record(name, row, line, raw)
    check_id(name, rec, implicit, seen)
    return rec


def check_id(name: str, rec: Record, implicit: bool, seen: dict[str, tuple[int, bool]]) -> None:
    """Refuse an id seen before in the file; ``seen``: id -> (line, whether it was the row number)."""
    rid, line = rec.id, rec.line
    if rid in seen:
        word, (first, first_implicit) = _word(name), seen[rid]
        note = " (a record without an 'id' field gets its 0-based row number as id)" if implicit or first_implicit else ""
        raise NtkSelectError(
            f"{name}: duplicate id {rid!r} at {word} {first} and {word} {line}{note}; ids must be unique within each file "
            "(the domain and the pool may share ids): give every record of this file a unique id"
        )
    seen[rid] = (line, implicit)


def check_record(name: str, row: int, line: int, raw: Any) -> tuple[Record, bool]:
    """One validated :class:`Record` (all but the file-wide unique-id check, :func:`check_id`)
    and whether its id is its row number."""
    where = location(name, line)
    try:
        _classify(raw)
    except _Bad as err:
        raise NtkSelectError(f"{where}: {err}") from None
    bad = _unencodable(raw)
    if bad:
        raise NtkSelectError(
            f"{where}: field {bad} holds a lone surrogate (a JSON escape such as \\ud800 without its pair), "
            "which is not valid Unicode; fix or remove that escape"
        )
    rid = raw.get("id")
    implicit = rid is None or rid == ""
    if implicit:
        rid = row
    elif isinstance(rid, bool) or not isinstance(rid, (str, int, float)):
        raise NtkSelectError(f"{where}: field 'id' must be a string or a number, found {type(rid).__name__}; fix the id")
    return Record(id=str(rid), raw=raw, path=name, line=line), implicit


def is_pipe(path: str | Path) -> bool:
    """True for a FIFO, ``/dev/stdin`` or another stream that can be read only once."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


_READERS: dict[str, Callable[..., Iterable[tuple]]] = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}
_STREAMED = (_read_jsonl, _read_json, _read_csv)  # the readers that hash what they read (one pass)


class _Counted:
    """A hashlib object that also counts the bytes it has seen."""

    def __init__(self, h: Any):
        self.h, self.n = h, 0

    def update(self, data: bytes) -> None:
        self.n += len(data)
        self.h.update(data)


class RecordStream:
    """The checked records of a data file, read once, in file order (format from the extension;
    a pipe without a recognised extension is read as JSON Lines). After the iteration ends,
    :attr:`sha256` is the file's SHA-256: computed from the same bytes as they were read for
    JSON Lines, JSON and CSV (so a pipe works), by a pass of its own for Parquet and dataset
    folders (which need random access and so cannot be pipes)."""

    def __init__(self, path: str | Path):
        p = Path(path)
        self.path, self.name = p, str(path)
        name = self.name
        if not p.exists():
            raise NtkSelectError(f"{name}: no such file or folder; check the path")
        self.pipe = is_pipe(p)
        ext = p.suffix.lower()
        if ext not in _READERS and name.startswith(("/dev/", "/proc/")) and not p.is_dir():
            # /dev/stdin (or /dev/fd/N) redirected from a file: that file's format, else JSON Lines as for a pipe
            real = Path(os.path.realpath(p)).suffix.lower()
            ext = real if real in _READERS else ".jsonl"
        if p.is_dir():
            self.reader = _read_hf
        elif ext in _READERS:
            self.reader = _READERS[ext]
        elif self.pipe:
            self.reader = _read_jsonl
        else:
            raise NtkSelectError(
                f"{name}: unsupported file type {ext or '(no extension)'!r}; use {', '.join(SUPPORTED_EXTENSIONS)} "
                "or a folder saved with datasets' save_to_disk"
            )
        if self.pipe and self.reader not in _STREAMED:
            raise NtkSelectError(f"{name}: is a pipe, and Parquet needs a file it can seek in; write it to a file first, or pipe JSON Lines")
        self._h = _Counted(hashlib.sha256()) if self.reader in _STREAMED else None
        try:
            self.size = None if (self.pipe or p.is_dir()) else p.stat().st_size  # bytes, for the progress line's ETA
        except OSError:
            self.size = None
        self._sha: str | None = None
        self.records = 0
        self._used = False

    def __iter__(self):
        for rec, _ in self.with_source():
            yield rec

    def with_source(self):
        """(record, the bytes of its line) pairs: the line for JSON Lines (json.loads of it is
        the record's fields), None for the other formats."""
        if self._used:
            raise RuntimeError("a RecordStream is read once")
        self._used = True
        seen: dict[str, tuple[int, bool]] = {}  # id -> (line, whether the id is the row number)
        name = self.name
        try:
            for row, item in enumerate(self.reader(self.path, name, self._h)):
                rec = _checked_record(name, row, item[0], item[1], seen)
                self.records += 1
                yield rec, (item[2] if len(item) > 2 else None)
        except OSError as err:  # unreadable file (permissions, I/O error); a bad record is an NtkSelectError
            raise NtkSelectError(f"{name}: cannot read it ({err.strerror or err}); check that the file exists and is readable") from None
        if not self.records:
            raise NtkSelectError(f"{name}: has no records; add at least one record")
        self._sha = self._h.h.hexdigest() if self._h is not None else None

    def items(self):
        """(row, line, payload, bytes) of each record in file order, not yet checked: for JSON
        Lines the line's text (parse it with :func:`parse_json_line`) and its bytes, else the
        parsed value and None. For a pass that checks records elsewhere (in worker processes);
        the caller counts them into :attr:`records` and calls :meth:`finish`."""
        if self._used:
            raise RuntimeError("a RecordStream is read once")
        self._used = True
        try:
            if self.reader is _read_jsonl:
                for row, (lineno, text, chunk) in enumerate(_jsonl_lines(self.path, self.name, self._h)):
                    yield row, lineno, text, chunk
            else:
                for row, item in enumerate(self.reader(self.path, self.name, self._h)):
                    yield row, item[0], item[1], None
        except OSError as err:
            raise NtkSelectError(f"{self.name}: cannot read it ({err.strerror or err}); check that the file exists and is readable") from None

    def finish(self) -> None:
        if not self.records:
            raise NtkSelectError(f"{self.name}: has no records; add at least one record")
        self._sha = self._h.h.hexdigest() if self._h is not None else None

    @property
    def parses_lines(self) -> bool:
        """Whether :meth:`items` gives JSON lines to parse (else parsed values)."""
        return self.reader is _read_jsonl

    @property
    def bytes_read(self) -> int | None:
        return self._h.n if self._h is not None else None

    @property
    def sha256(self) -> str:
        """The input's SHA-256 (the same as ``files.sha256_path``); only after a full iteration."""
        if self._sha is None:
            if self._h is not None:
                raise RuntimeError("RecordStream.sha256 is known only once every record has been read")
            self._sha = sha256_path(self.path)
        return self._sha


def load_records(path: str | Path) -> list[Record]:
    """Read and check every record of a data file (format from the extension), into memory.
    Pools that may not fit use :mod:`ntkselect.data.pool` instead, which streams."""
    return list(RecordStream(path))


# --------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    train_mask: list[bool]  # True at the tokens the example trains on (its labels); never at index 0
    truncated: bool


@dataclass
class TokenizeStats:
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    template: str = ""

    def add(self, ex: TokenizedExample) -> None:
        self.examples += 1
        self.tokens += len(ex.input_ids)
        self.trained_tokens += sum(ex.train_mask)
        self.truncated += int(ex.truncated)

    def to_dict(self) -> dict:
        return asdict(self)


#: records per call of the tokenizer's batch API
TOKENIZE_BATCH = 1024


def resolve_template(tokenizer, template: str) -> str:
    """``"auto"`` -> ``"chat"`` when the tokenizer has a chat template, else ``"plain"``."""
    if template not in _TEMPLATES:
        raise NtkSelectError(f"unknown --template {template!r}; use one of {', '.join(_TEMPLATES)}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "plain"
    if template == "chat" and not has_chat:
        raise NtkSelectError("--template chat needs a tokenizer with a chat template, and this one has none; use --template plain or auto")
    return template


def token_ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render_text(tokenizer, messages: Sequence[dict], generation_prompt: bool, where: str) -> str:
    try:
        # tokenize=False: transformers 5 returns a BatchEncoding when tokenizing, and the
        # template already contains any BOS text, so the string is tokenized without extras.
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja2 TemplateError, template-raised exceptions
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NtkSelectError(f"{where}: the chat template cannot render this record ({msg}); fix the messages or use --template plain") from None
    if not isinstance(text, str):
        raise NtkSelectError(f"{where}: the chat template did not render to text; use --template plain or a tokenizer with a standard chat template")
    return text


def render_ids(tokenizer, messages: Sequence[dict], generation_prompt: bool, where: str) -> list[int]:
    return token_ids(tokenizer, _render_text(tokenizer, messages, generation_prompt, where), special=False)


def _not_prefix_stable(where: str, i: int) -> NtkSelectError:
    return NtkSelectError(
        f"{where}: the chat template is not prefix-stable (rendering the first messages does not give a "
        f"prefix of the whole conversation at assistant message {i}), so the assistant tokens cannot be "
        "located; use --template plain or a tokenizer with a prefix-stable chat template"
    )


def _offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
    """Token ids of ``text`` (no special tokens added) and each token's character span, or
    None when the tokenizer cannot give offsets (a slow, pure-Python tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    spans = enc.get("offset_mapping")
    if spans is None or len(spans) != len(enc["input_ids"]):
        return None
    return list(enc["input_ids"]), [(int(a), int(b)) for a, b in spans]


def _chat_example(tokenizer, messages: Sequence[dict], where: str) -> tuple[list[int], list[bool]]:
    """Tokens of the rendered conversation; trained: each assistant turn's tokens.

    Assistant turn i is the text that rendering message i adds after the generation prompt:
    the characters [len(render(messages[:i], add_generation_prompt=True)),
    len(render(messages[:i + 1]))) of the rendered conversation, which must extend both
    renders as text. The whole conversation is tokenized once, and a token is trained when its
    character span overlaps a turn's span: a token that straddles the start of a response
    (e.g. the template's newline merged with the response's leading spaces into one token) is
    trained, since it holds response text. Where the template and the response meet on a
    token boundary (ordinary text) this is exactly the tokens after the generation prompt's
    tokens. Whatever the response starts with, the boundary is found: tokens are never
    compared, so whitespace that the tokenizer merges across the boundary is not an error."""
    text, turns = _chat_turns(tokenizer, messages, where)
    enc = _offsets(tokenizer, text)
    if enc is None:
        return _chat_example_by_tokens(tokenizer, messages, text, turns, where)
    ids, spans = enc
    return ids, _chat_mask(spans, turns)


def _chat_turns(tokenizer, messages: Sequence[dict], where: str) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered conversation and each assistant turn's (message index, first char, end char)."""
    if messages[0]["role"] == "assistant":
        # Its start would be the render of an empty conversation, which transformers refuses
        # (and templates that insert a default system prompt would not be prefix-stable).
        raise NtkSelectError(
            f"{where}: the conversation starts with an assistant message, whose tokens a chat template "
            "cannot locate; put a user (or system) message first or use --template plain"
        )
    text = _render_text(tokenizer, messages, False, where)
    turns: list[tuple[int, int, int]] = []  # (message index, first char, end char)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render_text(tokenizer, messages[:i], True, where)
        upto = _render_text(tokenizer, messages[: i + 1], False, where)
        if not (text.startswith(before) and text.startswith(upto) and len(before) <= len(upto)):
            raise _not_prefix_stable(where, i)
        turns.append((i, len(before), len(upto)))
    return text, turns


def _chat_mask(spans: Sequence[tuple[int, int]], turns: Sequence[tuple[int, int, int]]) -> list[bool]:
    mask = [False] * len(spans)
    for _, lo, hi in turns:
        for t, (a, b) in enumerate(spans):
            if (a < hi and b > lo) or (a == b and lo <= a < hi):
                mask[t] = True
    return mask


def _chat_example_by_tokens(tokenizer, messages: Sequence[dict], text: str, turns, where: str) -> tuple[list[int], list[bool]]:
    # A tokenizer without character offsets: the rendered prefixes must also be token prefixes.
    full = token_ids(tokenizer, text, special=False)
    mask = [False] * len(full)
    for i, _, _ in turns:
        before = render_ids(tokenizer, messages[:i], True, where)
        upto = render_ids(tokenizer, messages[: i + 1], False, where)
        for prefix in (before, upto):
            if full[: len(prefix)] != prefix:
                raise _not_prefix_stable(where, i)
        for t in range(len(before), len(upto)):
            mask[t] = True
    return full, mask


def _plain_messages(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
    # "role: content" lines; assistant content (+ EOS) is trained, as for plain prompt/response.
    ids: list[int] = []
    mask: list[bool] = []
    pending = ""
    eos = tokenizer.eos_token_id

    def flush(text: str, trained: bool) -> None:
        toks = token_ids(tokenizer, text, special=not ids)  # default special tokens (BOS) only at the start
        ids.extend(toks)
        mask.extend([trained] * len(toks))

    for m in messages:
        if m["role"] == "assistant":
            flush(pending + "assistant: ", False)
            flush(m["content"], True)
            if eos is not None:
                ids.append(eos)
                mask.append(True)
            pending = "\n"
        else:
            pending += f"{m['role']}: {m['content']}\n"
    return ids, mask


def _truncate(ids: list[int], mask: list[bool], max_length: int) -> tuple[list[int], list[bool]]:
    start = 0
    if not any(mask[1:max_length]):
        # The head has nothing to train on (long prompt): keep some context before the
        # first trained token instead, at least one token so that token is predicted. When
        # the example ends within the window, start earlier so the window stays full: more
        # prompt context, same trained tokens.
        first = mask.index(True, 1)
        start = max(0, min(first - max(1, max_length // 4), len(ids) - max_length))
    return ids[start : start + max_length], mask[start : start + max_length]


def _kind_and_template(record: Record, tokenizer, max_length: int, template: str) -> tuple[str, str, str]:
    """(where, kind, resolved template) of a record, or the one-line error that stops it."""
    where = location(record.path, record.line)
    if max_length < 2:
        raise NtkSelectError(f"--max-length must be at least 2 tokens, got {max_length}")
    try:
        kind = _classify(record.raw)
    except _Bad as err:
        raise NtkSelectError(f"{where}: {err}") from None
    asked = template
    if template == "auto":
        template = resolve_template(tokenizer, template)
    if template not in ("chat", "plain"):
        raise NtkSelectError(f"unknown template {template!r}; use chat or plain")
    if kind == "messages" and asked == "auto" and template == "plain":
        # Conversations are only rendered as 'role: content' lines when asked for explicitly:
        # silently training on a made-up chat format is worse than stopping.
        raise NtkSelectError(
            f"{where}: a messages record needs a chat template and the tokenizer of --model has none; "
            "pass --template plain to render conversations as 'role: content' lines, or use a model whose tokenizer has a chat template"
        )
    if template == "chat" and kind != "text" and not getattr(tokenizer, "chat_template", None):
        raise NtkSelectError(
            f"{where}: a {kind} record needs a chat template and this tokenizer has none; use --template plain or a tokenizer with a chat template"
        )
    return where, kind, template


def _finish(ids: list[int], mask: list[bool], kind: str, where: str, max_length: int, clean: bool = False) -> TokenizedExample:
    # Nothing predicts token 0, so it is never a trained token; the mask then counts exactly
    # the tokens that contribute a loss term (logit t-1 predicts token t).
    if mask:
        mask[0] = False
    if not any(mask):
        raise NtkSelectError(
            f"{where}: nothing to train on: the {kind} record gives {len(ids)} token(s) and none after the first is trained; "
            "give it a longer text or response, or remove the record"
        )
    truncated = len(ids) > max_length
    if truncated:
        ids, mask = _truncate(ids, mask, max_length)
        mask[0] = False
    if not clean:  # ``clean``: already lists of Python ints and bools (the batch path's)
        ids, mask = [int(i) for i in ids], [bool(m) for m in mask]
    return TokenizedExample(input_ids=ids, train_mask=mask, truncated=truncated)


#: a record with a text field longer than this many characters per --max-length token is tokenised
#: from a bounded cut of its fields (:func:`_tokenize_long`); no token of an ordinary text spans that many
LONG_CHARS_PER_TOKEN = 16


def _longest_field(raw: dict) -> int:
    """The length in characters of a record's longest text field (message contents included)."""
    n = max((len(v) for v in raw.values() if isinstance(v, str)), default=0)
    msgs = raw.get("messages")
    if isinstance(msgs, list):
        n = max([n, *(len(m["content"]) for m in msgs if isinstance(m, dict) and isinstance(m.get("content"), str))])
    return n


def _cut(record: Record, kind: str, chars: int) -> Record:
    """The record with each text field cut to ``chars`` characters, on the side truncation keeps:
    trained text (``text``, a response, an assistant turn and what follows the first one) keeps its
    start; context before the first trained token (a prompt, the messages before the first assistant
    turn) keeps its end, since the truncation window starts a quarter of --max-length before the
    first trained token. Only for tokenising: the record itself is never changed."""
    raw = record.raw
    head = lambda t: t[:chars]  # noqa: E731
    tail = lambda t: t[-chars:] if len(t) > chars else t  # noqa: E731
    if kind == "text":
        cut = {"text": head(_as_str(raw, "text"))}
    elif kind == "prompt_response":
        prompt, response = _prompt_response(raw)
        cut = {"prompt": tail(prompt), "response": head(response)}
    else:
        first = next((i for i, m in enumerate(raw["messages"]) if m["role"] == "assistant"), len(raw["messages"]))
        cut = {"messages": [{**m, "content": (tail if i < first else head)(m["content"])} for i, m in enumerate(raw["messages"])]}
    return Record(id=record.id, raw=cut, path=record.path, line=record.line)


def _tokenize_long(record: Record, tokenizer, max_length: int, template: str) -> TokenizedExample:
    """:func:`tokenize_record` of a record with a very long field, in memory bounded by --max-length.

    Tokenising a 16 MB field whole costs about 2.5 GB (ids and character offsets of millions of
    tokens) to keep max_length of them. Instead the fields are cut (:func:`_cut`) to C characters,
    C = 16 x max_length at first, and doubled until the cuts at C, C + 1 and C / 2 give the same ids,
    mask and truncation: the tokens truncation keeps lie far from the cut, so neither a longer cut nor
    one a character off changes them. The cut one character off matters for a field that is one long
    word: byte-pair merges run across the whole word, so its tokens near the cut follow the cut's
    position (a run of "a" splits by parity) and cuts at C and 2C alone can agree by accident. A record
    whose kept tokens still move (a long word in the window, a field of fewer tokens than the window
    needs) reaches its full length and is tokenised whole, exactly as before."""
    _, kind, _ = _kind_and_template(record, tokenizer, max_length, template)
    longest = _longest_field(record.raw)
    chars = LONG_CHARS_PER_TOKEN * max_length
    prev: TokenizedExample | None = None

    def at(c: int) -> TokenizedExample:
        return tokenize_record(_cut(record, kind, c), tokenizer, max_length, template, _whole=True)

    while chars + 1 < longest:
        ex = at(chars)
        if ex == prev and at(chars + 1) == ex:
            return ex
        prev, chars = ex, 2 * chars
    return tokenize_record(record, tokenizer, max_length, template, _whole=True)


def tokenize_record(record: Record, tokenizer, max_length: int, template: str, _whole: bool = False) -> TokenizedExample:
    """Token ids and the trained-token mask of one record (``template``: "chat" or "plain")."""
    if not _whole and isinstance(record.raw, dict) and _longest_field(record.raw) > LONG_CHARS_PER_TOKEN * max_length:
        return _tokenize_long(record, tokenizer, max_length, template)
    where, kind, template = _kind_and_template(record, tokenizer, max_length, template)
    if kind == "text":
        ids = token_ids(tokenizer, _as_str(record.raw, "text"), special=True)
        mask = [True] * len(ids)
    elif kind == "prompt_response":
        prompt, response = prompt_response(record.raw)
        if template == "chat":
            ids, mask = _chat_example(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], where)
        else:
            p_ids = token_ids(tokenizer, prompt + "\n", special=True)
            r_ids = token_ids(tokenizer, response, special=False)
            if tokenizer.eos_token_id is not None:
                r_ids.append(tokenizer.eos_token_id)
            ids, mask = p_ids + r_ids, [False] * len(p_ids) + [True] * len(r_ids)
    else:
        messages = record.raw["messages"]
        if template == "chat":
            ids, mask = _chat_example(tokenizer, messages, where)
        else:
            ids, mask = _plain_messages(tokenizer, messages)
    return _finish(ids, mask, kind, where, max_length)


def tokenize_batch(records: Sequence[Record], tokenizer, max_length: int, template: str) -> list[TokenizedExample]:
    """:func:`tokenize_record` of each record, the same ids and masks, with the tokenizer's batch
    API: one call per kind of text for the whole batch (a fast tokenizer encodes a batch in
    parallel, about 3x faster per record than one call each even on one core). Records the
    batch path does not cover (plain-rendered conversations; chat records with a tokenizer
    that gives no character offsets) go through :func:`tokenize_record`."""
    if not getattr(tokenizer, "is_fast", False):
        return [tokenize_record(r, tokenizer, max_length, template) for r in records]
    out: list[TokenizedExample | None] = [None] * len(records)
    plans: list[tuple[int, str, str, str, Any]] = []  # (index, where, kind, how, payload)
    special: list[str] = []  # texts tokenized with the default special tokens
    plain: list[str] = []  # texts tokenized without
    chat: list[str] = []  # rendered conversations, tokenized with character offsets
    first_error: NtkSelectError | None = None  # the first bad record's error, raised after the records before it are checked
    for i, rec in enumerate(records):
        try:
            where, kind, tmpl = _kind_and_template(rec, tokenizer, max_length, template)
            if _longest_field(rec.raw) > LONG_CHARS_PER_TOKEN * max_length:  # memory bounded by max_length, not by the field
                out[i] = _tokenize_long(rec, tokenizer, max_length, template)
                continue
            if kind == "text":
                plans.append((i, where, kind, "text", len(special)))
                special.append(_as_str(rec.raw, "text"))
                continue
            if kind == "prompt_response" and tmpl == "plain":
                prompt, response = _prompt_response(rec.raw)
                plans.append((i, where, kind, "pr", (len(special), len(plain))))
                special.append(prompt + "\n")
                plain.append(response)
                continue
            if tmpl != "chat":
                out[i] = tokenize_record(rec, tokenizer, max_length, template)
                continue
            if kind == "prompt_response":
                prompt, response = _prompt_response(rec.raw)
                messages: Sequence[dict] = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            else:
                messages = rec.raw["messages"]
            text, turns = _chat_turns(tokenizer, messages, where)
            plans.append((i, where, kind, "chat", (len(chat), turns)))
            chat.append(text)
        except NtkSelectError as err:
            first_error = err
            break
    enc_special = tokenizer(special, add_special_tokens=True)["input_ids"] if special else []
    enc_plain = tokenizer(plain, add_special_tokens=False)["input_ids"] if plain else []
    chat_ids: list = []
    chat_spans: list = []
    if chat:
        try:
            enc = tokenizer(chat, add_special_tokens=False, return_offsets_mapping=True)
            chat_ids, chat_spans = enc["input_ids"], enc["offset_mapping"]
        except (NotImplementedError, ValueError, TypeError):
            chat_ids = []
    eos = tokenizer.eos_token_id
    for i, where, kind, how, at in plans:
        if how == "text":
            ids = list(enc_special[at])
            mask = [True] * len(ids)
        elif how == "pr":
            p_ids, r_ids = list(enc_special[at[0]]), list(enc_plain[at[1]])
            if eos is not None:
                r_ids.append(eos)
            ids, mask = p_ids + r_ids, [False] * len(p_ids) + [True] * len(r_ids)
        else:
            if not chat_ids or len(chat_spans[at[0]]) != len(chat_ids[at[0]]):
                out[i] = tokenize_record(records[i], tokenizer, max_length, template)
                continue
            ids = list(chat_ids[at[0]])
            mask = _chat_mask([(int(a), int(b)) for a, b in chat_spans[at[0]]], at[1])
        out[i] = _finish(ids, mask, kind, where, max_length, clean=True)
    if first_error is not None:
        raise first_error
    return [e for e in out if e is not None]


def tokenize_records(records: Iterable[Record], tokenizer, max_length: int, template: str = "auto") -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize every record with one resolved template; truncation is counted, never fatal."""
    resolved = resolve_template(tokenizer, template)
    stats = TokenizeStats(template=resolved)
    out: list[TokenizedExample] = []
    records = list(records)
    for a in range(0, len(records), TOKENIZE_BATCH):
        # "auto" goes through unresolved so that messages records without a chat template stop
        for ex in tokenize_batch(records[a : a + TOKENIZE_BATCH], tokenizer, max_length, "auto" if template == "auto" else resolved):
            out.append(ex)
            stats.add(ex)
    return out, stats


def token_convention(template: str, tokenizer) -> dict:
    """What the trained tokens are, for the run manifest (so results can be reproduced)."""
    resolved = resolve_template(tokenizer, template)
    chat = getattr(tokenizer, "chat_template", None)
    if isinstance(chat, dict):  # several named templates
        chat = json.dumps(chat, sort_keys=True)
    if resolved == "chat":
        pr = (
            "messages [user: prompt, assistant: response] rendered with the tokenizer's chat template "
            "(tokenize=False), then tokenized with add_special_tokens=False; trained: the assistant turn's tokens, "
            "located by character offsets (as for messages)"
        )
        msgs = (
            "rendered with the chat template and tokenized once; trained: the tokens whose characters overlap "
            "an assistant message's span of the rendered text, from the end of render(messages[:i], "
            "add_generation_prompt=True) to the end of render(messages[:i+1]) (the template must be prefix-stable "
            "as text; a token straddling the start of a response is trained)"
        )
    else:
        pr = "tokenizer(prompt + '\\n') + tokenizer(response, add_special_tokens=False) + [eos]; trained: response tokens + eos"
        msgs = "'role: content' lines; before each assistant message 'assistant: ' (untrained), then its content + eos (trained); other messages untrained"
    return {
        "template": resolved,
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "chat_template_sha256": hashlib.sha256(chat.encode()).hexdigest() if chat else None,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "kinds": {
            "text": "tokenizer(text) with its default special tokens; every token after index 0 is trained",
            "prompt_response": pr,
            "messages": msgs,
        },
        "prompt_response_fields": "prompt+response; instruction+output (prompt = instruction + '\\n\\n' + input when input is non-empty); question+answer",
        "prediction": "the logit at position t-1 predicts trained token t; token 0 is never predicted, so it is never trained",
        "truncation": (
            "keep the first max_length tokens; if that keeps no trained token after index 0, keep a "
            "max_length window starting max(1, max_length // 4) tokens before the first trained token, "
            "moved earlier if the example ends inside it (never before token 0); "
            "truncation is counted, never fatal"
        ),
        "empty": "an example with no trained token after index 0 is an error",
    }
