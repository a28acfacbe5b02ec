"""Run folders: what ntkselect may write, replace and delete in an output folder.

Every command that writes a folder (``select``, ``evaluate``, ``diagnose``, ``report``,
``eval-data``, ``demo``) goes through :func:`open_run`, which gives these guarantees:

* **Ours only where we wrote it.** ``.ntkselect.json`` in the folder records every entry
  ntkselect created there and which command created it. An entry a command is about to write
  that exists but is not recorded as that command's (the user's own ``work/`` or
  ``adapter/``, another command's ``manifest.json``) stops the run with one line before
  anything is written; nothing unrecorded is ever deleted or replaced.
* **Inputs are never outputs.** An input at (or inside) a path the run writes, or an ``--out``
  inside an input folder, is refused before anything is written.
* **One run at a time, and the lock first.** Every command takes ``.ntkselect.lock`` before it
  reads, moves or deletes anything inside its folder (a token store to reuse included), so a
  refused second run leaves the live one's bytes untouched. The lock is an exclusive ``flock``
  held for the life of the run, with the pid, host and command in it for the message a second
  process prints. The kernel (or, on NFS, the server) drops it when its process dies (``kill
  -9`` included), so a lock file left behind by a dead process is recognised as stale and
  taken over, with a line saying so. Forked worker processes close their copy of the lock, so
  a killed run's lingering workers do not keep it. Where ``flock`` is not available the file
  decides: a lock of this host is stale when its pid no longer runs (or is another process,
  started at another time); a lock of another host (a shared file system) is stale when its
  heartbeat is old: the holder touches the lock file every ``HEARTBEAT`` seconds, and one
  not touched for ``STALE_AFTER`` seconds (by the file system's clock) is taken over.
* **--overwrite swaps, it does not delete first.** A run that replaces an earlier one is
  written aside into ``.ntkselect-next-<command>/``; only once it has succeeded are the old
  run's entries moved aside (its finish marker first) and the new ones moved in (the new
  finish marker last), following a journal, so a crash at any point leaves either the old
  run or the new one, and the next run completes the swap.
* **Temporary files of interrupted runs are swept** (while holding the lock): only names of
  the shapes ntkselect's own temporary files have (``.NAME.XXXXXXXX.tmp`` of one of its
  outputs, ``.adapter-XXXXXXXX``, ``.ntkpool-XXXXXXXX`` and the like), and anything inside
  folders it owns. Temporary folders are made inside the locked folder, never beside it, so
  they are on its file system (moving them in is a rename) and a later run sweeps them. A
  finished run's scratch entries (``select``'s ``work/``, kept until the finish marker is
  written) are removed when the run was killed between the two.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ntkselect.errors import NtkSelectError
from ntkselect.files import atomic_write_json

__all__ = ["Layout", "Run", "open_run", "check_paths", "LOCK", "RECORD", "SELECT", "EVALUATE", "DIAGNOSE", "EVAL_DATA", "DEMO_DATA"]

logger = logging.getLogger(__name__)

LOCK = ".ntkselect.lock"
RECORD = ".ntkselect.json"
HEARTBEAT = 30.0  # seconds between touches of a held lock file
STALE_AFTER = 600.0  # without flock: a lock of another host not touched for this long is stale
ORPHAN_GRACE = 10.0  # seconds a lock may stay held after its run died (forked workers closing their copies)
_TMP_CHARS = "[a-z0-9_]{8}"  # tempfile's random names


@dataclass(frozen=True)
class Layout:
    """What one command writes into its folder."""

    command: str
    outputs: tuple[str, ...]  # every top-level entry it writes
    finished: str | None = None  # the entry written last: its presence marks a finished run
    setup: str | None = None  # the entry written first: what the run is computed from (resume)
    temp_prefixes: tuple[str, ...] = ()  # tempfile.mkdtemp prefixes it uses at the top level
    scratch: tuple[str, ...] = ()  # outputs kept only until the finish marker is written

    @property
    def staging(self) -> str:
        return f".ntkselect-next-{self.command}"

    @property
    def previous(self) -> str:
        return f".ntkselect-prev-{self.command}"

    @property
    def journal(self) -> str:
        return f".ntkselect-swap-{self.command}.json"

    @property
    def reserved(self) -> tuple[str, ...]:
        return (*self.outputs, self.staging, self.previous, self.journal, LOCK, RECORD)


SELECT = Layout(
    "select",
    ("run.json", "work", "shards.jsonl", "adapter", "selected.jsonl", "scores.jsonl", "train.jsonl", "report.html", "manifest.json"),
    finished="manifest.json",
    setup="run.json",
    temp_prefixes=(".adapter-", ".ntkpool-"),
    scratch=("work",),
)
EVALUATE = Layout(
    "evaluate",
    ("evaluate_config.json", "cells", "selections", "work", "results.csv", "results.md", "results.png", "manifest.json"),
    finished="manifest.json",
    setup="evaluate_config.json",
    temp_prefixes=(".work-", ".ntkpool-"),  # the per-seed work of versions before work/, and a temporary token store: swept
)
DIAGNOSE = Layout(
    "diagnose",
    ("checkpoints", "kernels.npz", "kernel_stability.png", "jacobian_free.png", "kernel_regression.png", "diagnostics.json"),
    finished="diagnostics.json",
    temp_prefixes=(".ckpt-",),
)
EVAL_DATA = Layout("eval-data", ("domain_train.jsonl", "domain_test.jsonl", "pool.jsonl", "split.json"), finished="split.json")
DEMO_DATA = Layout("demo-data", ("domain.jsonl", "pool.jsonl"))
LAYOUTS = (SELECT, EVALUATE, DIAGNOSE, EVAL_DATA, DEMO_DATA)
_ALL_OUTPUTS = {n for lay in LAYOUTS for n in lay.outputs} | {RECORD}


# -- paths --------------------------------------------------------------------------------------


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_paths(out: str | os.PathLike, layout: Layout, inputs: dict[str, str | os.PathLike | None], flag: str = "--out") -> Path:
    """Refuse an ``out`` that is a file or lies inside an input folder, and an input that lies
    where the run writes (one line naming the flag and the fix); reads only."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NtkSelectError(f"cannot write to {flag} {out}: it is a file, not a folder; choose a folder")
    real_out = os.path.realpath(out)
    for name, p in inputs.items():
        if p in (None, ""):
            continue
        real = os.path.realpath(p)
        if os.path.isdir(real) and _inside(real_out, real):
            raise NtkSelectError(f"{flag} {out} is inside {name} {p}: the run would write into its input; choose an {flag} outside it")
        for o in layout.reserved:
            if _inside(real, os.path.join(real_out, o)):
                raise NtkSelectError(f"{name} {p} is where this run writes {o} ({flag} {out}); move the input out of the way or choose another {flag}")
    return out


# -- the lock -------------------------------------------------------------------------------------


def _proc_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()  # field 22: start time in clock ticks
    except (OSError, IndexError):
        return None


def _alive(info: dict, age: float | None) -> bool:
    """Whether the process a lock file names may still run (without flock). Another host's:
    while its heartbeat (the file's modification ``age`` in seconds) is recent."""
    if info.get("host") != socket.gethostname():
        return age is None or age < STALE_AFTER
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _proc_start(pid)
    return not (start and info.get("start") and start != info["start"])  # a reused pid is another process


def _busy(path: Path, info: dict, flag: str, out: Path, unsure: bool) -> NtkSelectError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["time"])) if isinstance(info.get("time"), (int, float)) else "?"
    # a held flock: the kernel vouches that it is alive; otherwise say when it is taken over by itself
    hint = f" (if no such run is alive, delete {path}; a lock of another host untouched for {STALE_AFTER:.0f} s is taken over)" if unsure else ""
    return NtkSelectError(
        f"{flag} {out} is in use by another ntkselect run (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
        f"`ntkselect {info.get('command', '?')}` since {since}); wait for it to finish or choose another {flag}{hint}"
    )


def _read_lock(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 1 << 16).decode() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _age(fd: int) -> float | None:
    """Seconds since the lock file was last touched (its heartbeat), by the file system's clock
    as far as it can be seen: the modification time against the time now."""
    try:
        return max(0.0, time.time() - os.fstat(fd).st_mtime)
    except OSError:
        return None


_HELD: set[int] = set()  # this process's lock descriptors: closed in forked children (os.register_at_fork)


def _close_held_in_child() -> None:
    # a forked worker (the pool pass's) shares the lock's open file description; closing its copy
    # lets the lock go when the run dies, even while a killed run's workers linger for a moment
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class _Lock:
    def __init__(self, out: Path, command: str, flag: str):
        try:
            import fcntl
        except ImportError:  # not a POSIX system: the pid in the file decides
            fcntl = None  # type: ignore[assignment]
        self.path = out / LOCK
        orphan_until = time.monotonic() + ORPHAN_GRACE
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)  # never through a symlink
            try:
                if fcntl is None:
                    raise OSError(errno.ENOSYS, "no flock")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                info = _read_lock(fd)
                os.close(fd)
                if info.get("host") == socket.gethostname() and not _alive(info, None) and time.monotonic() < orphan_until:
                    # held, yet its run is dead: a worker it forked that has not yet been scheduled
                    # to close its copy of the lock (at fork), or is being killed; wait a moment
                    time.sleep(0.05)
                    continue
                raise _busy(self.path, info, flag, out, unsure=False) from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                flocked = False  # no flock on this file system: the pid in the file decides
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed it between our open and our lock: try again
                os.close(fd)
                continue
            old = _read_lock(fd)
            if not flocked and old.get("pid") not in (None, os.getpid()) and _alive(old, _age(fd)):
                os.close(fd)
                raise _busy(self.path, old, flag, out, unsure=True)
            self.stale = old if old.get("pid") not in (None, os.getpid()) else None  # left by a dead process
            me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()), "time": time.time(), "command": command}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(me) + "\n").encode())
            os.fsync(fd)
            self.fd: int | None = fd
            _HELD.add(fd)
            self._stop = threading.Event()
            self._beat = threading.Thread(target=self._heartbeat, name="ntkselect-lock-heartbeat", daemon=True)
            self._beat.start()
            return

    def _heartbeat(self) -> None:
        """Touch the lock file every HEARTBEAT seconds while it is held (see _alive)."""
        while not self._stop.wait(HEARTBEAT):
            fd = self.fd
            if fd is None:
                return
            with contextlib.suppress(OSError):
                os.utime(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: a process that opened it meanwhile retries on a new file
        _HELD.discard(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None


# -- the record of what is ours ----------------------------------------------------------------------


def _read_record(out: Path, flag: str) -> dict[str, str]:
    path = out / RECORD
    if not path.exists():
        return {}
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        entries = rec["entries"]
        if rec.get("tool") != "ntkselect" or not isinstance(entries, dict):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise NtkSelectError(f"{flag} {out} holds {RECORD}, which is not an ntkselect record; move it away or choose another {flag}") from None
    return {str(k): str(v) for k, v in entries.items()}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_TOP_TMP = re.compile(rf"^\.(?P<base>.+)\.(?:{_TMP_CHARS}\.tmp|old)$")
_NESTED_TMP = re.compile(rf"^\..+\.(?:{_TMP_CHARS}\.tmp|old)$|^\.(?:adapter|ckpt|work|ntkpool)-{_TMP_CHARS}$")


@dataclass
class Run:
    """One command's run in its folder, while the lock is held (see :func:`open_run`)."""

    out: Path
    layout: Layout
    flag: str
    log: Callable[[str], None]
    entries: dict[str, str] = field(default_factory=dict)
    only: tuple[str, ...] = ()  # the entries this invocation writes, when not all of the layout's (report)
    dir: Path | None = None  # where this run writes: out, or the staging folder
    staged: bool = False
    _committed: bool = False

    # -- what is there -------------------------------------------------------------------------
    def mine(self, name: str) -> bool:
        return self.entries.get(name) == self.layout.command

    def present(self) -> list[str]:
        """This command's entries in the folder (its outputs that exist)."""
        return [n for n in self.layout.outputs if os.path.lexists(self.out / n)]

    @property
    def state(self) -> str:
        """ "finished", "unfinished" (a setup file without a finish marker) or "new"."""
        lay = self.layout
        if lay.finished and (self.out / lay.finished).exists():
            return "finished"
        if lay.setup and (self.out / lay.setup).exists():
            return "unfinished"
        return "new"

    def setup(self, folder: Path | None = None) -> dict:
        """The setup file's contents ({} when missing or unreadable)."""
        if not self.layout.setup:
            return {}
        try:
            data = json.loads((Path(folder or self.out) / self.layout.setup).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    # -- the record ------------------------------------------------------------------------------
    def _save(self) -> None:
        atomic_write_json(
            self.out / RECORD,
            {
                "tool": "ntkselect",
                "note": "entries of this folder that ntkselect created, and which command; ntkselect replaces or deletes nothing else here",
                "entries": dict(sorted(self.entries.items())),
            },
        )

    def claim(self, *names: str) -> None:
        """Record ``names`` as this command's before it creates them."""
        new = {n: self.layout.command for n in names if self.entries.get(n) != self.layout.command}
        if new:
            self.entries.update(new)
            self._save()

    # -- where to write ------------------------------------------------------------------------------
    def in_place(self, clear: bool = True) -> Path:
        """Write into the folder itself; ``clear`` removes this command's earlier entries first
        (all recorded as ours)."""
        self.claim(*(self.only or self.layout.outputs))
        if clear:
            for n in self.only or self.present():
                if self.mine(n):
                    _remove(self.out / n)
        self.dir = self.out
        return self.out

    def stage(self, reuse: Callable[[dict], bool] | None = None) -> Path:
        """Write aside (``--overwrite`` of an earlier run): into the staging folder, reused when
        ``reuse(its setup)`` says it holds an interrupted attempt at the same run."""
        lay = self.layout
        staging = self.out / lay.staging
        self.claim(lay.staging)
        if staging.exists() and not (reuse and lay.setup and reuse(self.setup(staging))):
            _remove(staging)
        staging.mkdir(exist_ok=True)
        self.dir, self.staged = staging, True
        return staging

    # -- finishing -----------------------------------------------------------------------------------
    def commit(self) -> None:
        """The run succeeded: swap a staged run in; record what is there now."""
        if self.staged:
            assert self.dir is not None  # stage() set it
            names = [n for n in self.layout.outputs if os.path.lexists(self.dir / n)]
            old = [n for n in self.present() if self.mine(n)]
            self.claim(self.layout.previous, self.layout.journal, *names)
            atomic_write_json(self.out / self.layout.journal, {"old": old, "new": names})
            self._swap()
        for n in self.layout.outputs:
            if self.entries.get(n) == self.layout.command and not os.path.lexists(self.out / n):
                del self.entries[n]
        self._save()
        self._committed = True

    def _order(self, names: list[str], marker_first: bool) -> list[str]:
        fin = self.layout.finished
        rest = [n for n in names if n != fin]
        return ([fin] if fin in names else []) + rest if marker_first else rest + ([fin] if fin in names else [])

    def _swap(self) -> None:
        """Complete the swap the journal describes; safe to repeat after a crash at any point."""
        lay = self.layout
        journal = json.loads((self.out / lay.journal).read_text(encoding="utf-8"))
        staging, prev = self.out / lay.staging, self.out / lay.previous
        old, new = journal["old"], journal["new"]
        prev.mkdir(exist_ok=True)
        if all(os.path.lexists(staging / n) for n in new):  # nothing moved in yet: move every old entry aside, the finish marker first
            for n in self._order(old, marker_first=True):
                if os.path.lexists(self.out / n):
                    _remove(prev / n) if os.path.lexists(prev / n) else None
                    os.replace(self.out / n, prev / n)
        for n in self._order(new, marker_first=False):  # then the new entries, the finish marker last
            if os.path.lexists(staging / n):
                if os.path.lexists(self.out / n):
                    _remove(self.out / n)
                os.replace(staging / n, self.out / n)
        _remove(self.out / lay.journal)
        _remove(prev)
        _remove(staging)
        for n in (lay.journal, lay.previous, lay.staging):
            self.entries.pop(n, None)
        for n in old:
            if not os.path.lexists(self.out / n):
                self.entries.pop(n, None)
        self.entries.update({n: lay.command for n in new})
        self._save()
        self.staged = False

    # -- sweeping and recovery ------------------------------------------------------------------------
    def _recover(self) -> None:
        """Finish what an interrupted run left half done: a swap (from its journal), or a staged
        run that had finished but not been swapped in yet."""
        lay = self.layout
        staging = self.out / lay.staging
        if os.path.lexists(self.out / lay.journal) and self.mine(lay.journal):
            self.log(f"ntkselect: completing the interrupted replacement of the earlier run in {self.out}")
            self._swap()
        elif lay.finished and self.mine(lay.staging) and (staging / lay.finished).exists():
            self.log(f"ntkselect: the replacement run in {staging} had finished: moving it into {self.out}")
            self.dir, self.staged = staging, True
            self.commit()
            self._committed = False
        elif self.mine(lay.previous) and os.path.lexists(self.out / lay.previous):
            _remove(self.out / lay.previous)
        if lay.finished and (self.out / lay.finished).exists():
            left = [n for n in lay.scratch if self.mine(n) and os.path.lexists(self.out / n)]
            for n in left:  # killed between writing the finish marker and removing its scratch
                _remove(self.out / n)
            if left:
                self.log(f"ntkselect: removed {', '.join(n + '/' for n in left)} of the finished run in {self.out} (left by an interrupted run)")
        gone = [n for n in self.entries if not os.path.lexists(self.out / n)]  # claimed, never written (or swapped away)
        for n in gone:
            del self.entries[n]
        if gone and (self.out / RECORD).exists():
            self._save()

    def _sweep(self) -> int:
        n = 0
        for p in list(self.out.iterdir()):
            m = _TOP_TMP.match(p.name)
            if (m and m.group("base") in _ALL_OUTPUTS) or any(
                p.name.startswith(pre) and re.fullmatch(_TMP_CHARS, p.name[len(pre) :]) for lay in LAYOUTS for pre in lay.temp_prefixes
            ):
                _remove(p)
                n += 1
        for name in self.entries:
            top = self.out / name
            if not top.is_dir() or top.is_symlink():
                continue
            for root, dirs, files in os.walk(top):
                for d in list(dirs):
                    if _NESTED_TMP.match(d):
                        shutil.rmtree(Path(root) / d, ignore_errors=True)
                        dirs.remove(d)
                        n += 1
                for f in files:
                    if _NESTED_TMP.match(f):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(Path(root) / f)
                        n += 1
        return n


@contextlib.contextmanager
def open_run(
    out: str | os.PathLike,
    layout: Layout,
    inputs: dict[str, str | os.PathLike | None] | None = None,
    flag: str = "--out",
    log: Callable[[str], None] | None = None,
    only: tuple[str, ...] = (),
) -> Iterator[Run]:
    """Check ``out`` against ``inputs``, lock it, refuse entries of ``layout`` that are not
    ours, sweep temporary files and finish an interrupted swap; yield the :class:`Run`.

    Nothing is written before the checks pass, except the lock (removed again), and ``out``
    itself when it did not exist (removed again if the run is refused before writing). ``only``
    names the entries this invocation writes when it writes just some of the layout's (``report``
    writes report.html into a selection run). Messages go to ``log`` (default: this module's logger, at INFO)."""
    log = log or logger.info
    out = check_paths(out, layout, inputs or {}, flag)
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = _Lock(out, layout.command, flag)
    except NtkSelectError:
        _rmdirs(created)
        raise
    except OSError as err:
        _rmdirs(created)
        raise NtkSelectError(f"cannot write to {flag} {out}: {err.strerror or err}; choose a writable folder") from None
    run = Run(out=out, layout=layout, flag=flag, log=log, only=tuple(only))
    try:
        run.entries = _read_record(out, flag)
        foreign = [n for n in (only or layout.outputs) + (layout.staging, layout.previous, layout.journal) if os.path.lexists(out / n) and not run.mine(n)]
        if foreign:
            owners = sorted({run.entries[n] for n in foreign if n in run.entries})
            whose = f"by `ntkselect {', '.join(owners)}`" if owners else "by you or another program, not by ntkselect"
            shown = ", ".join(n + ("/" if (out / n).is_dir() else "") for n in foreign)
            raise NtkSelectError(
                f"{flag} {out} holds {shown}, created {whose}; this run would replace "
                f"{'it' if len(foreign) == 1 else 'them'}: move {'it' if len(foreign) == 1 else 'them'} away or choose another {flag}"
            )
        if lock.stale:
            host = lock.stale.get("host")
            where = f" on {host}" if host and host != socket.gethostname() else ""
            log(f"ntkselect: took over the lock of an ntkselect run that is no longer running (pid {lock.stale.get('pid')}){where}")
        run._recover()
        swept = run._sweep()
        if swept:
            log(f"ntkselect: removed {swept} temporary file(s) of an interrupted run in {out}")
        yield run
    except BaseException as err:
        if run.staged and not run._committed and isinstance(err, NtkSelectError):
            # a failed replacement: the earlier run stays as it was; an interrupted one (Ctrl-C,
            # a crash) stays aside instead, for the next --overwrite run with the same setup to resume
            with contextlib.suppress(OSError):
                _remove(run.out / run.layout.staging)
                run.entries.pop(run.layout.staging, None)
                run._save()
        lock.release()
        if not run.entries:
            _rmdirs(created)
        raise
    finally:
        lock.release()


def _rmdirs(created: list[Path]) -> None:
    """Remove the folders open_run created (innermost first) if they are still empty."""
    for p in created:
        try:
            p.rmdir()
        except OSError:
            return
