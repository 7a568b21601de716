"""Serve bench: `POST /v1/sample` over real HTTP on loopback at concurrency 1,
8 and 32, beside the same sampling in this process.

    python bench/serve.py                  # ~3 min on 2 cores; serve's default ingress (auto)
    python bench/serve.py ingress=proxy    # Serve's Python proxy instead (bench/results/serve-proxy.md)
    python bench/serve.py --quick          # smoke run: 1 repeat, fewer requests

Ensembles: two made here by a 3-step MESA fit on random data (sampling cost
does not depend on the weights' values): `fm3x3`, 1x3x3 like the demo's
Fashion-MNIST triggers, and `irregular`, 1x12x9 with an alpha mask like
bench/detect's fixed irregular trigger (4x the floats per trigger).

HTTP: Ray started in this process with num_cpus=2, Serve on 127.0.0.1 with
the app of `gdm-ray serve` (configs/serve.yaml defaults: @serve.batch of 16,
no wait; 1-2 replicas, 1 torch thread each; ingress auto: HAProxy when
installed, else Serve's Python proxy, see gdm_ray/distributed/ingress.py). The load generator
(--client) is wrk when installed (`make wrk`; C, one thread, far less CPU per request than
a Python client, which shares the 2 cores with Serve), else an aiohttp client in this
process. Either way C connections each send their next request when the last answer is in
(closed loop: no open-loop flood), bounded by a duration (wrk) or a request count (aiohttp);
latency is per request, from send to full body read. Each level runs after warm-up
requests; every configuration is repeated --repeats times,
interleaved, and the median is reported.

In-process: `Sampler.sample` (= `Ensemble.sample(n, seeded generator)`) in a
loop on 1 torch thread, alone, and with the JSON encoding the replica does
for the same request (`encode_json`): no HTTP, no Ray, no request parsing.

Floor: a second app on the same Serve instance (/floor), with the Sampler's FastAPI ingress and
deployment options, whose handler returns one stored n=64 answer: the rate of a Serve replica
doing no work, i.e. the most any Serve app can reach on this machine with this client.

Batching: how long one @serve.batch of 32 requests of 64 takes sampled per
request (what the server does) and as one forward over the concatenated
noise, and how many of those 32 came out bit-identical to `Ensemble.sample`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from fastapi import FastAPI, Request, Response  # noqa: E402
from report import markdown_table, write_result  # noqa: E402

from gdm_ray.cli.compose import compose_settings  # noqa: E402
from gdm_ray.cli.serve import app_args  # noqa: E402
from gdm_ray.core.data import ImageSet  # noqa: E402
from gdm_ray.core.ensemble import load_ensemble, save_ensemble  # noqa: E402
from gdm_ray.core.generator import _split_output  # noqa: E402
from gdm_ray.core.mesa import MESA, MESAConfig  # noqa: E402
from gdm_ray.distributed.serve import Job, Sampler, ServeSettings, encode_json  # noqa: E402

WORK = ROOT / "bench" / "work" / "serve"
FLOOR = "(no-op floor)"
CLIENTS = {
    "wrk": "wrk client (C, 1 thread, fixed duration per level)",
    "aiohttp": "aiohttp client in the bench process (fixed number of requests per level)",
}
TARGETS = {"tps": 5000.0, "p99_ms": 50.0, "ratio": 2.0}


def make_ensemble(path: Path, trigger: tuple[int, int], with_mask: bool) -> Path:
    if (path / "manifest.json").is_file():
        return path
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g), [str(i) for i in range(10)])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    mesa = MESA(MESAConfig(steps=3, batch_size=8, trigger_size=list(trigger), with_mask=with_mask, eval_samples=16))
    return save_ensemble(mesa, mesa.fit(model, data, 7, g), path)


def in_process(sampler: Sampler, ens: str, n: int, encode: bool, seconds: float) -> float:
    """Triggers per second of sample() (and encode_json) in a loop for about ``seconds``."""
    count, seed = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        job = Job(ens, n, seed, None)
        p, a = sampler.sample(job)
        if encode:
            encode_json(job, p, a)
        count += 1
        seed += 1
    return count * n / (time.perf_counter() - t0)


async def load(url: str, body: dict, concurrency: int, requests: int, warmup: int) -> dict[str, float]:
    """``requests`` POSTs by ``concurrency`` workers (after ``warmup`` untimed ones); throughput and latency."""
    import aiohttp

    latencies: list[float] = []
    left = [warmup]

    async def worker(session: aiohttp.ClientSession, timed: bool) -> None:
        while left[0] > 0:
            left[0] -= 1
            t = time.perf_counter()
            async with session.post(url, json=body) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
            if timed:
                latencies.append(time.perf_counter() - t)

    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(worker(session, False) for _ in range(concurrency)))
        left[0] = requests
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session, True) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    q = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] * 1e3  # noqa: E731
    return {"rps": len(lat) / wall, "tps": len(lat) * body["n"] / wall, "p50": q(0.50), "p99": q(0.99), "requests": len(lat)}


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[%s]==]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("GDMRAY %%d %%d %%f %%f %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def load_wrk(url: str, body: dict, concurrency: int, seconds: float) -> dict[str, float]:
    """wrk (C, one thread) for ``seconds`` with ``concurrency`` kept-alive connections, each sending
    its next request when the last answer is in (closed loop, as load()); after a 1 s untimed warm-up."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as f:
        f.write(WRK_SCRIPT % json.dumps(body))
        f.flush()
        for d in (1.0, seconds):
            out = subprocess.run(
                ["wrk", "-t1", f"-c{concurrency}", f"-d{d:g}s", "--latency", "-s", f.name, url],
                capture_output=True,
                text=True,
                check=True,
                timeout=d + 60,
            ).stdout
    line = next(x for x in out.splitlines() if x.startswith("GDMRAY "))
    reqs, dur_us, p50_us, p99_us, bad_status, bad_socket = (float(v) for v in line.split()[1:])
    if bad_status or bad_socket:
        raise RuntimeError(f"wrk: {bad_status:.0f} non-2xx answers, {bad_socket:.0f} socket errors on {url}")
    wall = dur_us / 1e6
    return {"rps": reqs / wall, "tps": reqs * body["n"] / wall, "p50": p50_us / 1e3, "p99": p99_us / 1e3, "requests": int(reqs)}


def batching_check(ens_path: Path, k: int = 32, n: int = 64, reps: int = 200) -> dict[str, float]:
    """One batch of k requests: per-request sample() vs one forward over the concatenated noise."""
    ens = load_ensemble(ens_path)
    gens = ens.mesa.generators
    seeds = list(range(k))
    ref = [ens.sample(n, torch.Generator().manual_seed(s)) for s in seeds]

    def concat() -> list[torch.Tensor]:
        levels, zs = [], []
        for s in seeds:  # each request's draws from its own generator, in sample()'s order
            g = torch.Generator().manual_seed(s)
            levels.append(torch.multinomial(ens.mesa.weights, n, replacement=True, generator=g))
            zs.append(torch.randn(n, gens.noise_dim, generator=g))
        z = torch.cat(zs)
        with torch.no_grad():
            pat, alp = _split_output(
                torch.sigmoid(gens.mlp(z.unsqueeze(0).expand(gens.levels, -1, -1).contiguous())),
                gens.channels,
                gens.trigger_size,
                gens.with_mask,
            )
        lv, pick = torch.cat(levels), torch.arange(k * n)
        return list(pat[lv, pick].split(n))

    def per_request() -> None:
        for s in seeds:
            ens.sample(n, torch.Generator().manual_seed(s))

    def timed(fn) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3

    same = sum(torch.equal(a, r[0]) for a, r in zip(concat(), ref))
    close = all(torch.allclose(a, r[0], atol=1e-6) for a, r in zip(concat(), ref))
    return {"per_request_ms": timed(per_request), "concat_ms": timed(concat), "identical": same, "k": k, "close": close}


def floor_app(body: bytes, options: dict):
    """A Serve app with the Sampler's FastAPI ingress and deployment options whose POST handler only
    reads the body and returns ``body`` (a real n=64 response) as it is: no validation, batching,
    sampling or encoding. Its rate is what any Ray Serve replica reaches on this machine with this client."""
    from ray import serve

    floor_api = FastAPI()

    @serve.deployment(name="Floor")
    @serve.ingress(floor_api)
    class Floor:
        async def sample(self, request: Request) -> Response:
            await request.body()
            return Response(body, media_type="application/json")

        # real classes, not this module's postponed strings: the class is pickled by value into the replica
        sample.__annotations__ = {"request": Request, "return": Response}
        sample = floor_api.post("/v1/sample")(sample)

    return Floor.options(**options).bind()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--client",
        choices=("auto", "wrk", "aiohttp"),
        default="auto",
        help="load generator: wrk (C; auto takes it when installed) or aiohttp in this process",
    )
    ap.add_argument("overrides", nargs="*", help="configs/serve.yaml overrides, e.g. batching.batch_wait_timeout_s=0")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    scale = 0.3 if args.quick else 1.0
    torch.set_num_threads(1)
    paths = {"fm3x3": make_ensemble(WORK / "fm3x3", (3, 3), False), "irregular": make_ensemble(WORK / "irregular", (12, 9), True)}

    cfg = compose_settings("serve", ["ensembles=[" + ",".join(f'"{k}={v}"' for k, v in paths.items()) + "]", "token=null", *args.overrides])
    sargs = app_args(cfg)
    st = ServeSettings.from_args(sargs)
    sampler = Sampler(st)

    # (label, ensemble, n, encoding, concurrency, requests)
    levels = [("fm3x3", 64, "lists", c, int(r * scale)) for c, r in ((1, 400), (8, 1500), (32, 2000))]
    levels += [
        ("fm3x3", 64, "base64", 8, int(1500 * scale)),
        ("irregular", 64, "lists", 8, int(1000 * scale)),
        ("irregular", 64, "base64", 8, int(1500 * scale)),
        ("fm3x3", 1024, "lists", 8, int(300 * scale)),
    ]
    # the same n=64 fm3x3 response from a replica that does nothing else: the ceiling of any Serve app here
    levels += [(FLOOR, 64, "lists", c, int(r * scale)) for c, r in ((8, 1500), (32, 2000))]
    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "aiohttp")
    inproc_cases = [("fm3x3", 64), ("irregular", 64), ("fm3x3", 1024)]

    import ray
    from ray import serve

    from gdm_ray.distributed.serve import build_app

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    from gdm_ray.cli.serve import start_ingress
    from gdm_ray.distributed.runtime import RayConfig

    ingress = start_ingress(cfg.ingress, RayConfig())  # before Ray starts: its processes read it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="gdm-ray-bench")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": bool(cfg.access_log)})
    serve.run(build_app(sargs), name="bench", route_prefix="/")
    startup = time.perf_counter() - t0
    job = Job("fm3x3", 64, 0, None)
    serve.run(floor_app(encode_json(job, *sampler.sample(job)), st.deployment_options()), name="floor", route_prefix="/floor")
    urls = {True: f"http://127.0.0.1:{port}/floor/v1/sample", False: f"http://127.0.0.1:{port}/v1/sample"}

    http: dict[tuple, list[dict]] = {lv[:5]: [] for lv in levels}
    inproc: dict[tuple, list[float]] = {(e, n, enc): [] for e, n in inproc_cases for enc in (False, True)}
    try:
        for rep in range(repeats):
            for key in inproc:
                inproc[key].append(in_process(sampler, key[0], key[1], key[2], 1.0 * scale + 0.2))
            for ens, n, enc, conc, reqs in levels:
                floor = ens == FLOOR
                body = {"ensemble": "fm3x3" if floor else ens, "n": n, "encoding": enc}
                if client == "wrk":  # about as long as aiohttp takes for the same number of requests
                    res = load_wrk(urls[floor], body, conc, seconds=max(2.0, 3.0 * scale))
                else:
                    res = asyncio.run(load(urls[floor], body, conc, reqs, warmup=max(conc, 20)))
                http[(ens, n, enc, conc, reqs)].append(res)
                print(
                    f"repeat {rep + 1}/{repeats}: {ens} n={n} {enc} c={conc}: {res['tps']:.0f} triggers/s, "
                    f"p50 {res['p50']:.1f} ms, p99 {res['p99']:.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        load_after = os.getloadavg()[0]
        serve.shutdown()
        ray.shutdown()

    med = lambda xs: statistics.median(xs)  # noqa: E731
    ip = {k: med(v) for k, v in inproc.items()}
    rows, checks = [], []
    for (ens, n, enc, conc, _reqs), runs in http.items():
        tps, rps = med([r["tps"] for r in runs]), med([r["rps"] for r in runs])
        p50, p99 = med([r["p50"] for r in runs]), med([r["p99"] for r in runs])
        ref = ip[("fm3x3" if ens == FLOOR else ens, n, True)]
        rows.append(
            [
                ens,
                n,
                enc,
                conc,
                f"{med([r['requests'] for r in runs]):,.0f}",
                f"{tps:,.0f}",
                f"{rps:,.0f}",
                f"{p50:.1f}",
                f"{p99:.1f}",
                f"{ref / tps:.1f}x",
                ", ".join(f"{r['tps']:,.0f}" for r in runs),
            ]
        )
        if (ens, n, enc) == ("fm3x3", 64, "lists"):
            if conc == 8:
                checks.append((p99 <= TARGETS["p99_ms"], f"p99 at concurrency 8, n=64: {p99:.1f} ms (target <= 50 ms)"))
            if conc == 32:
                checks.append((tps >= TARGETS["tps"], f"throughput at n=64, concurrency 32: {tps:,.0f} triggers/s (target >= 5,000)"))
    top = max(med([r["tps"] for r in runs]) for (e, n, enc, c, _), runs in http.items() if (e, n, enc) == ("fm3x3", 64, "lists"))
    ceiling = max(med([r["tps"] for r in runs]) for (e, *_), runs in http.items() if e == FLOOR)
    ratio_raw, ratio_enc = ip[("fm3x3", 64, False)] / top, ip[("fm3x3", 64, True)] / top
    checks.append(
        (
            ratio_raw <= TARGETS["ratio"],
            f"HTTP within 2x of in-process sample() at n=64: in-process {ip[('fm3x3', 64, False)]:,.0f} "
            f"triggers/s is {ratio_raw:.1f}x the best HTTP {top:,.0f} (with JSON encoding in process: {ratio_enc:.1f}x). "
            f"A Serve replica that only returns a stored n=64 answer (the {FLOOR} rows) reached {ceiling:,.0f}: "
            f"{ip[('fm3x3', 64, False)] / ceiling:.1f}x below in-process sample() with no sampling at all",
        )
    )

    inrows = [
        [e, n, f"{ip[(e, n, False)]:,.0f}", f"{ip[(e, n, True)]:,.0f}", ", ".join(f"{v:,.0f}" for v in inproc[(e, n, True)])]
        for e, n in inproc_cases
    ]
    b = batching_check(paths["fm3x3"])
    body = "\n".join(
        [
            f"HTTP: `POST /v1/sample` on 127.0.0.1 (Ray Serve, ingress **{ingress}** (`ingress={cfg.ingress}`); "
            f"replicas {st.autoscaling or 'fixed: 1'}; @serve.batch "
            f"{st.max_batch_size} / {st.batch_wait_timeout_s * 1e3:g} ms; access log {'on' if st.access_log else 'off'}; "
            f"{CLIENTS[client]} on the same machine), median of {repeats} interleaved repeats; "
            f"Ray + Serve start-up {startup:.1f} s (not timed below). "
            "`x in-proc` = in-process sample()+JSON triggers/s over HTTP triggers/s for the same ensemble and n. "
            f"`{FLOOR}`: a Serve app with the same FastAPI ingress and deployment options whose handler returns a stored "
            "n=64 fm3x3 answer without validating, batching, sampling or encoding (bench/serve.py `floor_app`). "
            f"Machine load (1-min load average) {load_before:.1f} before and {load_after:.1f} after the HTTP runs, on "
            f"{os.cpu_count()} cores: other jobs shared the CPUs, so latencies are upper bounds for an idle machine.",
            "",
            markdown_table(
                [
                    "ensemble",
                    "n",
                    "encoding",
                    "concurrency",
                    "requests",
                    "triggers/s",
                    "req/s",
                    "p50 ms",
                    "p99 ms",
                    "x in-proc",
                    "runs (triggers/s)",
                ],
                rows,
            ),
            "",
            "In-process, same run (1 torch thread; `sample()` = `Ensemble.sample(n, seeded generator)`; `+ JSON` adds the "
            "replica's `encode_json` of the same response, nested lists):",
            "",
            markdown_table(["ensemble", "n", "sample() triggers/s", "sample() + JSON triggers/s", "runs (+ JSON)"], inrows),
            "",
            f"Batching (fm3x3, one batch of {b['k']} requests of 64): sampled per request {b['per_request_ms']:.2f} ms, "
            f"one forward over the concatenated noise {b['concat_ms']:.2f} ms; concatenated outputs bit-identical to "
            f"`Ensemble.sample` for {b['identical']}/{b['k']} requests (all within 1e-6: {'yes' if b['close'] else 'no'}).",
            "",
            "\n".join(f"- {'met' if ok else 'NOT MET'}: {text}" for ok, text in checks),
        ]
    )
    name = "serve" + ("" if str(cfg.ingress) == "auto" else f"-{cfg.ingress}") + ("-quick" if args.quick else "")
    path = write_result(name, f"Serve: trigger sampling over HTTP ({ingress} ingress) vs in process", body)
    print(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
