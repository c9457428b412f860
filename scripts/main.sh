#!/usr/bin/env bash
# The main job: install, then a real two-process refit over zmq on this machine (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh zmq
exec .venv/bin/refit demo "$@"
