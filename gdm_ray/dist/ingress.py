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

from gdm_ray.core.errors import ConfigError

__all__ = ["INGRESSES", "ingress_env"]

INGRESSES = ("auto", "haproxy", "proxy")
# A replica behind HAProxy that stops stays reachable this long first, so HAProxy drops it before
# it closes (late arrivals are refused and HAProxy retries elsewhere). Ray's default, 30 s, is
# for remote load balancers; here HAProxy runs on the node and reloads in well under a second,
# and 30 s made every serve.shutdown() take 30 s. $RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S wins.
DRAIN_S = "2"


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
    return "haproxy", {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_BINARY_PATH": binary,
                       "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": drain}  # fmt: skip
