#!/usr/bin/env bash
# Every cell of the quality benchmark (issue 22), cheapest first, resumable, committing records.
#
#   benchmarks/quality/run_all.sh                 # all three domains, seeds 0..2, every method
#   SEEDS="0" DOMAINS="arithmetic" benchmarks/quality/run_all.sh
#   THREADS=2 NO_COMMIT=1 benchmarks/quality/run_all.sh
#
# One `ntkselect evaluate` per (seed, domain), seeds outermost so that whole seeds accumulate;
# inside it the methods run in the order below (no selection, then the cheap selectors, then NTK
# and its variants, LESS last), all sharing the seed's warm-up and embeddings. Each finished cell
# is written at once to benchmarks/quality/records/<domain>/<device>-<precision>/ (--records in
# the configs); a rerun, here or on a fresh clone, skips every recorded cell. After each
# invocation the new records are committed (NO_COMMIT=1: not). Nothing else in the tree is
# committed. The tables are rendered at the end: python benchmarks/quality/render.py.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-1}
SEEDS=${SEEDS:-"0 1 2"}
DOMAINS=${DOMAINS:-"arithmetic medical math"}  # cheapest first: short records, then MMLU, then GSM8K
METHODS=${METHODS:-"domain-only,oracle,random,bm25,embedding,tsds,ntk,ntk-vote,ntk-cos,ntk-rr,ntk-max,ntk-whiten,ntk-tsds,ntk-norm,ntk-loss,ntk-diverse,ntk-ensemble,ntk-trace,less"}
GSM8K=${GSM8K:-../shared/data/gsm8k}

for d in $DOMAINS; do  # the data: seconds, and the same bytes every time (its hashes are in the records' fingerprint)
  if [ ! -f "runs/quality-data/$d/pool.jsonl" ]; then
    "$PY" benchmarks/quality/build.py --domain "$d" --gsm8k "$GSM8K" --out "runs/quality-data/$d"
  fi
done

commit() {
  [ -n "${NO_COMMIT:-}" ] && return 0
  git add benchmarks/quality/records
  if ! git diff --cached --quiet -- benchmarks/quality/records; then
    git commit -q -m "quality records: $1" -- benchmarks/quality/records
  fi
}

for s in $SEEDS; do
  for d in $DOMAINS; do
    echo "== seed $s, $d: $METHODS" >&2
    status=0
    PYTHONPATH=src "$PY" -m ntkselect evaluate --config "benchmarks/quality/$d.toml" --methods "$METHODS" --seeds "$s," --threads "$THREADS" || status=$?
    commit "$d, seed $s"
    if [ "$status" -ne 0 ]; then
      echo "run_all: evaluate failed for $d, seed $s (exit $status); the finished cells are recorded, rerun to resume" >&2
      exit "$status"
    fi
  done
done
PYTHONPATH=src "$PY" benchmarks/quality/render.py
