"""`gdm-ray demo`: the main job end to end on the embedded default.

Build a small zoo of Fashion-MNIST models (clean ones and one backdoored),
zoo-scan it on in-process Ray, repair what the scan flags, serve the repair's
trigger ensemble with Ray Serve and fetch samples from it over HTTP, then
print a summary. Everything lands under one results folder (out=).

The zoo has two clean models, not one: with three or more models a zoo-scan
judges each class against the same class in the other models. Judged only
against its own classes, a clean Fashion-MNIST CNN is flagged for its natural
Bag trigger (bench/detect; tried with one clean model: flagged, score 3.9).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

from gdm_ray.cli.attack import attack
from gdm_ray.cli.common import print_table
from gdm_ray.cli.compose import compose_settings
from gdm_ray.cli.settings import AttackSettings, DemoSettings, RunSettings
from gdm_ray.core.errors import GdmRayError
from gdm_ray.store import read_rows
from gdm_ray.store.rundir import default_out, write_json

__all__ = ["demo"]

STEPS = 5  # train the zoo, zoo-scan, repair, serve, summary


def demo(s: DemoSettings) -> dict[str, Any]:
    t0 = time.perf_counter()
    if str(s.out or "").startswith("s3://"):
        raise GdmRayError(f"out={s.out}: the demo writes a local results folder; point zoo-scan or defend at S3 instead")
    base = Path(s.out) if s.out else default_out("demo")
    created = not base.exists()
    try:
        return _steps(s, base, t0)
    except BaseException:
        if created:  # each step publishes atomically; drop the folder of a failed demo whole
            shutil.rmtree(base, ignore_errors=True)
        raise


def _run_keys(s: DemoSettings) -> dict[str, Any]:
    """The demo's run keys (seed, device, ...), handed on to every step."""
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(RunSettings) if f.name != "out"}


def _step(k: int, what: str) -> None:
    print(f"== step {k}/{STEPS}: {what}", flush=True)


def _train_zoo(s: DemoSettings, base: Path) -> tuple[list[str], dict[str, Any]]:
    """Step 1: the clean models and the backdoored one, each with its card, into base/zoo."""
    zoo = base / "zoo"
    models = [(f"clean-{k}", 0.0) for k in range(1, s.zoo.clean + 1)] + [("backdoored", s.attack.rate)]
    cards = {}
    for k, (name, rate) in enumerate(models, start=1):
        _step(1, f"train model {k}/{len(models)} of the zoo ({name})")
        # the attack's own fields of the demo's settings, with this model's seed, rate and folder
        fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(AttackSettings)}
        fields.update(seed=s.seed + k, out=str(base / "models" / name), attack=dataclasses.replace(s.attack, rate=rate))
        a = AttackSettings(**fields)
        cards[name] = attack(a)
        zoo.mkdir(parents=True, exist_ok=True)
        shutil.copy(base / "models" / name / "model.pt", zoo / f"{name}.pt")
        shutil.copy(base / "models" / name / "model.json", zoo / f"{name}.json")  # its card: the real trigger
    return [m for m, _ in models], cards


def _steps(s: DemoSettings, base: Path, t0: float) -> dict[str, Any]:
    from gdm_ray.cli.search import defend
    from gdm_ray.cli.zoo import zoo_scan

    models, cards = _train_zoo(s, base)
    _step(2, f"zoo-scan the {len(models)} models on in-process Ray")
    z = compose_settings(
        "zoo-scan", [f"zoo.path={base / 'zoo'}", f"out={base / 'zoo-scan'}", "use_ray=true", f"dataset={base / 'dataset'}"]
    )
    zoo_scan(dataclasses.replace(z, **_run_keys(s), data=s.data, ray=s.ray, scan=s.scan, full_search=s.zoo.full_search))
    verdicts = {r["model_id"]: r for r in read_rows(base / "zoo-scan" / "verdicts.parquet")}
    repairs: dict[str, dict[str, Any]] = {}
    for m in [m for m in reversed(models) if verdicts[m]["backdoored"]]:
        target = int(verdicts[m]["target_class"])
        _step(3, f"repair {m}.pt: model class {target}'s triggers with MESA, retrain against them")
        d = compose_settings(
            "defend",
            [f"model={base / 'zoo' / f'{m}.pt'}", f"target_class={target}", f"out={base / f'defend-{m}'}", f"dataset={base / 'dataset'}"],
        )
        repairs[m] = defend(dataclasses.replace(d, **_run_keys(s), data=s.data, mesa=s.mesa, defense=s.defense))
    if not repairs:
        print(f"== step 3/{STEPS}: the scan flagged no model; nothing to repair")
    served = None
    if repairs:
        m = next(iter(repairs))
        _step(4, f"serve the ensemble of {m}'s triggers (Ray Serve) and fetch samples over HTTP")
        served = _serve_and_fetch(s, base / f"defend-{m}" / "ensemble", base / "serve", m)
    else:
        print(f"== step 4/{STEPS}: no ensemble to serve")
    _step(5, "summary")
    _summary(base, models, cards, verdicts, repairs, served, t0)
    return {"verdicts": verdicts, "repairs": repairs, "served": served, "out": str(base)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_and_fetch(s: DemoSettings, ensemble: Path, out: Path, name: str) -> dict[str, Any]:
    """Run the Serve app on a free loopback port, POST /v1/sample twice (JSON,
    PNG), write what came back, and stop it."""
    import ray
    from ray import serve

    from gdm_ray.cli.serve import app_args, start_ingress
    from gdm_ray.distributed.runtime import init_ray
    from gdm_ray.distributed.serve import build_app

    port = _free_port()
    served = dataclasses.replace(compose_settings("serve", [f'ensembles=["{name}={ensemble}"]', f"port={port}", "token=null"]), ray=s.ray)
    start_ingress(served.ingress, s.ray)
    started = init_ray(s.ray)
    url = f"http://127.0.0.1:{port}"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_args(served)), name="gdm-ray-demo", route_prefix="/")
        t = time.perf_counter()
        body = _post(f"{url}/v1/sample", {"ensemble": name, "n": 64, "seed": 0})
        json_ms = (time.perf_counter() - t) * 1000
        png = _post(f"{url}/v1/sample", {"ensemble": name, "n": 32, "seed": 0, "format": "png"}, raw=True)
    finally:
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples.png").write_bytes(png)
    write_json(out / "sample.json", body)
    return {
        "url": url,
        "ensemble": name,
        "n": int(body["n"]),
        "shape": body["shape"],
        "ms": round(json_ms, 1),
        "png": str(out / "samples.png"),
    }


def _post(url: str, payload: dict[str, Any], raw: bool = False) -> Any:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        data = r.read()
    return data if raw else json.loads(data)


def _summary(
    base: Path,
    models: list[str],
    cards: dict[str, Any],
    verdicts: dict[str, Any],
    repairs: dict[str, Any],
    served: dict[str, Any] | None,
    t0: float,
) -> None:
    bd = cards["backdoored"]
    names = bd["classes"]
    print(f"  {'model':<11} {'truth':<22} {'verdict':<22} {'score':>6}  {'clean acc':>9}  {'ASR':>7}  {'after repair (acc, ASR)'}")
    for m in models:
        v, c = verdicts[m], cards[m]
        truth = (
            f"class {c.get('target_class', c.get('target'))} ({names[c.get('target_class', c.get('target'))]})"
            if m == "backdoored"
            else "clean"
        )
        verdict = f"class {v['target_class']} ({names[v['target_class']]})" if v["backdoored"] else "clean"
        asr = f"{c['asr']:.2%}" if m == "backdoored" else "-"
        rep = repairs.get(m)
        after = (
            f"{rep['after']['clean_accuracy']:.2%}, {rep['after']['asr']:.2%}"
            if rep and rep["after"].get("asr") is not None
            else (f"{rep['after']['clean_accuracy']:.2%}, -" if rep else "-")
        )
        print(f"  {m:<11} {truth:<22} {verdict:<22} {v['score']:>6.2f}  {c['clean_accuracy']:>9.2%}  {asr:>7}  {after}")
    rows = [
        (
            "trigger",
            f"{bd['trigger']['family']} ({bd['trigger']['placement']} placement) -> class {bd.get('target_class', bd.get('target'))} "
            f"({names[bd.get('target_class', bd.get('target'))]}), poisoning rate {bd['rate']}",
        )
    ]
    if served:
        rows.append(
            (
                "served",
                f"{served['url']}/v1/sample: {served['n']} triggers of {'x'.join(map(str, served['shape']))} "
                f"in {served['ms']:.0f} ms; grid {served['png']}",
            )
        )
    rows += [
        ("tables", f"{base / 'zoo-scan' / 'verdicts.parquet'}, {base / 'zoo-scan' / 'classes.parquet'}"),
        ("dataset", f"{base / 'dataset'}: verdicts, classes, repairs; partitioned by run and model"),
        ("pictures", f"{base / 'zoo-scan' / 'scores.png'}, {base}/*/samples.png"),
        ("seconds", f"{time.perf_counter() - t0:.0f}"),
        ("results", str(base)),
    ]
    print_table(rows)
