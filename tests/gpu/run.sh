#!/usr/bin/env bash
# The GPU checks and benchmarks on any CUDA machine with nsa_dist installed (`pip install -e '.[dev]'`):
#   1. the card and versions,                      -> $OUT_DIR/env.txt
#   2. the Triton kernels compiled in parallel,    -> $OUT_DIR/warm.log      (skip: NO_WARM=1)
#   3. the GPU tests (kernel against reference),   -> $OUT_DIR/gpu_tests.log
#   4. bench/kernels.py,                           -> $OUT_DIR/kernels.{log,json}
#   5. with 2 or more GPUs: the NCCL equivalence tests and bench/sp.py through torchrun
#                                                  -> $OUT_DIR/sp_gpu_tests.log, $OUT_DIR/sp.{log,json}
#   6. with BASELINE=<git commit, or a directory holding that commit's files (git archive)>: its
#      bench/kernels.py and kernels, installed into a scratch directory, timed in the same run so that
#      before/after numbers come from one card
#                                                  -> $OUT_DIR/baseline.{log,json}
# Knobs: OUT_DIR (default bench/results/local), TESTS, BENCH_ARGS, BASELINE_ARGS, SP_ARGS, and the
# *_TIMEOUT seconds of each step. Example, the per-op breakdown at 64k against the previous commit:
#   BASELINE=HEAD~1 BENCH_ARGS="--parts --parts-T 64k" BASELINE_ARGS="--parts --parts-T 64k" bash tests/gpu/run.sh
set -u
cd "$(dirname "$0")/../.."
OUT_DIR=${OUT_DIR:-bench/results/local}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONUNBUFFERED=1
status=0
step() { echo "== $1"; }

step "environment"
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton, nsa_dist; print('torch', torch.__version__, '| triton', triton.__version__, \
'| cuda', torch.version.cuda, '| nsa_dist', nsa_dist.__version__, '| gpus', torch.cuda.device_count())"
  git rev-parse --short HEAD 2>/dev/null; } 2>&1 | tee "$OUT_DIR/env.txt"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
[ "$gpus" -ge 1 ] || { echo "no CUDA device: these checks need a GPU (the CPU tests are: python -m pytest -q tests)"; exit 1; }

if [ -z "${NO_WARM:-}" ]; then
  step "compile the kernels in parallel"
  timeout "${WARM_TIMEOUT:-300}" python3 tests/gpu/warm_cache.py 2>&1 | tee "$OUT_DIR/warm.log"
fi

step "GPU tests"
timeout "${TEST_TIMEOUT:-600}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/gpu/test_triton_gpu.py} 2>&1 \
  | tee "$OUT_DIR/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "bench/kernels.py"
timeout "${BENCH_TIMEOUT:-900}" python3 bench/kernels.py ${BENCH_ARGS:-} --out "$OUT_DIR/kernels.json" 2>&1 \
  | tee "$OUT_DIR/kernels.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ "$gpus" -ge 2 ]; then
  step "NCCL equivalence on $gpus GPUs"
  timeout "${TEST_TIMEOUT:-600}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_parallel_nccl.py 2>&1 \
    | tee "$OUT_DIR/sp_gpu_tests.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  sizes=$(python3 -c "print(','.join(str(p) for p in (1, 2, 4, 8) if p <= $gpus))")
  step "bench/sp.py on $gpus GPUs, P in $sizes"
  timeout "${SP_TIMEOUT:-900}" torchrun --nproc_per_node "$gpus" bench/sp.py --sizes "$sizes" --ring \
    ${SP_ARGS:---tokens 64k,256k,1M --warmup 1 --iters 3} --json "$OUT_DIR/sp.json" 2>&1 | tee "$OUT_DIR/sp.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [ -n "${BASELINE:-}" ]; then
  step "baseline $BASELINE in the same run"
  scratch=$(mktemp -d)
  if [ -d "$BASELINE" ]; then cp -r "$BASELINE" "$scratch/src"
  else git worktree add --detach "$scratch/src" "$BASELINE" > /dev/null; fi
  # A real (non-editable) install maps kernels/ and parallel/ into the package as any user's install does.
  python3 -m pip install -q --no-deps --no-build-isolation --target "$scratch/site" "$scratch/src" \
    > "$OUT_DIR/baseline_pip.log" 2>&1
  ( cd "$scratch/src" && export PYTHONPATH="$scratch/site"
    python3 -c "import nsa_dist.kernels as k; print('baseline kernels from', k.__file__)"
    [ -n "${NO_WARM:-}" ] || timeout "${WARM_TIMEOUT:-300}" python3 tests/gpu/warm_cache.py > /dev/null 2>&1
    timeout "${BENCH_TIMEOUT:-900}" python3 bench/kernels.py ${BASELINE_ARGS:-${BENCH_ARGS:-}} \
      --out "$OUT_DIR/baseline.json" ) 2>&1 | tee "$OUT_DIR/baseline.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  [ -d "$BASELINE" ] || git worktree remove --force "$scratch/src"
  rm -rf "$scratch"
fi
exit $status
