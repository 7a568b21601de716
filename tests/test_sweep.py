"""`gdm-ray sweep`: a Ray Tune sweep (real in-process Ray) on a synthetic backdoored model."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import PINNED_MESA, finished_trials

from gdm_ray.cli.main import main
from gdm_ray.core.defense import DefenseConfig
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.mesa import MESAConfig
from gdm_ray.distributed.sweep import combinations, parse_space

REPO = Path(__file__).resolve().parents[1]
TINY = ["data=synthetic", "train=tiny", "arch.width=8", "progress=false", "threads=1"]
# Tiny trials: a short search, one retraining epoch, small splits, 2 CPUs.
FAST = [
    "data=synthetic",
    "data.samples=600",
    *PINNED_MESA,
    "mesa.steps=30",
    "mesa.log_every=10",
    "mesa.eval_samples=64",
    "defense.epochs=1",
    "ray.num_cpus=2",
    "progress=false",
]
GROUPS = {"mesa": MESAConfig, "defense": DefenseConfig}
PARAM_COLUMNS = ["mesa.alpha", "mesa.trigger_size"]
METRIC_COLUMNS = [
    "objective",
    "asr_after",
    "acc_drop",
    "found_asr_after",
    "asr_before",
    "acc_before",
    "acc_after",
    "found_asr_before",
    "seconds",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A backdoored synthetic model (TorchScript + card) made by `gdm-ray attack`."""
    out = tmp_path_factory.mktemp("attack") / "run"
    assert main(["attack", *TINY, "attack.target_class=1", "attack.rate=0.2", "train.epochs=6", f"out={out}"]) == 0
    assert json.loads((out / "model.json").read_text())["asr"] >= 0.9
    return out / "model.pt"


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("gdm-ray: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- the search space (no Ray) ----------------------------------------------------------------


def test_space_forms_and_grid():
    flat = parse_space(
        {"mesa.alpha": {"grid": [0.01, 0.1]}, "mesa.trigger_size": {"grid": [[3, 3], [5, 5]]}, "mesa.levels": None}, "grid", GROUPS
    )
    nested = parse_space({"mesa": {"alpha": {"grid": [0.01, 0.1]}, "trigger_size": {"grid": [[3, 3], [5, 5]]}}}, "grid", GROUPS)
    assert flat == nested and [p.key for p in flat] == ["mesa.alpha", "mesa.trigger_size"]
    combos = combinations(flat, "grid")
    assert len(combos) == 4 and {"mesa.alpha": 0.1, "mesa.trigger_size": [5, 5]} in combos
    rnd = parse_space(
        {"mesa.alpha": {"loguniform": [0.001, 1]}, "mesa.levels": {"choice": [2, 3]}, "defense.rate": {"uniform": [0.3, 0.6]}},
        "random",
        GROUPS,
    )
    assert [(p.key, p.kind) for p in rnd] == [("defense.rate", "uniform"), ("mesa.alpha", "loguniform"), ("mesa.levels", "choice")]
    assert len(combinations(rnd, "random")) == 6  # each option and bound on its own


@pytest.mark.parametrize(
    "space, mode, needle",
    [
        ({"mesa.alfa": {"grid": [1]}}, "grid", "unknown key 'mesa.alfa'"),
        ({"train.lr": {"grid": [1]}}, "grid", "unknown key 'train.lr'"),
        ({"mesa.alpha": {"uniform": [0.1, 1]}}, "grid", "sweep.mode=grid takes {grid: [...]}"),
        ({"mesa.alpha": {"uniform": [1, 0.1]}}, "random", "low < high"),
        ({"mesa.alpha": {"loguniform": [0, 1]}}, "random", "low > 0"),
        ({"mesa.levels": {"uniform": [1, 4]}}, "random", "mesa.levels is not a float setting"),
        ({"mesa.alpha": [0.1, 1]}, "grid", "sweep.space.mesa.alpha=[0.1,1]"),
        ({"mesa.alpha": {"grid": []}}, "grid", "non-empty list"),
        ({}, "grid", "sweep.space is empty"),
    ],
)
def test_bad_spaces_name_the_value(space, mode, needle):
    with pytest.raises(ConfigError) as exc:
        parse_space(space, mode, GROUPS)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_a_trial_that_cannot_run_is_an_error_row(synthetic_splits):
    from gdm_ray.distributed.sweep import TrialContext, TrialRecord, evaluate_trial, param_fields
    from gdm_ray.store.trial_rows import trial_rows

    params = parse_space({"mesa.alpha": {"grid": [0.1]}}, "grid", GROUPS)
    ctx = TrialContext(
        model_bytes=b"not a model",
        model_suffix=".pt",
        options=None,
        defense=synthetic_splits.defense,
        eval=synthetic_splits.eval,
        target=1,
        real_trigger={"family": "bw3x3"},
        real_target=1,
        base={"mesa": {"steps": 5}, "defense": {}},
        keys=["mesa.alpha"],
        seed=0,
        device="cpu",
        cpus=1,
        gpus=0,
    )
    import torch

    threads = torch.get_num_threads()
    try:
        m = evaluate_trial({"mesa.alpha": 0.1}, ctx)  # pins torch's threads, as in a Ray worker
    finally:
        torch.set_num_threads(threads)
    assert "neither a TorchScript archive" in m["error"] and math.isnan(m["objective"])
    fields = param_fields(params, GROUPS)
    (row,) = trial_rows([TrialRecord("abc_00000", {"mesa.alpha": 0.1}, m, m["error"], True)], fields, ["h"], "v")
    assert row["status"] == "ERROR" and row["objective"] is None and row["mesa.alpha"] == 0.1 and row["error"] == m["error"]


# --- sweeps on a real Ray runtime ---------------------------------------------------------------


def test_grid_sweep_writes_table_and_best(model, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", f"model={model}", "target_class=1", *FAST, f"out={out}", f"dataset={tmp_path / 'ds'}"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    table = pq.read_table(out / "trials.parquet")
    (part,) = (tmp_path / "ds" / "trials" / "run=sweep" / f"model={Path(model).stem}").glob("part-*.parquet")
    assert pq.read_table(part).to_pylist() == table.to_pylist()
    cols = table.column_names
    assert cols[:4] == ["schema_version", "trial_id", "status", "error"] and cols[-2:] == ["config_hash", "code_version"]
    assert set(PARAM_COLUMNS + METRIC_COLUMNS) <= set(cols)
    assert str(table.schema.field("mesa.trigger_size").type) == "list<element: int64>"
    rows = table.to_pylist()
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    assert {(r["mesa.alpha"], tuple(r["mesa.trigger_size"])) for r in rows} == {(a, t) for a in (0.01, 0.1) for t in ((3, 3), (5, 5))}
    for r in rows:
        assert r["status"] == "TERMINATED" and r["error"] is None, r
        assert math.isclose(r["objective"], r["asr_after"] + r["acc_drop"] / 100)
        assert math.isclose(r["acc_drop"], (r["acc_before"] - r["acc_after"]) * 100)
        assert r["asr_before"] >= 0.9 and r["seed"] == 0 and r["config_hash"] and r["code_version"]
    assert len({r["config_hash"] for r in rows}) == 4  # each trial's effective config
    summary = json.loads((out / "sweep.json").read_text())
    best = min(rows, key=lambda r: (r["objective"], rows.index(r)))
    assert summary["best_trial"] == best["trial_id"]
    assert summary["best"] == {k: best[k] for k in PARAM_COLUMNS}
    assert summary["best_metrics"]["objective"] == best["objective"] == min(r["objective"] for r in rows)
    assert summary["space"] == {"mesa.alpha": {"grid": [0.01, 0.1]}, "mesa.trigger_size": {"grid": [[3, 3], [5, 5]]}}
    assert (out / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "tune").is_dir() and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert "best mesa.alpha" in stdout and best["trial_id"] in stdout


def _terminated(experiment: Path) -> dict[str, dict]:
    """Trials the experiment state on disk records as finished: id -> last result."""
    return finished_trials(lambda: [p.read_text() for p in sorted(experiment.glob("experiment_state-*.json"))[-1:]])


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(model, tmp_path, capsys):
    out = tmp_path / "sweep"
    # random mode: the restored searcher must also keep the drawn values
    args = [
        "sweep",
        f"model={model}",
        "target_class=1",
        *FAST,
        *PINNED_MESA,
        "mesa.steps=60",
        "ray.num_cpus=1",
        "sweep.mode=random",
        "sweep.num_samples=2",
        "sweep.space={mesa.alpha:{loguniform:[0.001,1]},mesa.trigger_size:{grid:[[3,3],[5,5]]}}",
        f"out={out}",
    ]
    # the experiment state reaches disk every second (Tune's default: every 10 s or more), so the
    # test can kill the sweep right after its first trial is recorded as finished
    env = dict(os.environ, TUNE_GLOBAL_CHECKPOINT_S="1", PYTHONPATH=str(REPO))
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
            time.sleep(0.2)
            done = _terminated(out / "tune")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait()
    assert done, log.read_text()[-3000:]
    assert len(done) < 4, "every trial finished before the kill; nothing left to resume"
    assert not (out / "trials.parquet").exists() and not (out / "sweep.json").exists()
    results_before = {t: (out / "tune" / f"trial_{t}" / "result.json").read_text() for t in done}

    code = main(args)
    _, err = capsys.readouterr()
    assert code == 0, err
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    ids = [r["trial_id"] for r in rows]
    assert len(rows) == 4 and len(set(ids)) == 4 and set(done) <= set(ids)
    assert all(r["status"] == "TERMINATED" for r in rows), rows
    assert sorted(tuple(r["mesa.trigger_size"]) for r in rows) == [(3, 3), (3, 3), (5, 5), (5, 5)]
    assert all(0.001 <= r["mesa.alpha"] <= 1 for r in rows)
    for r in rows:
        if r["trial_id"] in done:  # restored, not run again: the same result as before the kill
            last = done[r["trial_id"]]
            assert r["seconds"] == last["seconds"] and r["finished_at"] == last["timestamp"], (r, last)
            assert r["mesa.alpha"] == last["config"]["mesa.alpha"]
            assert (out / "tune" / f"trial_{r['trial_id']}" / "result.json").read_text() == results_before[r["trial_id"]]
    assert json.loads((out / "sweep.json").read_text())["resumed"] is True

    # a finished sweep run again only reports
    mtime = (out / "trials.parquet").stat().st_mtime_ns
    code = main(args)
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "has finished" in err and "nothing to run" in err and "best mesa.alpha" in stdout
    assert (out / "trials.parquet").stat().st_mtime_ns == mtime
    # ... and one with other settings is refused, not started over
    code = main([*args[:-1], "mesa.steps=61", f"out={out}"])
    assert code == 1 and "started with other settings" in _error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["mesa.alpha=-1"], ["mesa.alpha=-1"]),
        (["sweep.space={mesa.alpha:{grid:[0.1,-0.5]}}"], ["mesa.alpha=-0.5"]),
        (["sweep.space={mesa.alfa:{grid:[0.1]}}"], ["unknown key 'mesa.alfa'"]),
        (["sweep.space={mesa.alpha:{normal:[0.1]}}"], ["sweep.space.mesa.alpha", "normal"]),
        (["sweep.space={mesa.trigger_size:{grid:[[3,3],[20,20]]}}"], ["mesa.trigger_size=[20, 20]", "larger than the image"]),
        (["sweep.mode=random", "sweep.space={mesa.levels:{choice:[2,3]},mesa.betas:{choice:[[0,0.5]]}}"], ["mesa.betas"]),
        (["sweep.mode=bayes"], ["sweep.mode='bayes'"]),
        (["sweep.num_samples=3"], ["sweep.num_samples=3"]),
        (
            [
                "out=s3://bucket/sweeps/x",
                "store.endpoint_url=http://127.0.0.1:9",
                "store.access_key_id=k",
                "store.secret_access_key=s",
                "store.retries=0",
                "store.connect_timeout=1",
            ],
            ["s3://bucket/sweeps/x", "unreachable"],
        ),
    ],
)
def test_bad_inputs_are_one_line_and_write_nothing(model, extra, needles, tmp_path, capsys):
    out = tmp_path / "bad"
    args = ["sweep", f"model={model}", "target_class=1", *FAST, f"out={out}", *extra]
    code = main(args)
    line = _error_line(capsys.readouterr().err)
    assert code == 1, line
    for n in needles:
        assert n in line, line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_model_without_card_needs_the_real_trigger(model, tmp_path, capsys):
    bare = tmp_path / "m" / "model.pt"
    bare.parent.mkdir()
    shutil.copy(model, bare)
    out = tmp_path / "bad"
    code = main(["sweep", f"model={bare}", "target_class=1", *FAST, f"out={out}"])
    line = _error_line(capsys.readouterr().err)
    assert code == 1 and "trigger=" in line and not out.exists()


def test_out_holding_something_else_is_refused(model, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = main(["sweep", f"model={model}", "target_class=1", *FAST, f"out={out}"])
    assert code == 1 and "holds no sweep" in _error_line(capsys.readouterr().err)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_field_types_are_judged_from_resolved_types():
    """`from __future__ import annotations` makes every annotation a string; the sweep reads the real types."""
    import pyarrow as pa

    from gdm_ray.distributed.sweep import _field_kind, param_fields

    assert _field_kind(MESAConfig, "alpha") == "float" and _field_kind(MESAConfig, "position") == "list[int]"
    assert _field_kind(MESAConfig, "betas") == "list[float]" and _field_kind(DefenseConfig, "flip") == "bool"
    params = parse_space(
        {"mesa.position": {"grid": [[0, 0]]}, "mesa.levels": {"grid": [2]}, "defense.rate": {"grid": [0.5]}}, "grid", GROUPS
    )
    assert [f.type for f in param_fields(params, GROUPS)] == [pa.float64(), pa.int64(), pa.list_(pa.int64())]
    with pytest.raises(ConfigError, match="not a float setting"):
        parse_space({"mesa.levels": {"uniform": [1, 3]}}, "random", GROUPS)
