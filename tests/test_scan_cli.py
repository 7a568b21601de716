"""`gdm-ray scan` end to end on synthetic 8-class models made by `gdm-ray attack`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import PINNED_MESA  # noqa: E402
from conftest import SCAN_DATA as DATA

from gdm_ray.cli.main import main
from gdm_ray.core.ensemble import load_ensemble

FAST = [
    *DATA,
    "scan.steps=150",
    *PINNED_MESA,
    "mesa.steps=100",
    "mesa.eval_samples=128",
    "samples_per_level=4",
]


def test_scan_flags_the_target_and_writes_contract_tables(models, tmp_path, capsys):
    out = tmp_path / "scan"
    dataset = tmp_path / "dataset"
    assert main(["scan", f"model={models['backdoored']}", *FAST, f"out={out}", f"dataset={dataset}"]) == 0
    stdout = capsys.readouterr().out
    assert "verdict: BACKDOORED" in stdout and "target class 2" in stdout
    verdict = pq.read_table(out / "verdict.parquet").to_pylist()
    assert len(verdict) == 1
    v = verdict[0]
    for key in ("model_id", "backdoored", "score", "target_class", "config_hash", "code_version", "schema_version"):
        assert key in v
    assert v["model_id"] == "model" and v["backdoored"] is True and v["target_class"] == 2 and v["score"] > 2
    classes = pq.read_table(out / "classes.parquet")
    assert classes.num_rows == 8
    rows = classes.to_pylist()
    assert [r["class"] for r in rows] == list(range(8))
    assert {r["class"] for r in rows if r["flagged"]} == {2}
    assert all(r["config_hash"] == v["config_hash"] for r in rows)
    assert (out / "classes.png").is_file() and (out / "class-2" / "samples.png").is_file()
    assert load_ensemble(out / "class-2" / "ensemble").target_class == 2
    assert json.loads((out / "scan.json").read_text())["flagged"] == [2]
    # the same rows in the dataset, partitioned by run (the out= folder's name) and model
    for table, want in (("verdicts", verdict), ("classes", rows)):
        (part,) = (dataset / table / "run=scan" / "model=model").glob("part-*.parquet")
        assert pq.read_table(part).to_pylist() == want


def test_scan_clean_model_verdict_clean(models, tmp_path, capsys):
    out = tmp_path / "scan"
    assert main(["scan", f"model={models['clean']}", *FAST, f"out={out}"]) == 0
    assert "verdict: clean" in capsys.readouterr().out
    v = pq.read_table(out / "verdict.parquet").to_pylist()[0]
    assert v["backdoored"] is False and v["target_class"] is None
    assert not list(out.glob("class-*"))


def test_scan_moving_window_writes_heat_map(models, tmp_path, capsys):
    out = tmp_path / "scan"
    args = [
        "scan",
        f"model={models['backdoored']}",
        *FAST,
        "scan.moving_window=true",
        "scan.stride=[3,3]",
        "full_search=false",
        f"out={out}",
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert (out / "class-2" / "heat.png").read_bytes()[:4] == b"\x89PNG"
    detail = json.loads((out / "scan.json").read_text())["flagged_detail"]["2"]
    assert len(detail["heat_box"]) == 4


@pytest.mark.parametrize(
    "extra, needle",
    [(["scan.steps=0"], "scan.steps=0"), (["scan.window=[40,40]", "scan.moving_window=true"], "40x40"), (["scan.bogus=1"], "bogus")],
)
def test_scan_bad_inputs(models, extra, needle, tmp_path, capsys):
    out = tmp_path / "bad"
    code = main(["scan", f"model={models['backdoored']}", *FAST, *extra, f"out={out}"])
    err = capsys.readouterr().err
    assert code != 0 and needle in err and "Traceback" not in err, err
    assert not out.exists()


def test_defend_auto_scans_then_repairs(models, tmp_path, capsys):
    out = tmp_path / "d"
    args = ["defend", f"model={models['backdoored']}", "target_class=auto", *FAST, "mesa.steps=250", "defense.epochs=4", f"out={out}"]
    assert main(args) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["target_class"] == "auto" and m["targets"] == [2]
    assert m["before"]["asr"] > 0.9 and m["after"]["asr"] < 0.25, (m["before"], m["after"])
    assert (out / "model.pt").is_file() and (out / "classes.png").is_file()


def test_defend_auto_on_a_clean_model_repairs_nothing(models, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["defend", f"model={models['clean']}", "target_class=auto", *FAST, f"out={out}"]) == 0
    assert "nothing to repair" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["targets"] == [] and m["after"] is None and not (out / "model.pt").exists()


def test_defend_auto_repairs_two_targets_at_once(tmp_path, capsys):
    import torch

    from gdm_ray.core.attack import BadNets
    from gdm_ray.core.data import DataSpec, load_splits
    from gdm_ray.core.metrics import attack_success_rate
    from gdm_ray.core.model_io import load_model, save_torchscript
    from gdm_ray.core.models import build_model
    from gdm_ray.core.train import TrainConfig, train_classifier
    from gdm_ray.core.triggers import TriggerSpec, make_trigger

    splits = load_splits(DataSpec(name="synthetic", samples=3000, num_classes=8, image_size=[16, 16]))
    attacks = [BadNets(make_trigger(TriggerSpec(family="bw3x3", number=n), 1, (16, 16)), t, 0.2) for n, t in ((341, 2), (7, 5))]

    def hook(x, y, g):
        for a in attacks:
            x, y = a.poison_batch(x, y, g)
        return x, y

    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 8, 8)
    train_classifier(
        model, splits.train, TrainConfig(epochs=6, batch_size=64, lr=0.05, channels_last=False), torch.Generator().manual_seed(0), hook
    )
    model.eval()
    assert all(attack_success_rate(model, splits.eval, a.trigger, a.target) > 0.9 for a in attacks)
    path = save_torchscript(model, tmp_path / "two.pt", (1, 16, 16))
    out = tmp_path / "d"
    args = ["defend", f"model={path}", "target_class=auto", *FAST, "mesa.steps=250", "defense.epochs=4", f"out={out}"]
    assert main(args) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert sorted(m["targets"]) == [2, 5]
    (row,) = pq.read_table(out / "repair.parquet").to_pylist()
    assert row["targets"] == m["targets"] and row["target_class"] == "auto" and row["model_id"] == "two"
    assert row["found_asr_after"] == m["after"]["found_asr"] and row["repaired_sha256"] == m["repaired_sha256"]
    assert row["repaired_model"] == str(out / "model.pt") and row["asr_before"] is None  # no card: the real trigger is unknown
    assert row["robust_accuracy_before"] is None and row["robust_accuracy_after"] is None and row["der"] is None and m["der"] is None
    repaired = load_model(out / "model.pt").module
    after = [attack_success_rate(repaired, splits.eval, a.trigger, a.target) for a in attacks]
    assert max(after) < 0.3, after


# --- zoo-scan ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_scanned(zoo, tmp_path_factory) -> tuple[Path, str]:
    """The zoo scanned once: its output folder and what it printed."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("zoo-scan") / "zs"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["zoo-scan", f"zoo.path={zoo}", *FAST, f"out={out}", f"dataset={out.parent / 'dataset'}"]) == 0
    return out, buf.getvalue()


def test_zoo_scan_in_one_process_gives_the_ray_answer(zoo, zoo_scanned, tmp_path):
    """use_ray=false runs the same searches in this process: same verdicts and class rows."""
    ray_out, _ = zoo_scanned
    out = tmp_path / "local"
    assert main(["zoo-scan", f"zoo.path={zoo}", *FAST, "use_ray=false", f"out={out}"]) == 0
    local = {r["model_id"]: r for r in pq.read_table(out / "verdicts.parquet").to_pylist()}
    remote = {r["model_id"]: r for r in pq.read_table(ray_out / "verdicts.parquet").to_pylist()}
    assert set(local) == set(remote)
    for mid, r in remote.items():
        assert (r["backdoored"], r["target_class"], r["flagged"], r["error"] is None) == (
            local[mid]["backdoored"],
            local[mid]["target_class"],
            local[mid]["flagged"],
            local[mid]["error"] is None,
        ), mid
        if r["score"] is not None:
            assert r["score"] == pytest.approx(local[mid]["score"], abs=1e-3), mid
    sizes = lambda p: {(r["model_id"], r["class"]): r["trigger_size"] for r in pq.read_table(p / "classes.parquet").to_pylist()}  # noqa: E731
    assert sizes(out) == pytest.approx(sizes(ray_out), abs=1e-2)
    ray_meta = json.loads((ray_out / "zoo.json").read_text())["ray"]
    assert ray_meta["tasks_run"] == 3 + 1 and ray_meta["tasks_resumed"] == 0  # 3 models x 1 chunk, 1 flagged class
    assert json.loads((out / "zoo.json").read_text())["ray"] is None
    assert not list(ray_out.parent.glob(".*.state"))  # published: no resume state left behind


def test_zoo_scan_moving_window_on_ray_gives_the_in_process_heat_map(zoo, tmp_path):
    """Window chunks and MESA as Ray tasks, the heat map put together on the
    driver: the same hot box, peak and sized search as in one process."""
    common = ["zoo-scan", f"zoo.path={zoo}", *FAST, "scan.moving_window=true", "scan.stride=[3,3]", "zoo.glob='vendor-[ab]*'"]
    details = {}
    for use_ray in ("true", "false"):
        out = tmp_path / use_ray
        assert main([*common, f"use_ray={use_ray}", f"out={out}"]) == 0
        details[use_ray] = json.loads((out / "vendor-a" / "scan.json").read_text())["flagged_detail"]["2"]
        assert (out / "vendor-a" / "class-2" / "heat.png").is_file()
        assert load_ensemble(out / "vendor-a" / "class-2" / "ensemble").position == tuple(details[use_ray]["heat_box"][:2])
    remote, local = details["true"], details["false"]
    assert remote["heat_box"] == local["heat_box"] and remote["heat_peak"] == local["heat_peak"]
    assert remote["heat_max"] == pytest.approx(local["heat_max"], abs=1e-3)
    assert remote["mesa_asr_eval"] == pytest.approx(local["mesa_asr_eval"], abs=0.02)


def test_zoo_scan_writes_contract_tables_and_reports_broken_models(zoo_scanned):
    out, stdout = zoo_scanned
    assert "4 models: 1 backdoored, 2 clean, 1 failed to load" in stdout
    verdicts = pq.read_table(out / "verdicts.parquet")
    for col in ("model_id", "backdoored", "score", "target_class", "error", "config_hash", "code_version", "schema_version"):
        assert col in verdicts.column_names, col
    assert str(verdicts.schema.field("target_class").type) == "int64" and str(verdicts.schema.field("backdoored").type) == "bool"
    rows = {r["model_id"]: r for r in verdicts.to_pylist()}
    assert set(rows) == {"broken", "vendor-a", "vendor-b", "vendor-c"}
    assert {r["reference"] for r in rows.values() if not r["error"]} == {"zoo"}
    assert rows["vendor-a"]["backdoored"] is True and rows["vendor-a"]["target_class"] == 2
    assert rows["vendor-b"]["backdoored"] is False and rows["vendor-b"]["target_class"] is None
    assert rows["vendor-a"]["score"] > rows["vendor-b"]["score"]
    broken = rows["broken"]
    assert "corrupt" in broken["error"] and broken["backdoored"] is None and broken["score"] is None
    assert rows["vendor-a"]["error"] is None
    classes = pq.read_table(out / "classes.parquet").to_pylist()
    assert sorted({(r["model_id"], r["class"]) for r in classes}) == [
        (m, k) for m in ("vendor-a", "vendor-b", "vendor-c") for k in range(8)
    ]
    assert {r["class"] for r in classes if r["flagged"]} == {2}
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "vendor-a" / "classes.png").is_file() and (out / "vendor-a" / "class-2" / "ensemble").is_dir()


def test_zoo_scan_adds_its_rows_to_the_dataset_partitioned_by_run_and_model(zoo_scanned):
    """dataset= holds the same rows, one partition per model, read back by pyarrow's own
    Hive partitioning; a query for one model reads only its folder."""
    import pyarrow.dataset as pads

    from gdm_ray.store import read_dataset

    out, _ = zoo_scanned
    root = out.parent / "dataset"
    for table in ("verdicts", "classes"):
        assert sorted(p.name for p in (root / table / f"run={out.name}").iterdir()) == [
            f"model={m}" for m in (["broken"] if table == "verdicts" else []) + ["vendor-a", "vendor-b", "vendor-c"]
        ]
        view = pads.dataset(root / table, format="parquet", partitioning="hive").to_table()
        assert set(view.column("run").to_pylist()) == {out.name}
        assert view.column("model").to_pylist() == view.column("model_id").to_pylist()
        key = (lambda r: r["model_id"]) if table == "verdicts" else (lambda r: (r["model_id"], r["class"]))
        want = sorted(pq.read_table(out / f"{table}.parquet").to_pylist(), key=key)
        got = sorted(view.drop_columns(["run", "model"]).to_pylist(), key=key)
        assert got == want
    only_a = read_dataset(root, "classes", model="vendor-a")
    assert only_a.num_rows == 8 and set(only_a.column("model_id").to_pylist()) == {"vendor-a"}


@pytest.mark.parametrize("make, needle", [("empty", "no model files"), ("missing", "no such folder"), ("dupe", "share the model id")])
def test_zoo_scan_bad_folders(make, needle, models, tmp_path, capsys):
    import shutil

    zoo_dir = tmp_path / "z"
    if make != "missing":
        zoo_dir.mkdir()
    if make == "dupe":
        shutil.copy(models["clean"], zoo_dir / "m.pt")
        shutil.copy(models["clean"], zoo_dir / "m.ts")
    out = tmp_path / "out"
    code = main(["zoo-scan", f"zoo.path={zoo_dir}", *FAST, f"out={out}"])
    err = capsys.readouterr().err
    assert code != 0 and needle in err and "Traceback" not in err, err
    assert not out.exists()


def test_scan_baseline_method_is_the_first_pass_alone(models, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["scan", f"model={models['backdoored']}", *FAST, "scan.method=baseline", f"out={out}"]) == 0
    v = pq.read_table(out / "verdict.parquet").to_pylist()[0]
    assert v["method"] == "baseline"
    classes = pq.read_table(out / "classes.parquet").to_pylist()
    # plain Neural Cleanse also finds the 3x3 backdoor's class smallest
    assert min(classes, key=lambda r: r["trigger_size"])["class"] == 2
    assert not list(out.glob("class-*/ensemble"))


def test_scan_against_a_zoo_reference(models, zoo_scanned, tmp_path, capsys):
    ref, _ = zoo_scanned
    out = tmp_path / "s"
    assert main(["scan", f"model={models['backdoored']}", *FAST, f"reference={ref}", f"out={out}"]) == 0
    v = pq.read_table(out / "verdict.parquet").to_pylist()[0]
    assert v["reference"] == "zoo" and v["flagged"] == [2]
    meta = json.loads((out / "scan.json").read_text())
    # vendor-a is this very file (same sha256): left out; broken.pt has no rows
    assert meta["reference_path"] == str(ref) and meta["reference_models"] == 2


@pytest.mark.parametrize(
    "model, reference, extra, needle",
    [
        ("backdoored", "zoo", ["scan.steps=100"], "scan.steps=150 there, 100 here"),  # another budget: sizes not comparable
        ("backdoored", "/nonexistent", [], "no classes.parquet"),
        ("clean", "zoo", [], "1 other scanned model(s)"),  # both clean copies are this file: only vendor-a is left
        ("backdoored", "zoo", ["use_ray=true"], "use_ray=true with reference="),
    ],
)
def test_scan_reference_bad_inputs(model, reference, extra, needle, models, zoo_scanned, tmp_path, capsys):
    ref = zoo_scanned[0] if reference == "zoo" else reference
    out = tmp_path / "s"
    code = main(["scan", f"model={models[model]}", *FAST, f"reference={ref}", *extra, f"out={out}"])
    err = capsys.readouterr().err
    assert code != 0 and needle in err and "Traceback" not in err, err
    assert not out.exists()


def test_interrupted_scan_resumes_its_first_pass(models, tmp_path):
    """A scan killed mid-pass keeps its finished chunks beside out=; the same
    command resumes from them and finds what an uninterrupted scan finds."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["scan", f"model={models['backdoored']}", *FAST, "scan.steps=400", "scan.classes_per_pass=2", "full_search=false"]
    whole = tmp_path / "whole"
    assert main([*args, f"out={whole}"]) == 0
    out, state = tmp_path / "s", tmp_path / ".s.state"
    cmd = [sys.executable, "-m", "gdm_ray.cli.main", *args, f"out={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not list(state.glob("*.safetensors")):
        time.sleep(0.05)
    assert proc.poll() is None, "the scan ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    kept = len(list(state.glob("*.safetensors")))
    assert 1 <= kept < 4 and not out.exists()
    assert main([*args, f"out={out}"]) == 0
    assert json.loads((out / "scan.json").read_text())["resumed_chunks"] == kept
    sizes = lambda p: [r["trigger_size"] for r in pq.read_table(p / "classes.parquet").to_pylist()]  # noqa: E731
    assert sizes(out) == pytest.approx(sizes(whole), rel=1e-4)
    assert not state.exists()  # published: the state is gone


def test_scan_on_ray_gives_the_in_process_verdict(models, tmp_path, capsys):
    """use_ray=true: the first pass's chunks of classes and the flagged class's MESA run as Ray
    tasks, seeded as in one process: the same verdict, class rows and flagged search."""
    outs = {}
    for use_ray in ("false", "true"):
        outs[use_ray] = tmp_path / use_ray
        assert (
            main(["scan", f"model={models['backdoored']}", *FAST, "scan.classes_per_pass=4", f"use_ray={use_ray}", f"out={outs[use_ray]}"])
            == 0
        )
    assert "Ray: 3 tasks run, 0 resumed" in capsys.readouterr().err  # 2 chunks of 4 classes, 1 flagged class's MESA
    local, remote = (pq.read_table(outs[k] / "verdict.parquet").to_pylist()[0] for k in ("false", "true"))
    assert (remote["backdoored"], remote["target_class"], remote["flagged"]) == (True, 2, [2])
    assert (local["backdoored"], local["target_class"], local["flagged"]) == (True, 2, [2])
    assert remote["score"] == pytest.approx(local["score"], abs=1e-2)
    sizes = lambda p: [r["trigger_size"] for r in pq.read_table(p / "classes.parquet").to_pylist()]  # noqa: E731
    assert sizes(outs["true"]) == pytest.approx(sizes(outs["false"]), abs=1e-2)
    detail = {k: json.loads((outs[k] / "scan.json").read_text())["flagged_detail"]["2"] for k in outs}
    assert detail["true"]["mesa_asr_eval"] == pytest.approx(detail["false"]["mesa_asr_eval"], abs=0.02)
    assert load_ensemble(outs["true"] / "class-2" / "ensemble").target_class == 2
