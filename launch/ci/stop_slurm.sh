#!/usr/bin/env bash
# Stops what start_slurm.sh started: slurmd, slurmctld, then munged. Safe to run when nothing runs.
set -uo pipefail

SLURM_DIR=${NSA_SLURM_DIR:-/tmp/nsa_dist_slurm}
log() { echo "stop_slurm: $*"; }

stop_pidfile() {
    local name=$1 pidfile=$2 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || { log "$name ($pid) stopped"; return 0; }; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null
    log "$name ($pid) killed after 10 s"
}

# Jobs still queued or running would be orphaned by the daemons going away; only on our own cluster.
if grep -qF "# written by nsa_dist launch/ci/start_slurm.sh" /etc/slurm/slurm.conf 2>/dev/null; then
    scancel --user "$(id -un)" >/dev/null 2>&1 || true
fi
stop_pidfile slurmd "$SLURM_DIR/slurmd.pid"
stop_pidfile slurmctld "$SLURM_DIR/slurmctld.pid"
stop_pidfile munged /run/munge/munged.pid
log "done (logs kept in $SLURM_DIR/log)"
