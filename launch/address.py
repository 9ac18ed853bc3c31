"""`host:port` addresses of rendezvous endpoints and clusters, checked before anything waits on them."""
from __future__ import annotations

import socket
import time

# A gRPC server (Ray's GCS is one) answers an HTTP/2 client preface with its own SETTINGS frame.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS_FRAME = 0x4


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


def check_ray_head(address: str, *, timeout_s: float) -> None:
    """Fail within `timeout_s` unless a gRPC server (as a Ray head's GCS port is) answers at `address`:
    `ray.init` waits minutes on a port held by anything else."""
    check_reachable(address, timeout_s=timeout_s, what="Ray cluster")
    host, port = split_address(address)
    fix = ("is this the port of `ray start --head --port=...`? (`bash launch/ci/start_ray.sh` starts one on "
           "127.0.0.1:6380)")
    deadline = time.monotonic() + timeout_s
    reply = b""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.sendall(_HTTP2_PREFACE)
            while len(reply) < 9:
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = conn.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
    except socket.timeout:
        pass
    except OSError as e:
        raise ConnectionError(f"{host}:{port} accepted a connection and then failed ({e.strerror or e}): not a Ray "
                              f"cluster; {fix}") from e
    if len(reply) < 9 or reply[3] != _SETTINGS_FRAME:
        seen = f"replied {reply[:16]!r}" if reply else f"sent nothing in {timeout_s:g} s"
        raise ConnectionError(f"{host}:{port} answers but not as a Ray cluster (it {seen}, not gRPC); {fix}")
