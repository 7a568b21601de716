"""Which HTTP ingress Ray Serve puts in front of the replicas.

``proxy`` is Serve's default: a Python proxy actor parses each request and
forwards it to a replica over Ray. ``haproxy`` is Serve's HAProxy ingress
(Ray 2.60, ``RAY_SERVE_ENABLE_HA_PROXY``): HAProxy listens on the port and
balances onto replicas that serve HTTP themselves (direct ingress), so no
Python process sits between client and replica. bench/serve measured it
more than twice the proxy's requests per second on 2 cores, at under a third of the p99.
``auto`` takes HAProxy when its binary is installed.

Serve reads these settings from the environment of the processes Ray
starts, so they must be set before this process starts Ray; a cluster joined
with ``ray.address`` keeps the ingress it was started with.
"""

from __future__ import annotations

import os
import shutil
import socket

from gdm_ray.core.errors import ConfigError

__all__ = ["INGRESSES", "ingress_env"]

INGRESSES = ("auto", "haproxy", "proxy")
# A replica behind HAProxy that stops stays reachable this long first, so HAProxy drops it before
# it closes (late arrivals are refused and HAProxy retries elsewhere). Ray's default, 30 s, is
# for remote load balancers; here HAProxy runs on the node and reloads in well under a second,
# and 30 s made every serve.shutdown() take 30 s. $RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S wins.
DRAIN_S = "2"
# HAProxy's own listeners on every interface (Ray's defaults); taken by another Serve on this
# machine, HAProxy would fail to start, so a free port is used instead. A user's setting wins.
SIDE_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}


def _free_or_other(port: int) -> int:
    """``port`` when nothing listens on it, else a free one."""
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return port
        except OSError:
            s.bind(("0.0.0.0", 0))
            return s.getsockname()[1]


def ingress_env(mode: str, haproxy: str | None = None) -> tuple[str, dict[str, str]]:
    """The ingress to use and the environment that selects it: (``haproxy``|``proxy``, env)."""
    if mode not in INGRESSES:
        raise ConfigError(f"ingress={mode!r} must be one of {', '.join(INGRESSES)}")
    binary = haproxy or os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or shutil.which("haproxy")
    if mode == "haproxy" and not binary:
        raise ConfigError("ingress=haproxy: no haproxy binary on PATH (apt-get install haproxy), or use ingress=proxy")
    if mode == "proxy" or not binary:
        return "proxy", {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    drain = os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", DRAIN_S)
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": binary,
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": drain,
    }
    for key, port in SIDE_PORTS.items():
        env[key] = os.environ.get(key) or str(_free_or_other(port))
    return "haproxy", env
