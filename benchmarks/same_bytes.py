"""Do two source trees select the same bytes? A tiny-model ``ntkselect select`` per method, run
with each tree's ``src/``, and the outputs compared.

For a change that should not change any result (a restructuring): every method runs on the
same tiny random Llama (the tests' shape: 2 layers, d = 32, the real SmolLM2 tokenizer) and the
same seeded data, once with ``PYTHONPATH=<tree>/src`` for each tree, in fresh processes.
``selected.jsonl``, ``scores.jsonl``, ``train.jsonl`` and the adapter's files must be equal
byte for byte, and ``manifest.json`` equal except for what differs between any two runs: times,
the output folder, the command line, the process's memory.

    # main against this checkout
    python benchmarks/same_bytes.py /path/to/main .
    python benchmarks/same_bytes.py /path/to/main . --methods ntk,less --extra "--proj-dim 64"

It prints one line per method and file, and exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ("ntk", "random", "embedding", "less", "tsds", "ntk-norm", "ntk-trace", "ntk-diverse", "ntk-ensemble")
FILES = ("selected.jsonl", "scores.jsonl", "train.jsonl", "adapter/adapter_model.safetensors", "adapter/adapter_config.json")
#: manifest keys whose values differ between any two runs of the same thing
VOLATILE = {"timings", "out", "command", "seconds", "pool_pass_seconds", "rss", "peak_rss_bytes"}


TOPICS = ["blood pressure", "the kidney", "a fracture", "insulin", "fever", "asthma", "the liver", "a stroke", "anaemia", "the thyroid"]
OTHER = ["algebra", "a contract", "primes", "torts", "integrals", "a judge", "vectors", "a treaty", "matrices", "an appeal"]


def write_data(d: Path) -> tuple[Path, Path]:
    """A seeded domain (medical questions) and a 60-record pool of three sources, varied lengths."""
    rng = random.Random(0)
    domain = [{"question": f"What should a doctor know about {t}?", "answer": f"Facts about {t} matter." + " Indeed." * rng.randrange(4)} for t in TOPICS]
    pool = []
    for i in range(60):
        src = ("medicine", "maths", "law")[i % 3]
        w = rng.choice(TOPICS if src == "medicine" else OTHER)
        response = f"{w.capitalize()} is topic {i}." + " More." * rng.randrange(8)
        pool.append({"id": f"p{i}", "prompt": f"Question {i}: tell me about {w}.", "response": response, "source": src})
    for path, rows in ((d / "domain.jsonl", domain), (d / "pool.jsonl", pool)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "domain.jsonl", d / "pool.jsonl"


def _env(tree: Path) -> dict:
    # PYTHONHASHSEED: peft writes adapter_config.json's target_modules from a set, in hash order
    return {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}


def _strip(obj):
    """The manifest without the keys that differ between any two runs."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _diff(a, b, where="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{where}.{k}")
        return out
    return [] if a == b else [f"{where}: {a!r} != {b!r}"[:300]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path, help="a source tree (holding src/ntkselect)")
    p.add_argument("after", type=Path, help="another source tree")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--extra", default="", help="further select flags for every run")
    p.add_argument("--work", type=Path, default=None, help="folder for the model, data and runs (default: a temporary one)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="same-bytes-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny-llama"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("tiny.py")), str(model)], env=_env(args.before.resolve()), check=True)
    dom, pool = write_data(work)
    bad = 0
    for method in args.methods.split(","):
        outs = []
        for tag, tree in (("before", args.before.resolve()), ("after", args.after.resolve())):
            out = work / f"{method}-{tag}"
            cmd = [sys.executable, "-m", "ntkselect", "select", "--domain", str(dom), "--pool", str(pool), "--n", "6", "--out", str(out)]
            cmd += ["--model", str(model), "--method", method, "--overwrite", "--threads", "1", "--shard-size", "16", *shlex.split(args.extra)]
            proc = subprocess.run(cmd, env=_env(tree), capture_output=True, text=True)
            if proc.returncode:
                print(f"{method} ({tag}): exit {proc.returncode}\n{proc.stderr[-2000:]}")
                return 2
            outs.append(out)
        for name in FILES:
            a, b = _sha(outs[0] / name), _sha(outs[1] / name)
            same = a == b
            bad += not same
            print(f"{method:14} {name:36} {'same' if same else 'DIFFERENT'}  {(a or '-')[:16]}")
        ma, mb = (_strip(json.loads((o / "manifest.json").read_text())) for o in outs)
        diffs = _diff(ma, mb)
        bad += bool(diffs)
        print(f"{method:14} {'manifest.json (but times, out, command)':36} {'same' if not diffs else 'DIFFERENT'}")
        for line in diffs[:20]:
            print("    " + line)
    print(f"work folder: {work}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
