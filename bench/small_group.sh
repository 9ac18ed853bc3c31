#!/usr/bin/env bash
# Selected attention for small GQA groups on one GPU, in one command of under 9 minutes (an H200):
#   1. the card and versions                                              -> $OUT_DIR/env.txt
#   2. the Triton kernels of the tested shapes compiled in parallel       -> $OUT_DIR/warm.log
#   3. the GPU selection tests, G = 1, 2, 4, 7, 8, 16 on each path        -> $OUT_DIR/gpu_tests.log
#   4. bench/kernels.py --shapes: selected attention on rand / blk / trained block ids and the NSA core,
#      against cuDNN and, where $PEERS holds them (../shared/peers/stage.sh), mdy666 and FSA
#                                                                         -> $OUT_DIR/kernels.{log,json}
# With MODE=tune, instead: bench/tune_selection.py at 64k for the small-group shapes, the candidates of the
# tuning table's selection entries                                        -> $OUT_DIR/tune.{log,json}
# Knobs: OUT_DIR (default bench/results/small_group), PEERS (default .peers), SHAPES, SEL_T, SHAPE_T, ROUTING,
# TUNE_SHAPES, and the *_TIMEOUT seconds of each step. Run from anywhere:
#   bash bench/small_group.sh                  # tests + rows, ~8 minutes
#   MODE=tune bash bench/small_group.sh        # the tile sweep, ~6 minutes
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-bench/results/small_group}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PEERS=${PEERS:-.peers}
export PYTHONUNBUFFERED=1
status=0
step() { echo "== $1 ($(date +%T))"; }

step "environment"
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton, nsa_dist; print('torch', torch.__version__, '| triton', triton.__version__, \
'| cuda', torch.version.cuda, '| nsa_dist', nsa_dist.__version__)"
  git rev-parse --short HEAD 2>/dev/null
  [ -d "$PEERS" ] && echo "peers: $PEERS" || echo "peers: none at $PEERS"; } 2>&1 | tee "$OUT_DIR/env.txt"

if [ "${MODE:-}" = tune ]; then
  step "selection tile sweep"
  ( cd bench && timeout "${TUNE_TIMEOUT:-520}" python3 tune_selection.py --shapes "${TUNE_SHAPES:-llama8b,llama1b,qwen7b}" \
      --T 64k --routing trained,rand --budget-s "${TUNE_BUDGET:-470}" --out "$OUT_DIR/tune.json" ) 2>&1 \
    | tee "$OUT_DIR/tune.log"
  exit "${PIPESTATUS[0]}"
fi

step "compile the kernels in parallel"
# the group sizes of the tests (two KV heads) and the model shapes of the rows
timeout "${WARM_TIMEOUT:-150}" python3 tests/gpu/warm_cache.py 2/2/128 4/2/128 8/2/128 14/2/128 16/2/128 32/2/128 \
  32/8/128 32/8/64 28/4/128 64/4/128 2>&1 | tee "$OUT_DIR/warm.log"

step "GPU selection tests"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_triton_gpu.py -k selection 2>&1 \
  | tee "$OUT_DIR/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "bench/kernels.py, model shapes"
peers=()
[ -d "$PEERS" ] && peers=(--peers "$(cd "$PEERS" && pwd)")
timeout "${BENCH_TIMEOUT:-240}" python3 bench/kernels.py --rows "" --shapes "${SHAPES:-llama8b,llama1b,qwen7b,paper}" \
  --sel-T "${SEL_T:-64k}" --shape-T "${SHAPE_T:-64k}" --paper-extra-T "" --routing "${ROUTING:-rand,blk,trained}" \
  --warmup 10 --rep 40 --budget-s "${BENCH_BUDGET:-210}" ${peers[@]+"${peers[@]}"} --out "$OUT_DIR/kernels.json" 2>&1 \
  | tee "$OUT_DIR/kernels.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
