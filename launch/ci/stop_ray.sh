#!/usr/bin/env bash
# Stops the Ray processes of this user (what start_ray.sh started). Safe when none run. Run it from
# the environment that started Ray, so that `ray` is on PATH.
set -uo pipefail
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

ray_running() { pgrep -u "$(id -u)" -x raylet >/dev/null || pgrep -u "$(id -u)" -x gcs_server >/dev/null; }

if ! ray_running; then
    echo "stop_ray: no Ray processes of $(id -un) running"
    exit 0
fi
if ! command -v ray >/dev/null; then
    echo "stop_ray: error: Ray is running but the ray CLI is not on PATH: activate the environment that started it" >&2
    exit 1
fi
ray stop --grace-period 10 >/dev/null 2>&1 || true
ray_running && ray stop --force >/dev/null 2>&1
if ray_running; then
    echo "stop_ray: error: Ray processes survived 'ray stop --force': $(pgrep -u "$(id -u)" -x -d ' ' 'raylet|gcs_server')" >&2
    exit 1
fi
echo "stop_ray: stopped (logs kept in ${NSA_RAY_DIR:-/tmp/nsa_dist_ray}/session_latest/logs)"
