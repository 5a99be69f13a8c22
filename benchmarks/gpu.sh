#!/usr/bin/env bash
# Everything that needs a GPU, in one call: batched throughput, the GPU test subset, and the
# sequential vs parallel-in-time crossover. Results and logs go to $OUT (default /tmp/ssmjax-gpu).
#
#   OUT=/tmp/gpu bash benchmarks/gpu.sh
#
# Wheels for packages the GPU machine lacks (dynamax and its needs, beartype for the tests'
# jaxtyping hook) may be put in .whl/; they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ssmjax-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# cpu stays listed: equinox raises the value checks' errors on a GPU through a host callback, which needs a
# CPU device (with JAX_PLATFORMS=cuda alone they surface as 'INTERNAL: CpuCallback error')
export JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import jax, jaxlib, equinox; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'equinox', equinox.__version__, jax.devices())"
  nproc
} 2>&1 | tee "$OUT/env.txt"

echo "== 1. batched throughput (B = 4096, T = 1000)"
timeout "${BATCHED_TIMEOUT:-240}" "$PY" benchmarks/batched.py --device gpu --out "$OUT/batched.json" ${BATCHED_ARGS:-} 2>&1 \
  | grep -v "^WARNING" | tee "$OUT/batched.log"

echo "== 2. tests on the GPU"
timeout "${TESTS_TIMEOUT:-200}" "$PY" -m pytest -q -p no:cacheprovider -n 8 --dist loadfile -rfE --tb=line \
  tests/test_hmm_oracle.py tests/test_lgssm_oracle.py tests/test_hmm_parallel.py tests/test_lgssm_parallel.py \
  tests/test_hmm_gradients.py tests/test_hmm_batched.py tests/test_lgssm_inference.py 2>&1 | tee "$OUT/tests.log" | tail -40

echo "== 3. sequential vs parallel-in-time, one sequence"
[ "${SKIP_PARALLEL:-0}" = 1 ] || timeout "${PARALLEL_TIMEOUT:-120}" "$PY" benchmarks/parallel.py --quick --device gpu --out "$OUT/parallel_gpu.json" 2>&1 \
  | grep -v "^WARNING" | tee "$OUT/parallel.log" | tail -30
date -u
