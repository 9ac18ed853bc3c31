#!/usr/bin/env bash
# A one-node Ray cluster on 127.0.0.1:$NSA_RAY_PORT (default 6380), dashboard off, every socket on
# loopback. Idempotent: a running head on that port is reused. Run it from the environment that
# trains (the workers use this Python). Logs: $NSA_RAY_DIR/session_latest/logs (default /tmp/nsa_dist_ray).
# What it started (session dir, port, process group) is recorded in $NSA_RAY_DIR/started_head, so that
# stop_ray.sh stops this cluster and no other Ray of the user.
set -euo pipefail

PORT=${NSA_RAY_PORT:-6380}
RAY_DIR=${NSA_RAY_DIR:-/tmp/nsa_dist_ray}
CPUS=${NSA_RAY_CPUS:-$(nproc)}
# Without it Ray takes the node address from the default route (eth0) even with --node-ip-address.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Ray turns token auth on by itself once ~/.ray/auth_token exists (any ray.init() that started a
# private cluster writes one), and then a driver without RAY_AUTH_MODE=token is refused. Choose the
# mode here, so that it does not depend on what ran on this machine before; drivers must match it.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

log() { echo "start_ray: $*"; }
die() { echo "start_ray: error: $*" >&2; exit 1; }

command -v ray >/dev/null || die "ray is not installed in this environment: pip install -e '.[launch]'"

port_open() { python3 -c "import socket,sys; s=socket.socket(); s.settimeout(1); sys.exit(s.connect_ex(('127.0.0.1', $PORT)))"; }

if port_open; then
    ray status --address "127.0.0.1:$PORT" >/dev/null 2>&1 \
        || die "127.0.0.1:$PORT answers but not as a Ray head this environment may use (another program, or a head with another RAY_AUTH_MODE): stop it (launch/ci/stop_ray.sh) or set NSA_RAY_PORT"
    log "Ray head already up at 127.0.0.1:$PORT (logs in $RAY_DIR/session_latest/logs)"
    exit 0
fi

# The dashboard costs seconds and memory that CI does not need; NSA_RAY_DASHBOARD=1 serves it on loopback.
if [ "${NSA_RAY_DASHBOARD:-0}" = 1 ]; then
    dashboard=(--include-dashboard=true --dashboard-host=127.0.0.1)
else
    dashboard=(--include-dashboard=false)
fi

mkdir -p "$RAY_DIR"
if [ "$RAY_AUTH_MODE" = token ]; then
    ray get-auth-token --generate >/dev/null
fi
# Its own session and process group: left in the caller's, stop_ray.sh could not tell the head's
# processes from the shell that started it.
setsid --wait ray start --head --port="$PORT" --node-ip-address=127.0.0.1 --num-cpus="$CPUS" \
    "${dashboard[@]}" --disable-usage-stats --temp-dir="$RAY_DIR" >"$RAY_DIR/start.log" 2>&1 \
    || { cat "$RAY_DIR/start.log" >&2; die "ray start failed (output above, also in $RAY_DIR/start.log)"; }
# Every process of the head (gcs_server, raylet, agents, and the workers raylet forks) shares the
# process group setsid gave `ray start`; the session directory names them among the user's other Ray processes.
session=$(readlink -f "$RAY_DIR/session_latest")
gcs_pid=$(pgrep -u "$(id -u)" -f "gcs_server .*--log_dir=$session/logs" | head -n 1 || true)
[ -n "$gcs_pid" ] || die "ray start returned but no gcs_server of session $session runs: see $RAY_DIR/start.log"
pgid=$(ps -o pgid= -p "$gcs_pid" | tr -d ' ')
printf 'session=%s\nport=%s\npgid=%s\n' "$session" "$PORT" "$pgid" >"$RAY_DIR/started_head"
for _ in $(seq 30); do
    if ray status --address "127.0.0.1:$PORT" >/dev/null 2>&1; then
        log "Ray head up at 127.0.0.1:$PORT with $CPUS CPUs (logs in $RAY_DIR/session_latest/logs)"
        log "drivers need: export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=$RAY_AUTH_MODE RAY_ADDRESS=127.0.0.1:$PORT"
        exit 0
    fi
    sleep 1
done
die "Ray head did not answer on 127.0.0.1:$PORT in 30 s: see $RAY_DIR/start.log"
