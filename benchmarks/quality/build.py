"""Build one domain of the quality benchmark (issue 10): D, the oracle's extra in-domain file,
the test set and a general pool that mixes related and unrelated sources, all offline.

    .venv/bin/python benchmarks/quality/build.py --domain math --gsm8k ../shared/data/gsm8k --out runs/quality-data/math
    .venv/bin/python benchmarks/quality/build.py --domain medical --gsm8k ../shared/data/gsm8k --out runs/quality-data/medical
    .venv/bin/python benchmarks/quality/build.py --domain arithmetic --out runs/quality-data/arithmetic

Domains:
  math        GSM8K word problems with worked solutions (train split only, from --gsm8k). Pool: MMLU
              questions and reasoning-gym problems; related = reasoning-gym arithmetic and
              GSM-style generators and MMLU's mathematics subjects.
  medical     MMLU medical subjects (answer text as the response, options for accuracy). Pool: other
              MMLU subjects, reasoning-gym, GSM8K; related = MMLU biology/health subjects.
  arithmetic  reasoning-gym ``basic_arithmetic``. Pool: close relatives (chain_sum, products,
              decimal_arithmetic, decimal_chain_sum) and unrelated generators, plus MMLU.

Every pool record carries ``relation``: "related" or "unrelated", so ``evaluate`` can report
what each method picked. D, the extra file and the test set are disjoint from each other and
from the pool by normalised question text (checked; the build refuses otherwise). The same
arguments give byte-identical files. This script may read ../shared (benchmark data);
ntkselect itself never does.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

from ntkselect.data.demo import DOMAINS, LETTERS, load_gsm8k, load_mmlu, reasoning_gym_records
from ntkselect.errors import NtkSelectError
from ntkselect.files import atomic_write_json, atomic_write_jsonl, sha256_path

MATH_MMLU = ("elementary_mathematics", "high_school_mathematics", "high_school_statistics", "college_mathematics")
MED_RELATED_MMLU = ("college_biology", "high_school_biology", "nutrition", "virology", "human_aging")
ARITH_RELATED = ("chain_sum", "products", "decimal_arithmetic", "decimal_chain_sum")
MATH_RELATED_RG = ("gsm_symbolic", "basic_arithmetic", "chain_sum", "time_intervals")
UNRELATED_RG = (
    "family_relationships",
    "syllogism",
    "spell_backward",
    "word_sorting",
    "letter_counting",
    "caesar_cipher",
    "word_sequence_reversal",
    "sentence_reordering",
)
MAX_CHARS = 1200

#: per domain: |D|, extra (oracle source), test, and the pool's parts
DEFAULTS = {
    "math": {
        "n_train": 50,
        "n_extra": 100,
        "n_test": 200,
        "pool_mmlu_related": 150,
        "pool_mmlu_unrelated": 450,
        "pool_rg_related": 240,
        "pool_rg_unrelated": 360,
    },
    "medical": {
        "n_train": 50,
        "n_extra": 100,
        "n_test": 200,
        "pool_mmlu_related": 200,
        "pool_mmlu_unrelated": 600,
        "pool_rg_unrelated": 240,
        "pool_gsm8k": 160,
    },
    "arithmetic": {"n_train": 50, "n_extra": 100, "n_test": 200, "pool_rg_related": 320, "pool_rg_unrelated": 480, "pool_mmlu_unrelated": 200},
}


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def _sample(rows: list[dict], n: int, rng: random.Random, what: str) -> list[dict]:
    if n > len(rows):
        raise NtkSelectError(f"{what}: asked for {n}, only {len(rows)} usable; lower the count")
    idx = sorted(rng.sample(range(len(rows)), n))
    return [rows[i] for i in idx]


def _short(r: dict) -> bool:
    return len(r["prompt"]) + len(r["response"]) <= MAX_CHARS


def _dedup(rows: list[dict], taken: set[str]) -> list[dict]:
    out = []
    for r in rows:
        q = _norm(r["prompt"])
        if q not in taken:
            taken.add(q)
            out.append(r)
    return out


def _split(rows: list[dict], sizes: dict, rng: random.Random) -> tuple[list[dict], list[dict], list[dict]]:
    """Disjoint D, extra and test from one shuffled list of distinct in-domain records."""
    need = sizes["n_train"] + sizes["n_extra"] + sizes["n_test"]
    if need > len(rows):
        raise NtkSelectError(f"the domain has {len(rows)} usable records, fewer than --n-train + --n-extra + --n-test = {need}")
    idx = list(range(len(rows)))
    rng.shuffle(idx)
    a, b = sizes["n_train"], sizes["n_train"] + sizes["n_extra"]
    pick = lambda part: [rows[i] for i in sorted(part)]  # noqa: E731 - file order within each split
    return pick(idx[:a]), pick(idx[a:b]), pick(idx[b:need])


def _rg(names, n: int, seed: int) -> list[dict]:
    return reasoning_gym_records(n, seed, names, max_chars=MAX_CHARS)


def build(domain: str, out: Path, gsm8k: str | None, seed: int, sizes: dict) -> dict:
    rng = random.Random(f"quality/{domain}/{seed}")
    mmlu = [r for r in load_mmlu() if _short(r)]
    tag = lambda rows, rel: [{**r, "relation": rel} for r in rows]  # noqa: E731
    if domain == "math":
        if not gsm8k:
            raise NtkSelectError("--domain math needs --gsm8k PATH (GSM8K train JSONL, e.g. ../shared/data/gsm8k)")
        taken: set[str] = set()
        dom = _dedup([r for r in load_gsm8k(gsm8k, 10**9, seed) if _short(r)], taken)
        train, extra, test = _split(dom, sizes, rng)
        rel = _dedup([r for r in mmlu if r["subject"] in MATH_MMLU], taken)
        unrel = _dedup([r for r in mmlu if r["subject"] not in MATH_MMLU], taken)
        pool = tag(_sample(rel, sizes["pool_mmlu_related"], rng, "related MMLU"), "related")
        pool += tag(_sample(unrel, sizes["pool_mmlu_unrelated"], rng, "unrelated MMLU"), "unrelated")
        pool += tag(_dedup(_rg(MATH_RELATED_RG, sizes["pool_rg_related"], seed), taken), "related")
        pool += tag(_dedup(_rg(UNRELATED_RG, sizes["pool_rg_unrelated"], seed), taken), "unrelated")
    elif domain == "medical":
        subjects = DOMAINS["medical"]
        taken = set()
        dom = _dedup([r for r in mmlu if r["subject"] in subjects], taken)
        train, extra, test = _split(dom, sizes, rng)
        test = [{**r, "options": list(LETTERS)} for r in test]  # scored for accuracy as well as loss
        rel = _dedup([r for r in mmlu if r["subject"] in MED_RELATED_MMLU], taken)
        unrel = _dedup([r for r in mmlu if r["subject"] not in MED_RELATED_MMLU and r["subject"] not in subjects], taken)
        pool = tag(_sample(rel, sizes["pool_mmlu_related"], rng, "related MMLU"), "related")
        pool += tag(_sample(unrel, sizes["pool_mmlu_unrelated"], rng, "unrelated MMLU"), "unrelated")
        pool += tag(_dedup(_rg(UNRELATED_RG, sizes["pool_rg_unrelated"], seed), taken), "unrelated")
        if sizes.get("pool_gsm8k"):
            if not gsm8k:
                raise NtkSelectError("--domain medical adds GSM8K to the pool: pass --gsm8k PATH or --pool-gsm8k 0")
            pool += tag(_dedup(load_gsm8k(gsm8k, sizes["pool_gsm8k"], seed), taken), "unrelated")
    elif domain == "arithmetic":
        taken = set()
        need = sizes["n_train"] + sizes["n_extra"] + sizes["n_test"]
        # generate a margin: short arithmetic problems repeat now and then
        dom = _dedup(_rg(("basic_arithmetic",), need + need // 2, seed), taken)
        train, extra, test = _split(dom, sizes, rng)
        pool = tag(_dedup(_rg(ARITH_RELATED, sizes["pool_rg_related"], seed + 1), taken), "related")
        pool += tag(_dedup(_rg(UNRELATED_RG, sizes["pool_rg_unrelated"], seed + 1), taken), "unrelated")
        pool += tag(_sample(_dedup(list(mmlu), taken), sizes["pool_mmlu_unrelated"], rng, "MMLU"), "unrelated")
    else:
        raise NtkSelectError(f"unknown --domain {domain!r}; use math, medical or arithmetic")

    q = {k: {_norm(r["prompt"]) for r in v} for k, v in (("train", train), ("extra", extra), ("test", test), ("pool", pool))}
    checks = {
        f"{a}_{b}_overlap": len(q[a] & q[b])
        for a, b in (("train", "extra"), ("train", "test"), ("extra", "test"), ("train", "pool"), ("extra", "pool"), ("test", "pool"))
    }
    if any(checks.values()):  # cannot happen by construction (one shared `taken` set); refuse rather than leak
        raise NtkSelectError(f"the split leaks: {checks}")
    paths = {"train": out / "domain_train.jsonl", "extra": out / "domain_extra.jsonl", "test": out / "domain_test.jsonl", "pool": out / "pool.jsonl"}
    for k, rows in (("train", train), ("extra", extra), ("test", test), ("pool", pool)):
        atomic_write_jsonl(paths[k], rows)
    info = {
        "domain": domain,
        "seed": seed,
        "sizes": sizes,
        "max_chars": MAX_CHARS,
        "checks": checks,
        "counts": {k: len(v) for k, v in (("train", train), ("extra", extra), ("test", test), ("pool", pool))},
        "pool_by_relation": dict(sorted(Counter(r["relation"] for r in pool).items())),
        "pool_by_source": dict(sorted(Counter(r["source"] for r in pool).items())),
        "pool_by_subject": dict(sorted(Counter(r["subject"] for r in pool).items())),
        "paths": {k: str(v) for k, v in paths.items()},
        "sha256": {k: sha256_path(v) for k, v in paths.items()},
        "command": " ".join(sys.argv),
    }
    atomic_write_json(out / "split.json", info)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", required=True, choices=sorted(DEFAULTS))
    ap.add_argument("--out", required=True, help="folder for domain_train/extra/test.jsonl, pool.jsonl, split.json")
    ap.add_argument("--gsm8k", default=None, help="GSM8K train JSONL (or its folder); needed by math and medical")
    ap.add_argument("--seed", type=int, default=0)
    for k in sorted({k for d in DEFAULTS.values() for k in d}):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help="override the domain's default size")
    args = ap.parse_args(argv)
    sizes = dict(DEFAULTS[args.domain])
    for k in list(vars(args)):
        if vars(args)[k] is not None and k not in ("domain", "out", "gsm8k", "seed"):
            sizes[k] = vars(args)[k]
    try:
        info = build(args.domain, Path(args.out), args.gsm8k, args.seed, sizes)
    except NtkSelectError as err:
        print(f"build.py: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: info[k] for k in ("domain", "counts", "pool_by_relation", "checks")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
