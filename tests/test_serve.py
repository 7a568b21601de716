"""The trigger-sampling endpoint (gdm_ray.distributed.serve) over real HTTP on 127.0.0.1.

One Ray Serve app for the module (Serve's start-up is the slow part); the
`gdm-ray serve` command runs once in a subprocess, before it (one Ray at a time).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gdm_ray.core.data import ImageSet
from gdm_ray.core.ensemble import load_ensemble, save_ensemble
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.mesa import MESA, MESAConfig
from gdm_ray.distributed.serve import ServeSettings, ensemble_id, parse_ensembles

TOKEN = "test-token-123"
MAX_N = 512


def make_ensemble(path: Path, channels: int, trigger: tuple[int, int], with_mask: bool, target: int) -> Path:
    """A real saved ensemble from a 3-step MESA fit of a tiny classifier on random images."""
    g = torch.Generator().manual_seed(target)
    data = ImageSet(torch.rand(64, channels, 16, 16, generator=g), torch.randint(0, 4, (64,), generator=g), list("abcd"))
    with torch.random.fork_rng():
        torch.manual_seed(target)
        model = nn.Sequential(nn.Flatten(), nn.Linear(channels * 16 * 16, 4))
    mesa = MESA(MESAConfig(steps=3, batch_size=8, trigger_size=list(trigger), with_mask=with_mask, eval_samples=16))
    return save_ensemble(mesa, mesa.fit(model, data, target, g), path, source_model_sha256="ab" * 32)


@pytest.fixture(scope="module")
def ensembles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    return {
        "square": make_ensemble(root / "square" / "ensemble", 1, (3, 3), False, 1),
        "shaped": make_ensemble(root / "shaped-ens", 3, (5, 4), True, 2),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(
    port: int,
    method: str,
    path: str,
    body: object = None,
    token: str | None = TOKEN,
    raw: bytes | None = None,
    headers: dict | None = None,
    seen: dict | None = None,
) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    h = {"Content-Type": "application/json", **(headers or {})}
    if token:
        h["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    if seen is not None:
        seen.update(r.getheaders())
    out = (r.status, r.getheader("content-type", ""), r.read())
    conn.close()
    return out


# --- the command, in a subprocess (before the module's Serve app starts) ---------------------------

CLI = [sys.executable, "-m", "gdm_ray.cli.main", "serve"]


def _cli(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("gdm-ray: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Started a local Ray instance" not in proc.stderr  # failed before starting Ray


def test_cli_missing_ensemble_fails_before_ray(tmp_path):
    missing = tmp_path / "no-such-ensemble"
    _one_line(_cli([f"ensembles=[{missing}]"]), str(missing))


def test_cli_bad_inputs(ensembles, tmp_path, capsys):
    from gdm_ray.cli.main import main

    def one_line(args: list[str], *needles: str) -> None:
        code = main(["serve", *args])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("gdm-ray: error:")]
        assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
        assert all(n in lines[0] for n in needles), lines[0]

    import ray

    was_running = ray.is_initialized()
    one_line(["ensembles=[]"], "ensembles=[]")
    a, b = ensembles["square"], tmp_path / "other" / "square"
    b.parent.mkdir()
    b.symlink_to(a.parent)  # a second URI whose default id is "square" too
    one_line([f"ensembles=[{a},{b}]"], "square", "ID=URI")
    one_line([f"ensembles=[{a}]", "max_n=0"], "max_n=0")
    one_line([f"ensembles=[{a}]", "port=70000"], "port=70000")
    with socket.socket() as s:  # a port that is taken
        s.bind(("127.0.0.1", 0))
        s.listen()
        one_line([f"ensembles=[{a}]", f"port={s.getsockname()[1]}"], f"port={s.getsockname()[1]}")
    assert ray.is_initialized() == was_running  # none of them started Ray


def _default_sigint() -> None:
    # a terminal's Ctrl-C, even when this test runs as a background job (which inherits SIGINT ignored)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_serves_until_interrupted(ensembles, stop):
    """`gdm-ray serve` prints its URL and ensembles, answers, and stops cleanly on Ctrl-C (SIGINT)
    and on SIGTERM (kill, systemd, Kubernetes)."""
    port = free_port()
    env = {**os.environ, "GDM_RAY_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [*CLI, f'ensembles=["sq={ensembles["square"]}"]', f"port={port}", "ray.num_cpus=1", "autoscaling=null"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if request(port, "GET", "/healthz", token=None)[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
            assert proc.poll() is None, proc.communicate()[1]
        lines = []
        while not any("Ctrl-C stops" in ln for ln in lines):  # serve.run has returned: the banner is out
            lines.append(proc.stdout.readline())
            assert lines[-1] or proc.poll() is None, proc.communicate()[1]
        assert request(port, "POST", "/v1/sample", {"ensemble": "sq", "n": 3}, token=None)[0] == 401  # token from $GDM_RAY_TOKEN
        status, _, body = request(port, "POST", "/v1/sample", {"ensemble": "sq", "n": 3})
        assert status == 200 and json.loads(body)["n"] == 3
    finally:
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "gdm-ray serve: stopping" in err, err
    out = "".join(lines) + out
    assert f"http://127.0.0.1:{port}" in out and "sq" in out and str(ensembles["square"]) in out


# --- the app, over HTTP ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(ensembles):
    import ray
    from ray import serve

    from gdm_ray.distributed.runtime import RayConfig, init_ray
    from gdm_ray.distributed.serve import build_app

    port = free_port()
    started = init_ray(RayConfig(num_cpus=2))
    args = {
        "ensembles": [str(ensembles["square"]), f"shaped={ensembles['shaped']}"],
        "token": TOKEN,
        "max_n": MAX_N,
        "max_png_n": 100,
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01},
        "autoscaling": None,
    }
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="gdm-ray-test", route_prefix="/")
        yield port
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def sample(port: int, **body) -> dict:
    headers: dict = {}
    status, ctype, raw = request(port, "POST", "/v1/sample", body, seen=headers)
    assert status == 200 and ctype == "application/json", raw
    return {**json.loads(raw), "_batch": int(headers["x-batch-size"])}


def tensors(resp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    n, (c, h, w) = resp["n"], resp["shape"]
    if resp["encoding"] == "base64":
        dec = lambda s, shape: torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype="<f4").copy()).view(*shape)  # noqa: E731
        return dec(resp["patterns"], (n, c, h, w)), dec(resp["alphas"], (n, h, w))
    return torch.tensor(resp["patterns"], dtype=torch.float32), torch.tensor(resp["alphas"], dtype=torch.float32)


def test_health_and_listing(server, ensembles):
    status, _, body = request(server, "GET", "/healthz", token=None)  # health stays open
    assert status == 200 and json.loads(body) == {"status": "ok", "ensembles": 2}
    status, _, body = request(server, "GET", "/v1/ensembles")
    assert status == 200
    listed = {e["id"]: e for e in json.loads(body)["ensembles"]}
    assert set(listed) == {"square", "shaped"}  # "square" derived from .../square/ensemble
    sq, sh = listed["square"], listed["shaped"]
    assert sq["uri"] == str(ensembles["square"]) and sq["target_class"] == 1 and sq["trigger_shape"] == [1, 3, 3]
    assert sh["trigger_shape"] == [3, 5, 4] and sh["with_alpha"] is True and sh["levels"] == 3
    assert sq["with_alpha"] is False and abs(sum(sq["weights"]) - 1) < 1e-5 and sq["source_model_sha256"] == "ab" * 32


def test_seeded_sample_is_in_process_sample(server, ensembles):
    """A seeded request returns exactly Ensemble.sample with that seed, as lists or base64."""
    local = load_ensemble(ensembles["shaped"])
    for seed, n, level in ((7, 33, None), (8, 5, 2)):
        want_p, want_a = local.sample(n, torch.Generator().manual_seed(seed), level)
        for enc in ("lists", "base64"):
            resp = sample(server, ensemble="shaped", n=n, seed=seed, level=level, encoding=enc)
            assert (resp["n"], resp["seed"], resp["level"], resp["shape"]) == (n, seed, level, [3, 5, 4])
            p, a = tensors(resp)
            assert torch.equal(p, want_p) and torch.equal(a, want_a)
            assert p.min() >= 0 and p.max() <= 1 and a.shape == (n, 5, 4)


def test_unseeded_requests_differ_and_report_their_seed(server):
    r1, r2 = sample(server, ensemble="square", n=16), sample(server, ensemble="square", n=16)
    assert r1["seed"] != r2["seed"] and r1["patterns"] != r2["patterns"]
    again = sample(server, ensemble="square", n=16, seed=r1["seed"])
    assert again["patterns"] == r1["patterns"] and again["seed"] == r1["seed"]


def test_concurrent_requests_are_batched_without_changing_results(server, ensembles):
    local = {k: load_ensemble(p) for k, p in ensembles.items()}
    jobs = [("square" if i % 2 else "shaped", [1, 7, 16, 64, 100][i % 5], 100 + i) for i in range(24)]
    with ThreadPoolExecutor(12) as pool:
        resps = list(pool.map(lambda j: sample(server, ensemble=j[0], n=j[1], seed=j[2], encoding="base64"), jobs))
    assert max(r["_batch"] for r in resps) > 1  # some requests did share a batch
    for (eid, n, seed), resp in zip(jobs, resps):
        want_p, want_a = local[eid].sample(n, torch.Generator().manual_seed(seed))
        p, a = tensors(resp)
        assert torch.equal(p, want_p) and torch.equal(a, want_a), (eid, n, seed)


def test_png_grid(server):
    from PIL import Image

    for body, headers in (
        ({"ensemble": "shaped", "n": 10, "seed": 1, "format": "png"}, None),
        ({"ensemble": "square", "n": 9}, {"Accept": "image/png"}),
    ):
        status, ctype, raw = request(server, "POST", "/v1/sample", body, headers=headers)
        assert status == 200 and ctype == "image/png" and raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = Image.open(io.BytesIO(raw))
        assert img.mode == "RGB" and min(img.size) > 32
        assert img.getpixel((0, 0)) == (51, 89, 204)  # the frame that keeps cells apart
        if body["ensemble"] == "square":  # 1-channel triggers are grey: R = G = B inside the first cell
            r, g, b = img.getpixel((6, 6))
            assert r == g == b
    status, _, raw = request(server, "POST", "/v1/sample", {"ensemble": "square", "n": 101, "format": "png"})
    assert status == 422 and "max_png_n=100" in json.loads(raw)["detail"]


def test_auth(server):
    body = {"ensemble": "square", "n": 2}
    for token in (None, "wrong-token"):
        for method, path, b in (("POST", "/v1/sample", body), ("GET", "/v1/ensembles", None)):
            status, _, raw = request(server, method, path, b, token=token)
            assert status == 401 and "bearer token" in json.loads(raw)["detail"]
    status, _, _ = request(server, "POST", "/v1/sample", raw=b"{not json", token=None)
    assert status == 401  # authentication comes before the body is read
    assert request(server, "GET", "/openapi.json", token=None)[0] == 200


@pytest.mark.parametrize(
    "body, status, needles",
    [
        ({"ensemble": "square", "n": 0}, 422, ["n=0", f"1..{MAX_N}"]),
        ({"ensemble": "square", "n": 10**9}, 422, [f"n={10**9}", f"max_n={MAX_N}"]),
        ({"ensemble": "square", "n": -3}, 422, ["n=-3"]),
        ({"ensemble": "nope", "n": 4}, 404, ["'nope'", "square", "shaped"]),
        ({"ensemble": "square", "n": 4, "level": 3}, 422, ["level=3", "0..2"]),
        ({"ensemble": "square", "n": 4, "seed": -1}, 422, ["seed"]),
        ({"ensemble": "square", "n": 4, "seed": 2**70}, 422, ["seed"]),
        ({"ensemble": "square", "n": "many"}, 422, ["n"]),
        ({"ensemble": "square", "n": 4, "format": "gif"}, 422, ["format"]),
        ({"n": 4}, 422, ["ensemble"]),
        (b'{"ensemble": "square", "n": 4', 422, ["JSON"]),
        (b"[1, 2]", 422, ["dictionary"]),
        (b"", 422, ["body"]),
    ],
)
def test_bad_requests_get_4xx_naming_the_problem(server, body, status, needles):
    raw = body if isinstance(body, bytes) else None
    got, ctype, out = request(server, "POST", "/v1/sample", None if raw is not None else body, raw=raw)
    assert got == status and ctype == "application/json", out
    text = out.decode()
    for n in needles:
        assert n in text, text


def test_openapi_docs(server):
    status, _, raw = request(server, "GET", "/openapi.json", token=None)
    spec = json.loads(raw)
    assert {"/v1/sample", "/v1/ensembles", "/healthz"} <= set(spec["paths"])
    assert {"SampleRequest", "SampleResponse", "EnsembleInfo"} <= set(spec["components"]["schemas"])
    assert "image/png" in spec["paths"]["/v1/sample"]["post"]["responses"]["200"]["content"]
    status, ctype, _ = request(server, "GET", "/docs", token=None)
    assert status == 200 and ctype.startswith("text/html")


# --- ids and settings, no Ray ------------------------------------------------------------------------


def test_ensemble_ids():
    assert ensemble_id("runs/fm-fixed/ensemble") == "fm-fixed"
    assert ensemble_id("s3://bucket/zoo/m1/class-3/ensemble/") == "class-3"
    assert ensemble_id("/data/ens-a") == "ens-a"
    assert parse_ensembles(["fm=s3://b/x", "runs/y/ensemble"]) == {"fm": "s3://b/x", "y": "runs/y/ensemble"}
    assert parse_ensembles({"a": "p"}) == {"a": "p"}
    assert parse_ensembles(["x=/odd/a=b"]) == {"x": "/odd/a=b"}  # only the first "=" splits
    with pytest.raises(ConfigError, match="both have the id 'x'"):
        parse_ensembles(["one/x", "two/x/ensemble"])
    with pytest.raises(ConfigError, match="both have the id 'a'"):
        parse_ensembles(["a=p", "a=q"])
    with pytest.raises(ConfigError, match="ensembles=\\[\\]"):
        parse_ensembles([])
    with pytest.raises(ConfigError, match="must match"):
        parse_ensembles(["runs/has space"])


def test_settings_errors():
    ok = {"ensembles": ["p"], "token": None, "token_env": None}
    assert ServeSettings.from_args(ok).deployment_options()["num_replicas"] == 1
    auto = ServeSettings.from_args({**ok, "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}})
    assert auto.deployment_options()["autoscaling_config"]["max_replicas"] == 3
    for bad, match in (
        ({"max_n": 0}, "max_n=0"),
        ({"max_n": 2.5}, "max_n=2.5"),
        ({"colour": 1}, "unknown key"),
        ({"token": ""}, "token"),
        ({"batching": {"max_batch_size": 0}}, "max_batch_size=0"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 1}}, "max_replicas=1"),
    ):
        with pytest.raises(ConfigError, match=match):
            ServeSettings.from_args({**ok, **bad})
