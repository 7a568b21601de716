"""`gdm-ray demo`, the main job, end to end on synthetic data: a zoo trained,
zoo-scanned on in-process Ray, the flagged model repaired, its ensemble
served by Ray Serve and sampled over real HTTP."""

from __future__ import annotations

import json

from conftest import SCAN_DATA

from gdm_ray.cli.main import main
from gdm_ray.store import read_dataset, read_rows


def test_demo_scans_repairs_and_serves(tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        "demo",
        *SCAN_DATA,
        "train=tiny",
        "arch.width=8",
        "train.epochs=5",
        "attack.rate=0.2",
        "attack.target_class=2",
        "scan.steps=150",
        "mesa.steps=250",
        "mesa.eval_samples=256",
        "defense.epochs=4",
        f"out={out}",
    ]
    code = main(args)
    stdout, err = capsys.readouterr()
    assert code == 0, err
    verdicts = {r["model_id"]: r for r in read_rows(out / "zoo-scan" / "verdicts.parquet")}
    assert set(verdicts) == {"clean-1", "clean-2", "backdoored"}
    assert verdicts["backdoored"]["backdoored"] and verdicts["backdoored"]["target_class"] == 2
    assert not verdicts["clean-1"]["backdoored"] and not verdicts["clean-2"]["backdoored"]
    assert all(v["reference"] == "zoo" for v in verdicts.values())
    m = json.loads((out / "defend-backdoored" / "metrics.json").read_text())
    assert m["before"]["asr"] >= 0.9 and m["after"]["asr"] < 0.25, m
    sample = json.loads((out / "serve" / "sample.json").read_text())
    assert sample["ensemble"] == "backdoored" and sample["n"] == 64 and len(sample["patterns"]) == 64
    assert (out / "serve" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "zoo-scan" / "scores.png").is_file() and (out / "defend-backdoored" / "samples.png").is_file()
    # one dataset for both runs, partitioned by run and model
    repairs = read_dataset(out / "dataset", "repairs").to_pylist()
    assert [(r["run"], r["model"], r["targets"]) for r in repairs] == [("defend-backdoored", "backdoored", [2])]
    assert repairs[0]["asr_after"] == m["after"]["asr"]
    models = read_dataset(out / "dataset", "verdicts", run="zoo-scan").column("model").to_pylist()
    assert sorted(models) == ["backdoored", "clean-1", "clean-2"]
    assert "step 5/5: summary" in stdout and "/v1/sample: 64 triggers" in stdout and str(out) in stdout
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # nothing staged left behind
