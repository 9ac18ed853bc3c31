#!/usr/bin/env bash
# Runs one job whose ranks are Ray actors, on the cluster at RAY_ADDRESS (or a private Ray on this
# machine when it is unset), through the one entry point, nsa_dist.train.
#   RAY_ADDRESS=127.0.0.1:6380 bash launch/ray.sh launcher.num_workers=2
#   RAY_ADDRESS=head:6379 bash launch/ray.sh launcher.num_workers=16 launcher.loopback=false model=base
#   RAY_ADDRESS=127.0.0.1:6380 bash launch/ray.sh -m trainer.lr=1e-3,3e-3    sweep, each job on the cluster
# Extra arguments are Hydra overrides.
set -euo pipefail

case " $* " in
    *" launcher.loopback=false "*) ;;
    # Ray otherwise advertises this machine by its default-route address, even for a local cluster.
    *) export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0} ;;
esac

exec python -m nsa_dist.train launcher=ray "$@"
