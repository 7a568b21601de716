"""The Ray layer on a real two-node Ray cluster on this machine (`ray start
--head`, then `ray start --address=...` with a custom resource): work lands on
both nodes, a custom resource pins it, a worker killed mid-scan costs nothing,
and a zoo-scan whose driver is killed resumes from its finished chunks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import PINNED_MESA, SCAN_DATA

from gdm_ray.cli.main import main
from gdm_ray.core.errors import ConfigError
from gdm_ray.distributed.runtime import RayConfig, task_options

RAY = str(Path(sys.executable).parent / "ray")
# 4 chunks of 2 classes per model: enough tasks to keep both nodes busy
SCAN = [
    *SCAN_DATA,
    "scan.steps=150",
    "scan.classes_per_pass=2",
    *PINNED_MESA,
    "mesa.steps=100",
    "mesa.eval_samples=128",
    "samples_per_level=4",
    "ray.log_to_driver=false",
]
CLASSES = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head node (1 CPU) and a second node (1 CPU, resource node_b), real
    raylets, with Ray's token authentication on: nodes and drivers (this
    process, the subprocesses) use the token in Ray's default file."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    assert os.environ.get("RAY_AUTH_MODE") == "token"  # set by conftest.py before ray was imported
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    if not (Path.home() / ".ray" / "auth_token").is_file():
        subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, timeout=60, check=True)
    head = [
        RAY,
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        '--resources={"head_node": 1}',
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    second = [
        RAY,
        "start",
        f"--address={address}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        '--resources={"node_b": 1}',
        "--disable-usage-stats",
    ]
    try:
        for cmd in (head, second):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stdout + r.stderr
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _zoo_scan_cmd(zoo: Path, out: Path, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gdm_ray.cli.main", "zoo-scan", f"zoo.path={zoo}", *SCAN, f"ray.address={address}", f"out={out}", *extra]


def _check_complete(out: Path) -> dict:
    """Every model once, every (model, class) row exactly once, the backdoor found."""
    verdicts = pq.read_table(out / "verdicts.parquet").to_pylist()
    assert sorted(v["model_id"] for v in verdicts) == ["broken", "vendor-a", "vendor-b", "vendor-c"]
    rows = [(r["model_id"], r["class"]) for r in pq.read_table(out / "classes.parquet").to_pylist()]
    assert sorted(rows) == [(m, k) for m in ("vendor-a", "vendor-b", "vendor-c") for k in range(CLASSES)]
    by_id = {v["model_id"]: v for v in verdicts}
    assert by_id["vendor-a"]["flagged"] == [2] and by_id["vendor-b"]["backdoored"] is False
    return json.loads((out / "zoo.json").read_text())["ray"]


def _ray_workers(name: str) -> list[int]:
    """PIDs of Ray worker processes now running task ``name`` (Ray sets their title)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(f"ray::{name}"):
                pids.append(int(p.name))
    return pids


def test_zoo_scan_spreads_over_both_nodes(cluster, zoo, tmp_path, capsys):
    out = tmp_path / "zs"
    assert main(["zoo-scan", f"zoo.path={zoo}", *SCAN, f"ray.address={cluster}", f"out={out}"]) == 0, capsys.readouterr().err
    info = _check_complete(out)
    assert info["tasks_run"] == 3 * 4 + 1 and info["tasks_resumed"] == 0  # 3 models x 4 chunks, one flagged class
    assert len(info["nodes"]) == 2, info  # both raylets ran tasks


def test_custom_resource_pins_tasks_to_one_node(cluster, zoo, tmp_path, capsys):
    out = tmp_path / "zs"
    args = ["zoo-scan", f"zoo.path={zoo}", *SCAN, f"ray.address={cluster}", "+ray.resources.node_b=0.01", f"out={out}"]
    assert main(args) == 0, capsys.readouterr().err
    info = _check_complete(out)
    assert len(info["nodes"]) == 1 and sum(info["nodes"].values()) == info["tasks_run"], info


def test_worker_killed_mid_scan_loses_and_duplicates_nothing(cluster, zoo, tmp_path):
    out = tmp_path / "zs"
    proc = subprocess.Popen(_zoo_scan_cmd(zoo, out, cluster, "scan.steps=400"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.time() + 240
    while killed is None and proc.poll() is None and time.time() < deadline:
        pids = _ray_workers("first_pass_chunk")  # a task is named after its job function
        if pids:
            time.sleep(0.5)  # mid-task, not at its start
            try:
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    log, _ = proc.communicate(timeout=600)
    assert killed is not None, "no running first-pass task was found to kill\n" + log
    assert proc.returncode == 0, log
    info = _check_complete(out)
    assert info["tasks_run"] == 3 * 4 + 1  # the killed task ran again, and counts once


def test_interrupted_zoo_scan_resumes(cluster, zoo, tmp_path):
    out = tmp_path / "zs"
    state = tmp_path / ".zs.state"
    proc = subprocess.Popen(
        _zoo_scan_cmd(zoo, out, cluster, "scan.steps=400"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and len(list(state.glob("*.safetensors"))) < 3:
        time.sleep(0.1)
    assert proc.poll() is None, "the scan ended before it could be interrupted\n" + proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; its chunks already finished stay in the state folder
    proc.wait(timeout=60)
    kept = len(list(state.glob("*.safetensors")))
    assert kept >= 3 and not out.exists()  # nothing published by the killed run
    r = subprocess.run(_zoo_scan_cmd(zoo, out, cluster, "scan.steps=400"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    info = _check_complete(out)
    assert info["tasks_resumed"] == kept and info["tasks_run"] == 3 * 4 + 1 - kept
    assert not state.exists()  # published: the resume state is gone


def test_ray_config_errors(zoo, tmp_path, capsys):
    with pytest.raises(ConfigError, match="ray.task_cpus=0"):
        RayConfig(task_cpus=0)
    with pytest.raises(ConfigError, match="ray.max_retries=-1"):
        RayConfig(max_retries=-1)
    assert task_options(RayConfig(task_cpus=2, task_gpus=0.25, resources={"gpu_node": 0.01})) == {
        "num_cpus": 2.0,
        "num_gpus": 0.25,
        "max_retries": 3,
        "resources": {"gpu_node": 0.01},
    }
    port = _free_port()  # nothing listens there
    out = tmp_path / "zs"
    code = main(["zoo-scan", f"zoo.path={zoo}", *SCAN, f"ray.address=127.0.0.1:{port}", f"out={out}"])
    err = capsys.readouterr().err
    assert code != 0 and f"ray.address=127.0.0.1:{port}" in err and "Traceback" not in err, err
    assert not out.exists()
