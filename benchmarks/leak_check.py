"""Time the evaluate leak check (ntkselect/data/leak.py): N training records against Q test questions.

    .venv/bin/python benchmarks/leak_check.py --records 10000 --questions 1000

Synthetic text (a 5,000-word vocabulary plus frequent function words, so that many positions start
a candidate match); every 1,000th record hides a whole test question in its response."""

from __future__ import annotations

import argparse
import random
import time

from ntkselect.data.leak import TestQuestions
from ntkselect.data.records import Record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=10000)
    ap.add_argument("--questions", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    vocab = [f"w{i}" for i in range(5000)] + ["the", "of", "which", "following", "is", "a"] * 200
    sent = lambda n: " ".join(rng.choice(vocab) for _ in range(n))  # noqa: E731
    tests = [Record(str(i), {"prompt": sent(rng.randint(8, 60)) + "\nA. x\nB. y\nAnswer:", "answer": "A"}, "test", i) for i in range(a.questions)]
    pool = [{"prompt": sent(rng.randint(20, 200)), "response": sent(rng.randint(5, 200))} for _ in range(a.records)]
    planted = list(range(0, a.records, 1000))
    for k in planted:
        pool[k]["response"] += " " + tests[rng.randrange(a.questions)].raw["prompt"]
    words = sum(len(r["prompt"].split()) + len(r["response"].split()) for r in pool)
    t = time.perf_counter()
    index = TestQuestions(tests)
    t_index = time.perf_counter() - t
    found = [i for i, r in enumerate(pool) if index.leaks(r)]
    t_scan = time.perf_counter() - t - t_index
    assert found == planted, (found, planted)
    print(
        f"{a.records} records ({words} words) x {a.questions} test questions: index {t_index:.3f} s, scan {t_scan:.2f} s "
        f"({words / t_scan / 1e6:.2f} M words/s); found the {len(planted)} planted questions and nothing else"
    )


if __name__ == "__main__":
    main()
