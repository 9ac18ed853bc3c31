#!/usr/bin/env bash
# Stops the Ray processes of this machine's user (what start_ray.sh started). Safe when none run.
set -uo pipefail
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
if command -v ray >/dev/null; then
    ray stop --grace-period 10 >/dev/null 2>&1 || ray stop --force >/dev/null 2>&1
fi
echo "stop_ray: done (logs kept in ${NSA_RAY_DIR:-/tmp/nsa_dist_ray}/session_latest/logs)"
