#!/usr/bin/env bash
# Starts this node's ranks with torchrun and the one entry point, nsa_dist.train.
#   one node:   NPROC=4 bash launch/torchrun.sh model=small
#   two nodes:  on each node  NNODES=2 NPROC=8 RDZV=node0:29500 RUN_ID=exp1 bash launch/torchrun.sh model=base
# Extra arguments are Hydra overrides. Rank 0 writes TensorBoard and weights under hydra.run.dir.
set -euo pipefail

NNODES=${NNODES:-1}
NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count() or 2)")}
RUN_ID=${RUN_ID:-nsa_$(date +%Y%m%d_%H%M%S)}
# One node rendezvouses on loopback with a free port; several need an address all of them reach.
RDZV=${RDZV:-127.0.0.1:0}

overrides=("$@")
case " $* " in
    *" hydra.run.dir="*) ;;
    # Every rank runs Hydra; a shared directory keeps them from each stamping their own time.
    *) overrides+=("hydra.run.dir=outputs/torchrun/$RUN_ID") ;;
esac

exec torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC" --rdzv-backend=c10d --rdzv-endpoint="$RDZV" \
    --rdzv-id="$RUN_ID" -m nsa_dist.train launcher=torchrun "${overrides[@]}"
