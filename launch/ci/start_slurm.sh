#!/usr/bin/env bash
# A one-node Slurm cluster on 127.0.0.1 for CI and laptops (Debian/Ubuntu, root).
# Idempotent: a cluster this script already started is left running and reused.
# State, spool and logs live under $NSA_SLURM_DIR (default /tmp/nsa_dist_slurm); the config is
# /etc/slurm/slurm.conf so that sbatch/sinfo (and submitit, which calls them) need no SLURM_CONF.
set -euo pipefail

SLURM_DIR=${NSA_SLURM_DIR:-/tmp/nsa_dist_slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by nsa_dist launch/ci/start_slurm.sh"
NODE=$(hostname -s)

log() { echo "start_slurm: $*"; }
die() { echo "start_slurm: error: $*" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    [ "$(id -u)" = 0 ] || die "Slurm or munge is not installed and this is not root: install slurmctld slurmd slurm-client munge"
    log "installing slurmctld slurmd slurm-client munge"
    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
fi
[ "$(id -u)" = 0 ] || die "run as root: slurmd has to start jobs as their submitting user"

# gloo and submitit reach the node by its name, and every test must stay on loopback.
node_ip=$(getent ahostsv4 "$NODE" | awk 'NR==1 {print $1}')
case "$node_ip" in
    127.*) ;;
    *) die "hostname $NODE resolves to '${node_ip:-nothing}', not a loopback address: add '127.0.0.1 $NODE' to /etc/hosts" ;;
esac

if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to replace a real cluster's config"
fi

mkdir -p "$SLURM_DIR"/{state,spool,log}
if ! pgrep -u munge -x munged >/dev/null; then
    [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing: reinstall munge or run mungekey"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    su -s /bin/sh munge -c /usr/sbin/munged
    log "munged started (log /var/log/munge/munged.log)"
fi

cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {m = int($2 / 1024) - 2048; if (m > 20000) m = 20000; print m}' /proc/meminfo)
new_conf=$(cat <<CONFEOF
$MARKER
ClusterName=nsa-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Reject at submission a job that can never run (too many tasks, CPUs, nodes) instead of leaving it pending.
EnforcePartLimits=ALL
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
MpiDefault=none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONFEOF
)
conf_changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
    mkdir -p /etc/slurm
    printf '%s\n' "$new_conf" > "$CONF"
    conf_changed=1
fi

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if pid_alive "$SLURM_DIR/slurmctld.pid"; then
    [ "$conf_changed" = 0 ] || { scontrol reconfigure; log "slurmctld reread $CONF"; }
else
    slurmctld
    log "slurmctld started"
fi
pid_alive "$SLURM_DIR/slurmd.pid" || { slurmd; log "slurmd started"; }

for _ in $(seq 60); do
    state=$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null || true)
    case "$state" in
        idle*|mixed*|allocated*) log "node $NODE is $state (logs in $SLURM_DIR/log, config $CONF)"; exit 0 ;;
        down*|drain*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
die "node $NODE did not become idle in 30 s (state '${state:-unknown}'): see $SLURM_DIR/log/slurmctld.log and slurmd.log"
