"""Serve's HTTP ingress: the choice (gdm_ray.distributed.ingress) and the HAProxy
ingress answering real HTTP requests (skipped, saying so, without haproxy)."""

from __future__ import annotations

import http.client
import json
import shutil
import socket

import pytest

from gdm_ray.core.errors import ConfigError
from gdm_ray.distributed import ingress
from gdm_ray.distributed.ingress import ingress_env


def test_ingress_choice(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    fake = tmp_path / "haproxy"
    fake.write_text("#!/bin/sh\n")
    for key in ("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        monkeypatch.delenv(key, raising=False)
    chosen, env = ingress_env("auto", str(fake))
    assert chosen == "haproxy" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(fake)
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "30")  # the user's setting wins
    assert ingress_env("auto", str(fake))[1]["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"
    assert ingress_env("proxy", str(fake))[0] == "proxy"
    # HAProxy's stats and metrics ports: Ray's defaults when free, another free port when taken (another Serve here)
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        monkeypatch.setitem(ingress.SIDE_PORTS, "RAY_SERVE_HAPROXY_STATS_PORT", taken)
        port = int(ingress_env("auto", str(fake))[1]["RAY_SERVE_HAPROXY_STATS_PORT"])
        assert port != taken and port > 0
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", "9999")
    assert ingress_env("auto", str(fake))[1]["RAY_SERVE_HAPROXY_METRICS_PORT"] == "9999"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert ingress_env("auto") == ("proxy", {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"})
    with pytest.raises(ConfigError, match="ingress=haproxy: no haproxy binary"):
        ingress_env("haproxy")
    with pytest.raises(ConfigError, match="ingress='nginx' must be one of auto, haproxy, proxy"):
        ingress_env("nginx")


def _call(port: int, method: str, path: str, body: object = None, token: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers)
    r = conn.getresponse()
    out = (r.status, r.read())
    conn.close()
    return out


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="no haproxy binary (apt-get install haproxy): HAProxy ingress not tested")
def test_haproxy_ingress_serves_real_http(synthetic_splits, tmp_path, monkeypatch):
    import ray
    import torch
    from ray import serve

    from gdm_ray.core.ensemble import load_ensemble, save_ensemble
    from gdm_ray.core.mesa import MESA, MESAConfig
    from gdm_ray.distributed.runtime import RayConfig, init_ray
    from gdm_ray.distributed.serve import build_app

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 4))
    mesa = MESA(MESAConfig(steps=3, batch_size=8, trigger_size=[3, 3], eval_samples=16))
    path = save_ensemble(mesa, mesa.fit(model, synthetic_splits.defense, 1, g), tmp_path / "ens")
    # another Serve's HAProxy holds the default stats port: this HAProxy must start on another
    squatter = socket.socket()
    try:
        squatter.bind(("0.0.0.0", ingress.SIDE_PORTS["RAY_SERVE_HAPROXY_STATS_PORT"]))
        squatter.listen()
    except OSError:
        pass  # already taken: the same case
    for key in ingress.SIDE_PORTS:
        monkeypatch.delenv(key, raising=False)
    env = ingress_env("haproxy")[1]
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] != str(ingress.SIDE_PORTS["RAY_SERVE_HAPROXY_STATS_PORT"])
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # before Ray starts: its processes read it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = init_ray(RayConfig(num_cpus=2))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"ensembles": [f"e={path}"], "token": "t0k", "autoscaling": None}), name="ingress", route_prefix="/")
        status, raw = _call(port, "POST", "/v1/sample", {"ensemble": "e", "n": 8, "seed": 3}, token="t0k")
        assert status == 200, raw
        want, _ = load_ensemble(path).sample(8, torch.Generator().manual_seed(3))
        assert torch.equal(torch.tensor(json.loads(raw)["patterns"]), want)
        assert _call(port, "POST", "/v1/sample", {"ensemble": "e", "n": 8})[0] == 401
        assert _call(port, "POST", "/v1/sample", {"ensemble": "e", "n": 0}, token="t0k")[0] == 422
        assert _call(port, "GET", "/healthz")[0] == 200
        if shutil.which("ss"):  # the port is HAProxy's, not Serve's Python proxy
            import subprocess

            lines = [
                ln
                for ln in subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout.splitlines()
                if f"127.0.0.1:{port} " in ln
            ]
            assert lines and all("haproxy" in ln for ln in lines), lines
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
        squatter.close()
