"""Results and artifacts on S3, against a real S3-protocol server (moto in
server mode on 127.0.0.1, IAM authentication on), over HTTP."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PINNED_MESA, SCAN_DATA, finished_trials

from gdm_ray.cli.main import main
from gdm_ray.core.ensemble import EnsembleError, load_ensemble
from gdm_ray.store import read_dataset, read_rows, write_rows
from gdm_ray.store.artifacts import open_ensemble, publish_ensemble
from gdm_ray.store.parquet import read_results, write_table
from gdm_ray.store.rundir import RunDir
from gdm_ray.store.s3 import S3, StoreError

FAST = [
    *SCAN_DATA,
    "scan.steps=150",
    *PINNED_MESA,
    "mesa.steps=100",
    "mesa.eval_samples=128",
    "samples_per_level=4",
]


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("gdm-ray: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def arrow_fs(server):
    """pyarrow's own S3 client (not ours) for reading back what gdm-ray wrote."""
    from pyarrow import fs

    return fs.S3FileSystem(
        access_key=server.access_key_id,
        secret_key=server.secret_access_key,
        region="us-east-1",
        endpoint_override=server.endpoint.removeprefix("http://"),
        scheme="http",
    )


def test_rows_round_trip_and_read_by_pyarrow(s3_server, bucket):
    store = s3_server.store()
    uri = f"s3://{bucket}/runs/a/verdicts.parquet"
    write_rows(uri, [{"model_id": "m1", "score": 1.5}, {"model_id": "m2", "score": None}], store=store)
    assert read_rows(uri, store) == [
        {"schema_version": 1, "model_id": "m1", "score": 1.5},
        {"schema_version": 1, "model_id": "m2", "score": None},
    ]
    table = pq.read_table(f"{bucket}/runs/a/verdicts.parquet", filesystem=arrow_fs(s3_server))
    assert table.column("model_id").to_pylist() == ["m1", "m2"]
    write_rows(f"s3://{bucket}/runs/b/verdicts.parquet", [{"model_id": "m3", "score": 0.1}], store=store)
    both = read_results(f"s3://{bucket}/runs", store=store)
    assert sorted(zip(both.column("run").to_pylist(), both.column("model_id").to_pylist())) == [("a", "m1"), ("a", "m2"), ("b", "m3")]


def test_zoo_scan_reads_models_from_and_writes_results_to_s3(s3_server, bucket, models, capsys):
    s3 = S3(s3_server.store())
    for name, key in (("backdoored", "vendor-a.pt"), ("clean", "vendor-b.pt")):
        s3.put_file(f"s3://{bucket}/zoo/{key}", models[name])
    s3.put_bytes(f"s3://{bucket}/zoo/broken.pt", b"PK\x03\x04 not TorchScript")
    out = f"s3://{bucket}/results/zs1"
    code = main(
        [
            "zoo-scan",
            f"zoo.path=s3://{bucket}/zoo",
            *FAST,
            "use_ray=false",
            f"out={out}",
            f"dataset=s3://{bucket}/dataset",
            *s3_server.overrides(),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert f"wrote {out}" in capsys.readouterr().out
    fs = arrow_fs(s3_server)
    verdicts = pq.read_table(f"{bucket}/results/zs1/verdicts.parquet", filesystem=fs).to_pylist()
    by_id = {r["model_id"]: r for r in verdicts}
    assert set(by_id) == {"vendor-a", "vendor-b", "broken"}
    assert by_id["vendor-a"]["backdoored"] and by_id["vendor-a"]["target_class"] == 2
    assert not by_id["vendor-b"]["backdoored"]
    assert by_id["broken"]["error"] and by_id["broken"]["backdoored"] is None
    assert all(r["config_hash"] and r["code_version"] and r["schema_version"] == 1 for r in verdicts)
    classes = pq.read_table(f"{bucket}/results/zs1/classes.parquet", filesystem=fs)
    assert classes.num_rows == 2 * 8
    keys = s3.list(out)
    assert f"{out}/scores.png" in keys and f"{out}/zoo.json" in keys
    assert not any(k.endswith(".tmp") or ".partial" in k for k in keys)
    # the credentials never land in the outputs
    assert s3_server.secret_access_key not in s3.get_bytes(f"{out}/zoo.json").decode()
    # the dataset, as another tool reads it: pyarrow's S3 client and Hive partitioning
    import pyarrow.dataset as pads

    view = pads.dataset(f"{bucket}/dataset/verdicts", filesystem=fs, format="parquet", partitioning="hive").to_table()
    assert sorted(zip(view.column("run").to_pylist(), view.column("model").to_pylist())) == [
        ("zs1", "broken"),
        ("zs1", "vendor-a"),
        ("zs1", "vendor-b"),
    ]
    assert read_dataset(f"s3://{bucket}/dataset", "classes", s3_server.store(), model="vendor-a").num_rows == 8


@pytest.fixture(scope="module")
def searched(s3_server, models) -> str:
    """`gdm-ray search out=s3://...`: the run folder (its ensemble/ on S3)."""
    s3_server.client().create_bucket(Bucket="searched")
    out = "s3://searched/search-1"
    args = [
        "search",
        f"model={models['backdoored']}",
        "target_class=2",
        *SCAN_DATA,
        *PINNED_MESA,
        "mesa.steps=60",
        "mesa.eval_samples=128",
        f"out={out}",
        *s3_server.overrides(),
    ]
    assert main(args) == 0
    return out


def test_ensemble_saved_to_and_loaded_from_s3(s3_server, bucket, searched):
    out = searched
    store = s3_server.store()
    ens = open_ensemble(f"{out}/ensemble", store)
    assert ens.target_class == 2
    patterns, alphas = ens.sample(5)
    assert patterns.shape[0] == 5 and alphas.shape[0] == 5
    # a corrupted weights object is refused, naming the S3 URI
    s3 = S3(store)
    blob = bytearray(s3.get_bytes(f"{out}/ensemble/generators.safetensors"))
    blob[-1] ^= 0xFF
    s3.put_bytes(f"s3://{bucket}/bad/ensemble/generators.safetensors", bytes(blob))
    s3.put_bytes(f"s3://{bucket}/bad/ensemble/manifest.json", s3.get_bytes(f"{out}/ensemble/manifest.json"))
    with pytest.raises(EnsembleError, match=f"s3://{bucket}/bad/ensemble.*sha256"):
        open_ensemble(f"s3://{bucket}/bad/ensemble", store)
    with pytest.raises(EnsembleError, match="no manifest.json"):
        open_ensemble(f"s3://{bucket}/nothing-here", store)
    # a local ensemble directory published to S3 (manifest last) loads back the same
    from gdm_ray.store.fetch import localize

    local = localize(f"{out}/ensemble", store)
    assert (local / "manifest.json").is_file()
    publish_ensemble(local, f"s3://{bucket}/copy/ensemble", store)
    assert open_ensemble(f"s3://{bucket}/copy/ensemble", store).manifest == load_ensemble(local).manifest


def test_endpoint_dying_mid_write_leaves_the_previous_object(s3_server, bucket):
    from s3server import Relay

    store = s3_server.store()
    uri = f"s3://{bucket}/t/verdicts.parquet"
    write_rows(uri, [{"model_id": "old", "score": 1.0}], store=store)
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    relay = Relay(port)
    big = pa.table({"model_id": [f"m{i}" for i in range(400_000)], "score": [float(i) for i in range(400_000)]})
    relay.cut_after(1_000_000)  # the endpoint goes away after ~1 MB of a several-MB PUT
    with pytest.raises(StoreError, match=f"{uri}.*(unreachable|failed)"):
        write_table(uri, big, s3_server.store(endpoint_url=relay.endpoint))
    # the key still holds the old table, whole; no other object appeared
    assert [r["model_id"] for r in read_rows(uri, store)] == ["old"]
    assert S3(store).list(f"s3://{bucket}/t") == [uri]


def test_run_folder_cut_mid_upload_publishes_no_table(s3_server, bucket):
    """A run's tables go up last: cut during the upload, no verdicts.parquet is visible."""
    from s3server import Relay

    store = s3_server.store()
    relay = Relay(int(s3_server.endpoint.rsplit(":", 1)[1]))
    out = f"s3://{bucket}/run"
    with pytest.raises(StoreError):
        with RunDir(out, "zoo-scan", s3_server.store(endpoint_url=relay.endpoint)) as run:
            Path(run.path("scores.png")).write_bytes(b"\x89PNG small")
            big = pa.table({"x": list(range(600_000))})
            pq.write_table(big, run.path("verdicts.parquet"))
            relay.cut_after(500_000)
    keys = S3(store).list(out)
    assert f"{out}/verdicts.parquet" not in keys


def test_bad_s3_settings_fail_fast_with_one_line(s3_server, bucket, models, capsys):
    base = ["zoo-scan", f"zoo.path={Path(models['clean']).parent}", *FAST, "use_ray=false"]
    wrong = [o if not o.startswith("store.secret_access_key=") else "store.secret_access_key=wrong" for o in s3_server.overrides()]
    t0 = time.perf_counter()
    assert main([*base, f"out=s3://{bucket}/x", *wrong]) == 1
    one_line_error(capsys, f"s3://{bucket}/x", "rejected the credentials")
    unknown = [o if not o.startswith("store.access_key_id=") else "store.access_key_id=AKIANOSUCHKEY000000" for o in s3_server.overrides()]
    assert main([*base, f"out=s3://{bucket}/x", *unknown]) == 1
    one_line_error(capsys, "rejected the credentials")
    assert main([*base, "out=s3://no-such-bucket-here/x", *s3_server.overrides()]) == 1
    one_line_error(capsys, "no-such-bucket-here", "does not exist")
    local_out = Path(models["clean"]).parent / "never-written"
    assert main([*base, f"out={local_out}", "dataset=s3://no-such-dataset-bucket/d", *s3_server.overrides()]) == 1
    one_line_error(capsys, "no-such-dataset-bucket", "does not exist")
    assert not local_out.exists() and not list(local_out.parent.glob(".never-written.partial-*"))  # checked before any work
    from s3server import free_port

    assert main([*base, f"out=s3://{bucket}/x", *s3_server.overrides(endpoint=f"http://127.0.0.1:{free_port()}")]) == 1
    one_line_error(capsys, f"s3://{bucket}/x", "unreachable")
    assert main(["scan", f"model=s3://{bucket}/no/model.pt", *FAST, *s3_server.overrides()]) == 1
    one_line_error(capsys, f"model=s3://{bucket}/no/model.pt", "nothing there")
    assert main(["scan", "model=s3://Bad_Bucket/model.pt", *FAST, *s3_server.overrides()]) == 1
    one_line_error(capsys, "Bad_Bucket", "not a valid S3 bucket name")
    assert time.perf_counter() - t0 < 60  # every one of them fails before any scanning
    assert S3(s3_server.store()).list(f"s3://{bucket}") == []  # and wrote nothing


def test_sweep_writes_to_s3_and_a_rerun_elsewhere_reports_it(s3_server, bucket, tmp_path, monkeypatch, capsys):
    attack = tmp_path / "attack"
    assert (
        main(
            [
                "attack",
                "data=synthetic",
                "train=tiny",
                "arch.width=8",
                "progress=false",
                "threads=1",
                "attack.target_class=1",
                "attack.rate=0.2",
                "train.epochs=6",
                f"out={attack}",
            ]
        )
        == 0
    )
    s3 = S3(s3_server.store())
    s3.put_file(f"s3://{bucket}/models/m.pt", attack / "model.pt")
    s3.put_file(f"s3://{bucket}/models/m.json", attack / "model.json")  # the card names the real trigger
    out = f"s3://{bucket}/sweeps/s1"
    args = [
        "sweep",
        f"model=s3://{bucket}/models/m.pt",
        "target_class=1",
        "data=synthetic",
        "data.samples=600",
        *PINNED_MESA,
        "mesa.steps=30",
        "mesa.eval_samples=64",
        "defense.epochs=1",
        "ray.num_cpus=2",
        "progress=false",
        "sweep.space={mesa.alpha:{grid:[0.01,0.1]}}",
        f"out={out}",
        *s3_server.overrides(),
    ]
    monkeypatch.setenv("GDM_RAY_CACHE", str(tmp_path / "cache-1"))
    assert main(args) == 0, capsys.readouterr().err
    assert f"wrote {out}" in capsys.readouterr().out
    rows = pq.read_table(f"{bucket}/sweeps/s1/trials.parquet", filesystem=arrow_fs(s3_server)).to_pylist()
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["asr_after"] is not None for r in rows)
    summary = json.loads(s3.get_bytes(f"{out}/sweep.json"))
    assert summary["table"] == f"{out}/trials.parquet" and summary["best"]["mesa.alpha"] in (0.01, 0.1)
    assert any(k.startswith(f"{out}/tune/") for k in s3.list(out))
    # another machine (empty cache) with the same command: reported from S3, not rerun
    monkeypatch.setenv("GDM_RAY_CACHE", str(tmp_path / "cache-2"))
    assert main(args) == 0
    assert "has finished (2 trials); nothing to run" in capsys.readouterr().err


def _finished_on_s3(s3: S3, experiment: str) -> dict[str, dict]:
    """Trials that the Tune experiment state on S3 records as finished: id -> last result."""

    def states() -> list[str]:
        return [s3.get_bytes(u).decode() for u in s3.list(experiment) if u.rsplit("/", 1)[-1].startswith("experiment_state-")][-1:]

    return finished_trials(states)


def test_sweep_on_s3_killed_on_one_machine_resumes_on_another(s3_server, bucket, tmp_path, capsys):
    """Tune keeps the experiment on S3 itself, so a sweep whose machine died
    (SIGKILL, nothing uploaded at exit) resumes from another machine's empty
    cache, keeping the trials that had finished."""
    import os
    import signal
    import subprocess
    import sys

    attack = tmp_path / "attack"
    assert (
        main(
            [
                "attack",
                "data=synthetic",
                "train=tiny",
                "arch.width=8",
                "progress=false",
                "threads=1",
                "attack.target_class=1",
                "attack.rate=0.2",
                "train.epochs=6",
                f"out={attack}",
            ]
        )
        == 0
    )
    s3 = S3(s3_server.store())
    s3.put_file(f"s3://{bucket}/models/m.pt", attack / "model.pt")
    s3.put_file(f"s3://{bucket}/models/m.json", attack / "model.json")
    out = f"s3://{bucket}/sweeps/killed"
    args = [
        "sweep",
        f"model=s3://{bucket}/models/m.pt",
        "target_class=1",
        "data=synthetic",
        "data.samples=600",
        *PINNED_MESA,
        "mesa.steps=60",
        "mesa.eval_samples=64",
        "defense.epochs=1",
        "ray.num_cpus=1",
        "progress=false",
        "sweep.space={mesa.alpha:{grid:[0.01,0.1,1.0]}}",
        f"out={out}",
        *s3_server.overrides(),
    ]
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TUNE_GLOBAL_CHECKPOINT_S="1", PYTHONPATH=str(repo), GDM_RAY_CACHE=str(tmp_path / "machine-1"))
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gdm_ray.cli.main", *args],
            cwd=tmp_path,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 150
        done: dict[str, dict] = {}
        while not done and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            done = _finished_on_s3(s3, f"{out}/tune")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert done, log.read_text()[-3000:]
    assert len(done) < 3, "every trial finished before the kill; nothing left to resume"
    assert not s3.exists(f"{out}/sweep.json") and s3.exists(f"{out}/request.json")

    os.environ["GDM_RAY_CACHE"] = str(tmp_path / "machine-2")  # another machine: nothing of the first in its cache
    try:
        code = main(args)
    finally:
        del os.environ["GDM_RAY_CACHE"]
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"resuming {out}" in err
    rows = pq.read_table(f"{bucket}/sweeps/killed/trials.parquet", filesystem=arrow_fs(s3_server)).to_pylist()
    assert sorted(r["mesa.alpha"] for r in rows) == [0.01, 0.1, 1.0] and all(r["status"] == "TERMINATED" for r in rows)
    for r in rows:
        if r["trial_id"] in done:  # restored from S3, not run again
            assert r["seconds"] == done[r["trial_id"]]["seconds"] and r["finished_at"] == done[r["trial_id"]]["timestamp"]
    assert json.loads(s3.get_bytes(f"{out}/sweep.json"))["resumed"] is True


def test_ensemble_served_from_s3_over_http(s3_server, searched):
    """Ray Serve loads the ensemble from S3 in its replica; real HTTP requests sample it."""
    import http.client

    import ray
    import torch
    from ray import serve
    from s3server import free_port

    from gdm_ray.distributed.runtime import RayConfig, init_ray
    from gdm_ray.distributed.serve import build_app

    uri = f"{searched}/ensemble"
    port = free_port()
    started = init_ray(RayConfig(num_cpus=2))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_app({"ensembles": [f"fm={uri}"], "store": s3_server.store(), "autoscaling": None}), name="gdm-ray-s3", route_prefix="/"
        )

        def call(method: str, path: str, body: object = None) -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request(
                method, path, body=json.dumps(body).encode() if body is not None else None, headers={"Content-Type": "application/json"}
            )
            r = conn.getresponse()
            out = (r.status, r.read())
            conn.close()
            return out

        status, raw = call("GET", "/v1/ensembles")
        assert status == 200, raw
        listed = json.loads(raw)
        listed = listed.get("ensembles", listed) if isinstance(listed, dict) else listed
        assert [(e["id"], e["uri"], e["target_class"]) for e in listed] == [("fm", uri, 2)]
        status, raw = call("POST", "/v1/sample", {"ensemble": "fm", "n": 16, "seed": 7})
        assert status == 200, raw
        got = json.loads(raw)
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    want, _ = open_ensemble(uri, s3_server.store()).sample(16, torch.Generator().manual_seed(7))
    assert torch.tensor(got["patterns"]).shape == want.shape
    assert torch.allclose(torch.tensor(got["patterns"]), want)
