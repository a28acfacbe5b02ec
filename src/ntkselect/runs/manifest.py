"""Reading a finished selection run back: its ``manifest.json``, and every file a later command
(``report``, ``diagnose --run``) reads checked against the SHA-256 the manifest holds.

``manifest.json`` is written last and lists the sha256 of the inputs as the run read them
(``inputs.domain.sha256``, ``inputs.pool.sha256``) and of its outputs as it wrote them
(``outputs``). A damaged run (a manifest that is not one, an output removed or edited) is
refused in one line; an input edited since the run is refused where the command would compute
from it (``diagnose --run``) and noted where it only illustrates (``report``'s nearest domain
examples). Manifests written before ``outputs`` existed are read with a warning that their files
cannot be verified.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from ntkselect.errors import NtkSelectError
from ntkselect.files import sha256_path

__all__ = ["OUTPUT_FILES", "output_hashes", "read_manifest", "check_outputs", "input_changed"]

logger = logging.getLogger(__name__)

OUTPUT_FILES = ("selected.jsonl", "scores.jsonl", "train.jsonl")  # what a selection run's manifest vouches for by hash
_REQUIRED = {"tool": str, "method": str, "summary": dict}  # what every ntkselect manifest has held


def output_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """{name: sha256} of the run's output files in ``folder`` (for its manifest)."""
    return {n: sha256_path(Path(folder) / n) for n in OUTPUT_FILES if (Path(folder) / n).exists()}


def read_manifest(run_dir: str | os.PathLike, flag: str = "run folder") -> dict:
    """The manifest of the finished selection run in ``run_dir``; a missing, unreadable or
    incomplete one is refused in one line naming the file and the fix."""
    run = Path(run_dir)
    if not run.is_dir():
        raise NtkSelectError(f"{flag} {run} is not a folder; pass the --out folder of a finished selection run")
    path = run / "manifest.json"
    if not path.exists():
        raise NtkSelectError(f"{flag} {run} has no manifest.json, so it holds no finished selection run; pass the --out folder of a finished run")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NtkSelectError(f"{path}: cannot read it ({err}); the run folder is damaged, rerun the selection") from None
    if not isinstance(m, dict):
        raise NtkSelectError(f"{path}: expected a JSON object; the run folder is damaged, rerun the selection")
    bad = [k for k, t in _REQUIRED.items() if not isinstance(m.get(k), t)]
    if bad or m.get("tool") != "ntkselect" or m.get("complete") is not True:
        what = f"it lacks {', '.join(bad)}" if bad else "it is not marked complete by ntkselect"
        raise NtkSelectError(f"{path}: not the manifest of a finished ntkselect selection ({what}); the run folder is damaged, rerun the selection")
    return m


def check_outputs(run_dir: str | os.PathLike, manifest: dict, names: Sequence[str]) -> None:
    """Refuse, in one line, a run whose output files ``names`` are missing or differ from what its
    manifest says it wrote."""
    run = Path(run_dir)
    hashes = manifest.get("outputs")
    for n in names:
        p = run / n
        if not p.exists():
            raise NtkSelectError(f"{p} is missing, but the run in {run} wrote it (manifest.json); the run folder is damaged, rerun the selection")
    if not isinstance(hashes, dict):
        logger.warning(
            f"ntkselect: warning: {run / 'manifest.json'} has no checksums of the run's files (written by an older ntkselect), "
            f"so {', '.join(names)} cannot be checked against it"
        )
        return
    for n in names:
        if n in hashes and sha256_path(run / n) != hashes[n]:
            raise NtkSelectError(f"{run / n} has changed since the run wrote it (its sha256 differs from manifest.json's); restore it or rerun the selection")


def input_changed(manifest: dict, name: str, path: str | os.PathLike | None = None) -> str | None:
    """Why input ``name`` ("domain" or "pool") at ``path`` (default: where the manifest says it
    was read) is not the file the run read, or None when it is the same (or cannot be read again:
    a pipe). The file is hashed once, whole."""
    rec = (manifest.get("inputs") or {}).get(name) or {}
    want = rec.get("sha256") if isinstance(rec, dict) else None
    p = Path(path if path is not None else rec.get("path", ""))
    try:
        st = os.stat(p)
    except OSError:
        return f"{p} no longer exists"
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) or not want:
        return None  # a pipe, or a manifest without the hash: nothing to compare
    if sha256_path(p) != want:
        return f"{p} has changed since the run read it (its sha256 differs from manifest.json's)"
    return None
