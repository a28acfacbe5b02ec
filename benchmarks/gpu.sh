#!/usr/bin/env bash
# Every GPU check in one call, on a machine with no network (the device machine this project is
# lent: torch, transformers and peft preinstalled, only the working tree travels). Runs from the
# project's tree without installing it (PYTHONPATH=src); pytest comes from the machine, or from
# wheels carried in .gpu-wheels/ (`pip download -d .gpu-wheels pytest` on a machine with a network).
#   1. benchmarks/device_check.py: exactness, speed and memory at SmolLM2-135M and Llama-3-8B shapes
#   2. the `gpu` tests (tests/test_gpu.py, tests/test_projection.py)
#   3. benchmarks/projection_gen.py: projection blocks made by numpy on the CPU and by torch on the GPU
# Writes to $OUT (default runs/device/): device_check.json, pytest.txt, env.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; "$PY" -c "import torch, transformers, peft; print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import pytest" 2>/dev/null && [ -d .gpu-wheels ]; then
  "$PY" -m pip install -q --no-index --find-links .gpu-wheels pytest 2>&1 | tail -2
fi
timeout "${DEVICE_CHECK_TIMEOUT:-420}" "$PY" benchmarks/device_check.py --out "$OUT/device_check.json" --time-budget "${DEVICE_CHECK_BUDGET:-360}" ${DEVICE_CHECK_ARGS:-}
rc_check=$?
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_projection.py ${GPU_TESTS:-} > "$OUT/pytest.txt" 2>&1
rc_tests=$?
# projection-block generation: numpy on the CPU against torch on the GPU, side by side
timeout 120 "$PY" benchmarks/projection_gen.py --proj-dim 8192 --blocks 16 --cuda-blocks 512 > "$OUT/projection_gen.txt" 2>&1
tail -3 "$OUT/projection_gen.txt"
tail -15 "$OUT/pytest.txt"
echo "device_check exit $rc_check, gpu tests exit $rc_tests"
exit $(( rc_check != 0 || rc_tests != 0 ))
