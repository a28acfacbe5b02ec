"""Benchmark records: every finished ``evaluate`` cell as a small JSON file meant to be committed.

``--out`` is a machine's scratch folder; the records are what outlives it. With ``--records DIR``
each finished (method, seed) cell, and the base model's row, is also written to

    DIR/<device>-<precision>/<method>-seed<s>.json      (base.json for the base model)

with what it was computed from: the configuration's fingerprint (options and input hashes, not
paths), the resolved device and precision, the library versions and the machine. A later
``evaluate`` with the same ``--records`` (on a fresh clone, on another machine) copies the
finished cells into its ``--out`` and computes only the rest.

A record is never mixed with another kind silently: records of another device type or precision
go to their own subfolder (the label above), and a subfolder whose ``setup.json`` names another
configuration, or a record whose key is not its subfolder's, is refused with a message that says
what differs. :mod:`benchmarks/quality/render.py` renders the tables in docs/RESULTS.md from the
records alone.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ntkselect.errors import NtkSelectError
from ntkselect.files import atomic_open
from ntkselect.model.runtime import Runtime
from ntkselect.pipeline import package_versions
from ntkselect.runs.shards import digest

__all__ = ["RecordSet", "SETUP", "device_label", "machine", "record_name", "read_set", "dumps_record"]

SETUP = "setup.json"
FORMAT = 1


def device_label(rt: Runtime) -> str:
    """What a record's numbers depend on besides the configuration: the device type and the
    precision every pass runs in (e.g. ``cpu-float32``, ``cuda-bfloat16``)."""
    d = rt.describe()
    parts = [rt.device.type, str(d["precision"])]
    if d.get("model_dtype") not in (None, "float32", d["precision"]):  # a model held in another dtype computes other numbers
        parts.append(f"model-{d['model_dtype']}")
    return "-".join(parts)


def machine(rt: Runtime) -> dict:
    """The resolved device, in words, for the record (not part of its key)."""
    out: dict[str, Any] = {**rt.describe(), "threads": torch.get_num_threads(), "platform": platform.platform()}
    if rt.device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(rt.device)
    else:
        out["device_name"] = _cpu_name()
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record_name(method: str, seed: int | None) -> str:
    return "base.json" if seed is None else f"{method}-seed{seed}.json"


def dumps_record(obj: dict) -> str:
    """One key per line, each value on one line: small files and readable diffs."""
    lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False, default=str)}" for k, v in obj.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


@dataclass
class RecordSet:
    """The records of one configuration on one kind of device: ``<records>/<label>/``."""

    root: Path
    key: str
    label: str

    @classmethod
    def open(cls, records: str | Path, fingerprint: dict, label: str, meta: dict) -> RecordSet:
        """The set for ``fingerprint`` under ``records``; created with its ``setup.json`` if new,
        refused if it holds another configuration's records."""
        root = Path(records) / label
        key = digest(FORMAT, fingerprint, label)
        setup = root / SETUP
        if setup.exists():
            try:
                old = json.loads(setup.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise NtkSelectError(f"{setup}: not a records setup file ({err}); restore it from git or choose another --records") from None
            if old.get("key") != key:
                changed = _changed(old.get("fingerprint", {}), fingerprint) or ["format"]
                raise NtkSelectError(
                    f"--records {records}: {root} holds records of a different configuration ({', '.join(changed)}); "
                    "a changed recipe means rerunning every row of the domain: pass another --records folder"
                )
        else:
            root.mkdir(parents=True, exist_ok=True)
            with atomic_open(setup) as f:
                f.write(dumps_record({"format": FORMAT, "key": key, "label": label, "fingerprint": fingerprint, "meta": meta}))
        return cls(root, key, label)

    def path(self, method: str, seed: int | None) -> Path:
        return self.root / record_name(method, seed)

    def get(self, method: str, seed: int | None) -> dict | None:
        """The finished cell of ``method`` and ``seed`` (the cell row, without the record's own
        fields), or None; a record with another key is refused."""
        p = self.path(method, seed)
        if not p.exists():
            return None
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise NtkSelectError(f"{p}: not a benchmark record ({err}); restore it from git or delete it to recompute the cell") from None
        if rec.get("record", {}).get("key") != self.key:
            raise NtkSelectError(f"{p}: a record of another configuration or device ({rec.get('record', {}).get('label', '?')}) in {self.root}; move it out")
        return {k: v for k, v in rec.items() if k != "record"}

    def put(self, row: dict, rt: Runtime) -> None:
        """Write the finished cell ``row`` (its method and seed name the file)."""
        rec = {
            **row,
            "record": {
                "key": self.key,
                "label": self.label,
                "machine": machine(rt),
                "versions": package_versions(),
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        }
        with atomic_open(self.path(row["method"], row["seed"])) as f:
            f.write(dumps_record(rec))


def read_set(root: str | Path) -> tuple[dict, dict, dict]:
    """(setup, base row, {(method, seed): row}) of one record set, from its files alone."""
    root = Path(root)
    setup = json.loads((root / SETUP).read_text())
    base: dict = {}
    cells: dict = {}
    for p in sorted(root.glob("*.json")):
        if p.name == SETUP:
            continue
        rec = json.loads(p.read_text())
        if rec.get("record", {}).get("key") != setup["key"]:
            raise NtkSelectError(f"{p}: a record of another configuration or device in {root}; move it out")
        row = {k: v for k, v in rec.items() if k != "record"}
        if row["method"] == "base":
            base = row
        else:
            cells[(row["method"], int(row["seed"]))] = row
    return setup, base, cells
