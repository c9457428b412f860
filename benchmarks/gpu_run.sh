#!/usr/bin/env bash
# Everything that needs the GPU machine, in one call (device time is scarce):
#   gpu-tier tests, then the benchmarks, logs and JSON under $OUT.
# Usage on the device machine (repo root, .whl carried): bash benchmarks/gpu_run.sh [1|2|3|tests|fp8|nccl|all]
# Part 1 (tests, then the local, cuda_ipc and scale benchmarks), part 2 (zmq on the host's
# cores) and part 3 (cuda_ipc buffer settings compared) each fit one 10-minute call; part tests
# runs the gpu tier alone, part fp8 the gpu tier then FP8 quantize-on-push against a plain push.
# Part nccl needs 2+ GPUs (nvidia-h200-x2): the broadcast sweep on the Llama-8B shape (bucket
# sizes 64 MiB-1 GiB x num_buffers 1-3, raw broadcast of the same buckets, the whole state in
# one broadcast, one broadcast per tensor) and `refit bench --transport nccl`; run part 1 first
# on the same machine for the gpu tier (it includes the multi-GPU tests).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)" | tee -a "$OUT/gpu.txt"
step() { echo; echo "=== $1"; shift; timeout "$@"; echo "=== rc=$?"; }
part=${1:-all}
if [ "$part" = 1 ] || [ "$part" = all ]; then
step "gpu tests" 420 python3 -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -6
step "refit bench local llama-8b cuda" 100 python3 -m refit.cli bench --transport local --shape llama-8b --device cuda --bucket-bytes 1073741824 --json "$OUT/bench_local.json" 2>&1 | tail -3
step "cuda_ipc llama-8b (4 GiB x 1, baselines a and b, Lazy)" 300 python3 benchmarks/bench_cuda_ipc.py --json "$OUT/bench_cuda_ipc.json" 2>&1 | tail -16
step "scales cuda" 60 python3 benchmarks/bench_scales.py --device cuda --json "$OUT/bench_scales_cuda.json" 2>&1 | tail -10
step "scales cpu (16 cores)" 60 python3 benchmarks/bench_scales.py --device cpu --json "$OUT/bench_scales_cpu16.json" 2>&1 | tail -10
fi
if [ "$part" = 2 ] || [ "$part" = all ]; then
step "zmq 2 GiB (16 cores)" 180 python3 benchmarks/bench_zmq.py --gib 2 --bucket-mib 64 --bucket-mib 256 --json "$OUT/bench_zmq16.json" 2>&1 | tail -6
fi
if [ "$part" = 3 ] || [ "$part" = all ]; then
for cfg in "1 4096" "1 2048" "2 1024" "2 2048"; do set -- $cfg
step "cuda_ipc llama-8b, $1 buffer(s) of $2 MiB" 100 python3 benchmarks/bench_cuda_ipc.py --no-baselines --no-lazy --repeat 8 --num-buffers $1 --bucket-mb $2 --json "$OUT/bench_cuda_ipc_${1}x${2}.json" 2>&1 | grep -E "refit cuda_ipc|stages|ceiling"
done
fi
if [ "$part" = tests ] || [ "$part" = fp8 ]; then
step "gpu tests" 420 python3 -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -12
fi
if [ "$part" = fp8 ] || [ "$part" = all ]; then
step "fp8 quantize-on-push vs plain push, llama-8b" 240 python3 benchmarks/bench_fp8.py --shape llama-8b --device cuda --bucket-mb 1024 --repeat 5 --json "$OUT/bench_fp8.json" 2>&1 | tail -10
fi
if [ "$part" = nccl ] || [ "$part" = all ]; then
step "nccl broadcast sweep, llama-8b" 300 python3 benchmarks/bench_broadcast.py --shape llama-8b --bucket-mb 64 --bucket-mb 256 --bucket-mb 1024 --num-buffers 1 --num-buffers 2 --num-buffers 3 --reps 5 --timeout 60 --json "$OUT/bench_broadcast.json" 2>&1
step "refit bench nccl llama-8b" 120 python3 -m refit.cli bench --transport nccl --shape llama-8b --device cuda --bucket-bytes 1073741824 --json "$OUT/bench_nccl.json" 2>&1 | tail -3
fi
