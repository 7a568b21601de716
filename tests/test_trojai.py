"""`gdm-ray trojai`: TrojAI's detector flags on a TrojAI-layout folder: configure, then infer; bad flags are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gdm_ray.cli.main import main
from gdm_ray.cli.trojai import fit_calibration, probability
from gdm_ray.core.data import DataSpec, load_splits

SCHEMA = Path(__file__).resolve().parents[1] / "configs" / "trojai" / "metaparameters_schema.json"


@pytest.fixture(scope="module")
def round_dir(models, tmp_path_factory) -> Path:
    """TrojAI's layout: models/id-*/{model.pt, ground_truth.csv, clean-example-data/class_K_example_N.png}."""
    root = tmp_path_factory.mktemp("trojai") / "models"
    splits = load_splits(DataSpec(name="synthetic", num_classes=8, samples=3000))
    x = (splits.defense.x[:240].numpy() * 255).round().astype(np.uint8)
    y = splits.defense.y[:240].numpy()
    for i, (kind, poisoned) in enumerate((("backdoored", 1), ("clean", 0), ("backdoored", 1), ("clean", 0))):
        d = root / f"id-{i:08d}"
        (d / "clean-example-data").mkdir(parents=True)
        shutil.copy(models[kind], d / "model.pt")
        (d / "ground_truth.csv").write_text(f"{poisoned}\n")
        for j, (img, label) in enumerate(zip(x, y)):
            Image.fromarray(img[0], "L").save(d / "clean-example-data" / f"class_{label}_example_{j}.png")
    return root


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("meta") / "metaparameters.json"
    p.write_text(json.dumps({"scan.steps": 150, "full_search": False}))
    return p


def _flags(meta: Path, tmp: Path) -> list[str]:
    return ["--scratch_dirpath", str(tmp / "scratch"), "--metaparameters_filepath", str(meta), "--schema_filepath", str(SCHEMA),
            "--learned_parameters_dirpath", str(tmp / "learned")]  # fmt: skip


def test_configure_then_infer_writes_one_probability_per_model(round_dir, meta, tmp_path, capsys):
    code = main(["trojai", "configure", "--configure_models_dirpath", str(round_dir), *_flags(meta, tmp_path)])
    assert code == 0, capsys.readouterr().err
    cal = json.loads((tmp_path / "learned" / "calibration.json").read_text())
    assert cal["models"] == 4 and cal["roc_auc"] == 1.0 and cal["cross_entropy"] < cal["default_cross_entropy"]
    probs = {}
    for i in (0, 1):
        result = tmp_path / f"result-{i}.txt"
        d = round_dir / f"id-{i:08d}"
        args = ["trojai", "infer", "--model_filepath", str(d / "model.pt"), "--result_filepath", str(result),
                "--examples_dirpath", str(d / "clean-example-data"), "--round_training_dataset_dirpath", str(round_dir),
                *_flags(meta, tmp_path)]  # fmt: skip
        assert main(args) == 0, capsys.readouterr().err
        probs[i] = float(result.read_text())
        assert 0.0 <= probs[i] <= 1.0
    assert probs[0] > 0.5 > probs[1], probs


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["infer", "--model_filepath", "m.pt", "--bogus", "1"], 2, "the following arguments are required: --result_filepath"),
        (["infer", "--model_filepath", "m.pt", "--result_filepath", "r", "--examples_dirpath", ".", "--bogus", "1"], 2,
         "unrecognized arguments: --bogus"),
        (["infer", "--model_filepath", "NOPE.pt", "--result_filepath", "r.txt", "--examples_dirpath", "."], 1, "NOPE.pt: no such file"),
        (["configure", "--configure_models_dirpath", "NOWHERE", "--scratch_dirpath", "s", "--learned_parameters_dirpath", "l"], 1,
         "NOWHERE: no such folder"),
    ],
)  # fmt: skip
def test_a_wrong_flag_or_missing_file_is_one_line(args, code, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["trojai", *args]) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_metaparameters_outside_the_schema_are_refused(round_dir, tmp_path, capsys):
    bad = tmp_path / "meta.json"
    bad.write_text(json.dumps({"scan.steps": "many"}))
    d = round_dir / "id-00000000"
    args = ["trojai", "infer", "--model_filepath", str(d / "model.pt"), "--result_filepath", str(tmp_path / "r.txt"),
            "--examples_dirpath", str(d / "clean-example-data"), "--metaparameters_filepath", str(bad),
            "--schema_filepath", str(SCHEMA)]  # fmt: skip
    assert main(args) == 1
    assert "scan.steps='many' is not of type integer" in capsys.readouterr().err
    assert not (tmp_path / "r.txt").exists()


def test_the_calibration_fit_separates_and_orders():
    cal = fit_calibration([0.5, 1.0, 1.2, 3.0, 4.0, 5.0], [0, 0, 0, 1, 1, 1])
    assert cal["a"] > 0 and probability(1.0, cal) < 0.5 < probability(4.0, cal)


def test_the_shipped_metaparameters_fit_their_schema_and_compose():
    from gdm_ray.cli.compose import compose_settings
    from gdm_ray.cli.trojai import _metaparameters

    overrides = _metaparameters(SCHEMA.with_name("metaparameters.json"), SCHEMA)
    s = compose_settings("scan", ["model=m.pt", *overrides])
    assert s.scan.steps == 300 and s.model.allow_pickle is False and s.model.path == "m.pt"
