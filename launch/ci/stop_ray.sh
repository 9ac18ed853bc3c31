#!/usr/bin/env bash
# Stops the Ray head that start_ray.sh started, and nothing else: the process group recorded in
# $NSA_RAY_DIR/started_head, after checking that it still belongs to the recorded session (a reused
# group id is left alone). Other Ray clusters of the user keep running. Safe when nothing runs.
set -uo pipefail

RAY_DIR=${NSA_RAY_DIR:-/tmp/nsa_dist_ray}
RECORD=$RAY_DIR/started_head
log() { echo "stop_ray: $*"; }

if [ ! -s "$RECORD" ]; then
    log "no head started by start_ray.sh is recorded ($RECORD): nothing to stop"
    exit 0
fi
session=$(sed -n 's/^session=//p' "$RECORD")
pgid=$(sed -n 's/^pgid=//p' "$RECORD")
port=$(sed -n 's/^port=//p' "$RECORD")

# Members of the group that still run (a zombie waits for a parent that may never reap it).
live_members() {
    local pid
    for pid in $(pgrep -g "$pgid" 2>/dev/null); do
        [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ] || echo "$pid"
    done
}
group_alive() { [ -n "$(live_members)" ]; }
ours() { pgrep -g "$pgid" -f -- "$session" >/dev/null 2>&1; }

if [ -z "$pgid" ] || [ "$pgid" = "$(ps -o pgid= -p $$ | tr -d ' ')" ] || ! group_alive || ! ours; then
    log "the head of session $session (port $port) is not running"
    rm -f "$RECORD"
    exit 0
fi
kill -TERM -- "-$pgid" 2>/dev/null
for _ in $(seq 50); do
    group_alive || break
    sleep 0.2
done
if group_alive; then
    kill -KILL -- "-$pgid" 2>/dev/null
    sleep 0.5
fi
if group_alive; then
    echo "stop_ray: error: processes of group $pgid survived SIGKILL: $(live_members | tr '\n' ' ')" >&2
    exit 1
fi
rm -f "$RECORD"
log "stopped the head on 127.0.0.1:$port (process group $pgid; logs kept in $session/logs)"
