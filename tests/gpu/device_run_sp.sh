#!/bin/bash
# One call on a lent multi-GPU machine: the sequence-parallel checks and benchmark of issue 4.
#   NCCL equivalence (tests/gpu/test_parallel_nccl.py: P = 2 and, with 4 GPUs, P = 4), then bench/sp.py
#   through torchrun on every GPU of the machine. Logs and JSON land in $OUT.
# Needs the wheels of omegaconf and antlr4 (and einops) in .whl/: the package import reaches the launch
# code, and the image lacks them. tests/conftest.py imports hydra, which the image lacks too, so pytest
# runs with --noconftest.
# SP_TOKENS / SP_SIZES / SP_ARGS / TEST_TIMEOUT / BENCH_TIMEOUT override the defaults; DEVICE=cpu runs a
# small smoke version on this machine's CPU (gloo, 2 processes) to check the script itself.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site
wheels=""
python3 -c "import einops" 2>/dev/null || wheels="$wheels .whl/einops-*.whl"
python3 -c "import omegaconf" 2>/dev/null || wheels="$wheels .whl/omegaconf-*.whl .whl/antlr4_python3_runtime-*.whl"
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import nsa_dist" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1
if [ "${DEVICE:-cuda}" = cpu ]; then
  nproc=2
  defaults="--device cpu --hidden 64 --heads 4 --kv-heads 2 --head-dim 16 --window 64"
  tokens=${SP_TOKENS:-2k}
else
  nproc=$(python3 -c "import torch; print(torch.cuda.device_count())")
  { nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c "import torch; print('torch', torch.__version__)"; } \
    2>&1 | tee "$OUT/env.txt"
  defaults="--warmup 1 --iters 3"
  tokens=${SP_TOKENS:-64k,256k,1M}
  PYTHONUNBUFFERED=1 timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q --noconftest -p no:cacheprovider \
    tests/gpu/test_parallel_nccl.py 2>&1 | tee "$OUT/sp_gpu_tests.log"
fi
sizes=${SP_SIZES:-$(python3 -c "print(','.join(str(p) for p in (1, 2, 4, 8) if p <= $nproc))")}
PYTHONUNBUFFERED=1 timeout "${BENCH_TIMEOUT:-420}" torchrun --nproc_per_node "$nproc" bench/sp.py --tokens "$tokens" \
  --sizes "$sizes" --ring $defaults ${SP_ARGS:-} --json "$OUT/sp.json" 2>&1 | grep -v "OMP_NUM_THREADS\|^W[0-9]" \
  | tee "$OUT/sp.log"
