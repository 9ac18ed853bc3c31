#!/bin/bash
# One call on a lent GPU machine: install what is missing, GPU tests, then the kernel benchmark.
# Logs and JSON land in $OUT. Needs the wheels of fla-core, einops, omegaconf, antlr4 (and pytest, if absent
# there) in .whl/.
# TESTS / BENCH_ARGS / TEST_TIMEOUT / BENCH_TIMEOUT override the defaults.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site
wheels=".whl/fla_core-*.whl"
python3 -c "import einops" 2>/dev/null || wheels="$wheels .whl/einops-*.whl"
python3 -c "import pytest" 2>/dev/null || wheels="$wheels .whl/pytest-*.whl .whl/pluggy-*.whl .whl/iniconfig-*.whl"
python3 -c "import packaging" 2>/dev/null || wheels="$wheels .whl/packaging-*.whl"
# nsa_dist's package import reaches the launch code, which needs omegaconf (antlr4 4.9.3: `pip wheel` it)
python3 -c "import omegaconf" 2>/dev/null || wheels="$wheels .whl/omegaconf-*.whl .whl/antlr4_python3_runtime-*.whl"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels
export PYTHONPATH=/tmp/site
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1; then
  # nsa_dist.kernels is the top-level kernels/ folder (setuptools package-dir): mirror that by hand
  mkdir -p /tmp/pp/nsa_dist && cp -r nsa_dist/. /tmp/pp/nsa_dist/
  for d in kernels parallel conf; do ln -sfn "$PWD/$d" "/tmp/pp/nsa_dist/$d"; done
  export PYTHONPATH=/tmp/pp:$PYTHONPATH
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, fla, nsa_dist.kernels.nsa.triton_ops as t; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__)"; } 2>&1 | tee "$OUT/env.txt"
[ -n "${NO_WARM:-}" ] || PYTHONUNBUFFERED=1 timeout 240 python3 tests/gpu/warm_cache.py 2>&1 | tee "$OUT/warm.log"
PYTHONUNBUFFERED=1 timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -x -q --noconftest -p no:cacheprovider \
  ${TESTS:-tests/gpu/test_triton_gpu.py} 2>&1 | tee "$OUT/gpu_tests.log"
PYTHONUNBUFFERED=1 timeout "${BENCH_TIMEOUT:-300}" python3 bench/kernels.py ${BENCH_ARGS:-} --out "$OUT/kernels.json" \
  2>&1 | tee "$OUT/bench.log"
# BASELINE=<a checkout of an older commit, e.g. from `git archive`>: time its per-op breakdown in this same
# call, so before/after numbers come from one card and one run
if [ -n "${BASELINE:-}" ]; then
  mkdir -p /tmp/base/nsa_dist && cp -r "$BASELINE"/nsa_dist/. /tmp/base/nsa_dist/
  for d in kernels parallel conf; do ln -sfn "$PWD/$BASELINE/$d" "/tmp/base/nsa_dist/$d"; done
  ( export PYTHONPATH=/tmp/base:/tmp/site PYTHONUNBUFFERED=1; cd "$BASELINE"
    (cd /tmp && python3 -c "import nsa_dist.kernels.nsa.triton_ops as t; print('baseline from', t.__file__)")
    timeout 120 python3 tests/gpu/warm_cache.py > "$OUT/baseline_warm.log" 2>&1
    timeout "${BASELINE_TIMEOUT:-120}" python3 bench/kernels.py --rows "" ${BASELINE_ARGS:---parts --parts-T 64k} \
      --out "$OUT/baseline.json" ) 2>&1 | tee "$OUT/baseline.log"
fi
