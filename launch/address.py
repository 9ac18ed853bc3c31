"""`host:port` addresses of rendezvous endpoints and clusters, checked before anything waits on them."""
from __future__ import annotations

import socket


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def check_reachable(address: str, *, timeout_s: float, what: str) -> None:
    """Fail in seconds on a dead `host:port`; Ray's own connect waits minutes before it gives up."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as e:
        raise ConnectionError(f"no {what} answers at {host}:{port} ({e.strerror or e}): start one "
                              f"(`bash launch/ci/start_ray.sh` for a local Ray head) or fix the address") from e
