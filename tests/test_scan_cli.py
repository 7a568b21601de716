"""`gdm-ray scan` end to end on synthetic 8-class models made by `gdm-ray attack`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gdm_ray.cli.main import main
from gdm_ray.core.ensemble import load_ensemble

DATA = ["data=synthetic", "data.num_classes=8", "data.samples=3000", "progress=false", "threads=1"]
FAST = [*DATA, "scan.steps=150", "mesa.steps=100", "mesa.eval_samples=128", "samples_per_level=4"]


def _attack(out: Path, rate: float) -> Path:
    args = ["attack", *DATA, "train=tiny", "arch.width=8", "train.epochs=5", "attack.target=2", f"attack.rate={rate}",
            f"out={out}"]  # fmt: skip
    assert main(args) == 0
    return out / "model.pt"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    return {"backdoored": _attack(root / "bd", 0.2), "clean": _attack(root / "clean", 0.0)}


def test_scan_flags_the_target_and_writes_contract_tables(models, tmp_path, capsys):
    out = tmp_path / "scan"
    assert main(["scan", f"model={models['backdoored']}", *FAST, f"out={out}"]) == 0
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


def test_scan_clean_model_verdict_clean(models, tmp_path, capsys):
    out = tmp_path / "scan"
    assert main(["scan", f"model={models['clean']}", *FAST, f"out={out}"]) == 0
    assert "verdict: clean" in capsys.readouterr().out
    v = pq.read_table(out / "verdict.parquet").to_pylist()[0]
    assert v["backdoored"] is False and v["target_class"] is None
    assert not list(out.glob("class-*"))


def test_scan_moving_window_writes_heat_map(models, tmp_path, capsys):
    out = tmp_path / "scan"
    args = ["scan", f"model={models['backdoored']}", *FAST, "scan.moving_window=true", "scan.stride=[3,3]",
            "full_search=false", f"out={out}"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert (out / "class-2" / "heat.png").read_bytes()[:4] == b"\x89PNG"
    detail = json.loads((out / "scan.json").read_text())["flagged_detail"]["2"]
    assert len(detail["heat_box"]) == 4


@pytest.mark.parametrize(
    "extra, needle",
    [(["scan.steps=0"], "scan.steps=0"), (["scan.window=[40,40]", "scan.moving_window=true"], "40x40"),
     (["scan.bogus=1"], "bogus")],
)  # fmt: skip
def test_scan_bad_inputs(models, extra, needle, tmp_path, capsys):
    out = tmp_path / "bad"
    code = main(["scan", f"model={models['backdoored']}", *FAST, *extra, f"out={out}"])
    err = capsys.readouterr().err
    assert code != 0 and needle in err and "Traceback" not in err, err
    assert not out.exists()
