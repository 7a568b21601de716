"""``gdm-ray serve``: the trigger-sampling endpoint (gdm_ray.distributed.serve) on this machine.

Every ensemble is opened (and its hash checked) here first, so a missing
path, a bad S3 prefix or an id collision is one line and a non-zero exit
before Ray starts; then Ray (embedded default, or ray.address) runs the app
on host:port until Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import sys
import time
from typing import Any

from gdm_ray.cli.common import print_table
from gdm_ray.cli.settings import ServeSettings
from gdm_ray.core.errors import ConfigError
from gdm_ray.distributed.runtime import RayConfig, init_ray

__all__ = ["serve", "app_args", "start_ingress"]

# configs/serve.yaml keys that are the app builder's args (the rest place the HTTP server)
_APP_KEYS = ("ensembles", "token", "max_n", "max_png_n", "batching", "autoscaling", "max_ongoing_requests", "access_log")


def app_args(s: ServeSettings) -> dict[str, Any]:
    """build_app's args from the settings: plain values, token resolved here (not re-read from env)."""
    plain = dataclasses.asdict(s)
    args = {k: plain[k] for k in _APP_KEYS}
    args["token_env"] = None
    args["replica_cpus"] = float(s.ray.task_cpus)
    args["store"] = plain["store"]
    return args


def _check_port(host: str, port: Any) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"port={port!r} must be an integer in 1..65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"host={host} port={port}: cannot listen there ({exc.strerror or exc})") from None
    return port


def start_ingress(mode: str, ray_cfg: RayConfig) -> str:
    """Set the environment that picks Serve's HTTP ingress (gdm_ray.distributed.ingress) for
    the Ray this process is about to start; a joined cluster keeps its own."""
    import os

    from gdm_ray.distributed.ingress import ingress_env

    chosen, env = ingress_env(mode)
    if ray_cfg.address or os.environ.get("RAY_ADDRESS"):
        return "the cluster's"
    os.environ.update(env)
    return chosen


def serve(s: ServeSettings) -> dict[str, Any]:
    """Open every ensemble, start Ray and the Serve app on host:port, serve until Ctrl-C or SIGTERM."""
    from gdm_ray.distributed.serve import Sampler, build_app
    from gdm_ray.distributed.serve import ServeSettings as AppSettings

    args = app_args(s)
    app = AppSettings.from_args(args)
    sampler = Sampler(app)  # opens every ensemble: bad URIs fail here, before Ray
    port = _check_port(s.host, s.port)
    route = s.route_prefix or "/"
    if not route.startswith("/"):
        raise ConfigError(f"route_prefix={route!r} must start with '/'")
    ingress = start_ingress(s.ingress or "auto", s.ray)

    import ray
    from ray import serve as ray_serve

    started = init_ray(s.ray)
    try:
        ray_serve.start(http_options={"host": s.host, "port": port}, logging_config={"enable_access_log": app.access_log})
        ray_serve.run(build_app(args), name=s.app_name, route_prefix=route)
        url = f"http://{s.host if ':' not in s.host else f'[{s.host}]'}:{port}{route.rstrip('/')}"
        _print_ready(url, sampler, app, ingress)
        _serve_until_stopped()
    finally:
        try:
            ray_serve.shutdown()
        finally:
            if started:
                ray.shutdown()
    return {"url": url, "ensembles": list(app.ensembles)}


def _print_ready(url: str, sampler: Any, app: Any, ingress: str) -> None:
    print(f"gdm-ray serve: {url}  (POST /v1/sample, GET /v1/ensembles, GET /healthz; docs {url}/docs)")
    print_table(
        [
            (
                d["id"],
                f"{d['uri']}  class {d['target_class']}, trigger {'x'.join(map(str, d['trigger_shape']))}, "
                f"{d['levels']} levels{', transparency mask' if d['with_alpha'] else ''}",
            )
            for d in sampler.describe()
        ]
    )
    auth = "bearer token required on /v1/*" if app.token else "no token (open)"
    print(f"max_n {app.max_n}, {auth}, ingress {ingress}; Ctrl-C stops", flush=True)


def _serve_until_stopped() -> None:
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # SIGTERM (kill, systemd, Kubernetes) stops as Ctrl-C does: Serve and Ray shut down cleanly
    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("gdm-ray serve: stopping", file=sys.stderr)
