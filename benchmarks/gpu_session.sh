#!/usr/bin/env bash
# One device call that proves the GPU path (run by the `device` tool from the repo root):
#   1. benchmarks/gpu_e2e.py: greedy vs transformers per architecture / dtype / backend, CUDA graphs
#   2. the lesson notebooks (solutions, then labs) under nbval on the GPU
#   3. engine tests on the GPU (device="auto" picks CUDA, so the Triton backend and graphs)
# Jupyter packages the image lacks travel as wheels in .whl/ (see the device README).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout "${E2E_S:-200}" python3 benchmarks/gpu_e2e.py 2>&1 | tee "$OUT/gpu_e2e.log"
timeout "${NB_S:-240}" python3 -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
  --nbval-cell-timeout=90 --durations=20 ${NOTEBOOKS:-solutions labs} 2>&1 | tee "$OUT/notebooks_gpu.log"
[ "${TESTS_S:-120}" = 0 ] || timeout "${TESTS_S:-120}" python3 -m pytest -q -p no:cacheprovider -x --durations=5 \
  tests/test_engine_vs_hf.py tests/test_lesson_code.py 2>&1 | tee "$OUT/tests_gpu.log"
