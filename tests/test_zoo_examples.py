"""zoo-scan on a TrojAI-layout zoo: a model with enough clean examples of its own is scanned on them.

Real files: ``id-*/model.pt``, ``id-*/config.json`` and ``id-*/clean-example-data/class_K_example_N.png``
made from the synthetic set's held-out split, scanned through the CLI entry point."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SCAN_DATA as DATA
from PIL import Image

from gdm_ray.cli.main import main
from gdm_ray.cli.zoo import list_models
from gdm_ray.core.data import DataSpec, load_splits
from gdm_ray.core.errors import DataError
from gdm_ray.core.examples import example_set, load_examples

# the first pass alone (no MESA): the examples decide the verdict there
FAST = [*DATA, "scan.steps=150", "full_search=false", "use_ray=false"]
OWN, FEW = 120, 24  # images in the two example folders (zoo.min_examples=100 by default)


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    """Clean uint8 images (N x H x W) and labels that the shared data= set (the defense split) does not hold."""
    s = load_splits(DataSpec(name="synthetic", num_classes=8, samples=3000))
    return (s.eval.x[:, 0].numpy() * 255).round().astype(np.uint8), s.eval.y.numpy()


def _examples(folder: Path, x: np.ndarray, y: np.ndarray, n: int, start: int = 0) -> Path:
    folder.mkdir(parents=True)
    for j in range(start, start + n):
        Image.fromarray(x[j], "L").save(folder / f"class_{y[j]}_example_{j}.png")
    return folder


@pytest.fixture(scope="module")
def trojai_zoo(models, held_out, tmp_path_factory) -> Path:
    """id-0: backdoored, 120 own examples; id-1: clean, 24 (too few); id-2: clean, none."""
    root = tmp_path_factory.mktemp("trojai-zoo") / "models"
    for i, (kind, n) in enumerate((("backdoored", OWN), ("clean", FEW), ("clean", 0))):
        d = root / f"id-{i:08d}"
        d.mkdir(parents=True)
        shutil.copy(models[kind], d / "model.pt")
        (d / "config.json").write_text('{"model_architecture": "small_cnn"}\n')
        if n:
            _examples(d / "clean-example-data", *held_out, n, start=200 * i)
    return root


def _rows(out: Path) -> dict[str, dict]:
    return {r["model_id"]: r for r in pq.read_table(out / "verdicts.parquet").to_pylist()}


def test_models_are_scanned_on_their_own_examples_when_there_are_enough(trojai_zoo, held_out, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["zoo-scan", f"zoo.path={trojai_zoo}", *FAST, f"out={out}"]) == 0, capsys.readouterr().err
    rows = _rows(out)
    assert {m: r["examples"] for m, r in rows.items()} == {
        "id-00000000": f"own:{OWN}",
        "id-00000001": f"shared (own:{FEW} < zoo.min_examples=100)",
        "id-00000002": "shared",
    }
    assert all(r["error"] is None for r in rows.values()), rows
    assert rows["id-00000000"]["backdoored"] and rows["id-00000000"]["target_class"] == 2, rows["id-00000000"]
    assert not rows["id-00000001"]["backdoored"] and not rows["id-00000002"]["backdoored"]
    assert rows["id-00000000"]["reference"] == "zoo"  # three models: judged against each other, as before
    # its own examples were searched: the first pass equals a scan of that set alone (seed 0, as zoo-scan's)
    from gdm_ray.core.first_pass import ScanConfig, scan_classes
    from gdm_ray.core.model_io import load_model

    own = example_set(trojai_zoo / "id-00000000" / "clean-example-data", [f"class{k}" for k in range(8)], (1, 16, 16))
    net = load_model(trojai_zoo / "id-00000000" / "model.pt").module
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as zoo-scan's threads=1
    try:
        alone = scan_classes(net, own, ScanConfig(steps=150), torch.Generator().manual_seed(0))
    finally:
        torch.set_num_threads(threads)
    sizes = [r["trigger_size"] for r in pq.read_table(out / "classes.parquet").to_pylist() if r["model_id"] == "id-00000000"]
    assert sizes == pytest.approx([c.size for c in alone.classes], abs=1e-3)
    assert (out / "id-00000000" / "classes.png").is_file()


def test_the_fallback_rule_follows_zoo_min_examples_and_zoo_examples(trojai_zoo):
    """The rule alone (no scan): own examples below zoo.min_examples, or zoo.examples=false, mean the shared set."""
    from gdm_ray.cli.compose import compose_settings
    from gdm_ray.cli.zoo import _examples as choose

    files = list_models(trojai_zoo)
    assert [m.examples.name if m.examples else None for m in files] == ["clean-example-data", "clean-example-data", None]
    splits = load_splits(DataSpec(name="synthetic", num_classes=8, samples=3000))

    def notes(*overrides: str) -> dict[str, str]:
        s = compose_settings("zoo-scan", [f"zoo.path={trojai_zoo}", *DATA, *overrides])
        ex = choose(files, s, splits)
        assert set(ex.own) == {m for m, n in ex.notes.items() if n.startswith("own:")} and not ex.errors
        return ex.notes

    assert notes("zoo.min_examples=20") == {"id-00000000": f"own:{OWN}", "id-00000001": f"own:{FEW}", "id-00000002": "shared"}
    assert notes("zoo.min_examples=121")["id-00000000"] == f"shared (own:{OWN} < zoo.min_examples=121)"
    assert notes("zoo.examples=false") == {
        "id-00000000": f"shared (own:{OWN} unused, zoo.examples=false)",
        "id-00000001": f"shared (own:{FEW} unused, zoo.examples=false)",
        "id-00000002": "shared",
    }


def test_a_broken_example_folder_is_that_models_error(models, held_out, tmp_path, capsys):
    """An unlabeled image: the model's row names the folder and the file; the other models are scanned."""
    root = tmp_path / "zoo"
    for i in range(2):
        (root / f"id-{i}").mkdir(parents=True)
        shutil.copy(models["clean"], root / f"id-{i}" / "model.pt")
    folder = _examples(root / "id-0" / "clean_example_data", *held_out, OWN)
    Image.fromarray(held_out[0][0], "L").save(folder / "unlabeled.png")
    out = tmp_path / "out"
    assert main(["zoo-scan", f"zoo.path={root}", *FAST, f"out={out}"]) == 0
    err = capsys.readouterr().err
    rows = _rows(out)
    want = f"examples {folder}: unlabeled.png has no class in its name (class_K_...) and no .json label"
    assert rows["id-0"]["error"] == want and rows["id-0"]["backdoored"] is None, rows["id-0"]
    assert rows["id-1"]["error"] is None and rows["id-1"]["examples"] == "shared"
    assert want in err and "Traceback" not in err


def _image_with_json(text: str):
    def make(d: Path) -> None:
        Image.new("L", (4, 4)).save(d / "a.png")
        (d / "a.json").write_text(text)

    return make


def _two_sizes(d: Path) -> None:
    Image.new("L", (4, 4)).save(d / "class_0_a.png")
    Image.new("L", (5, 4)).save(d / "class_1_b.png")


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: (d / "class_0_a.png").write_bytes(b"not a png"), "class_0_a.png is not a readable image"),
        (_image_with_json("{oops"), "a.json is not readable JSON"),
        (_image_with_json('{"label": "cat"}'), "a.json names no integer label"),
        (_two_sizes, "the images differ in size (class_0_a.png is 4x4x1, class_1_b.png is 4x5x1; H x W x C)"),
        (lambda d: None, "no example images"),
    ],
)
def test_example_folder_errors_are_one_line_naming_the_folder(make, needle, tmp_path):
    d = tmp_path / "clean-example-data"
    d.mkdir()
    make(d)
    with pytest.raises(DataError) as exc:
        load_examples(d)
    assert str(exc.value).startswith(f"{d}: ") and needle in str(exc.value) and "\n" not in str(exc.value)


def test_examples_of_another_shape_or_class_are_refused(held_out, tmp_path):
    d = _examples(tmp_path / "examples", *held_out, 8)
    with pytest.raises(DataError, match=r"the examples are 1x16x16 \(C x H x W\), the scan's data is 3x16x16"):
        example_set(d, [str(k) for k in range(8)], (3, 16, 16))
    with pytest.raises(DataError, match=r"label \d is not a class of the data \(0\.\.1\)"):
        example_set(d, ["a", "b"])
    Image.fromarray(held_out[0][0], "L").save(d / "trojai-round-image.png")
    (d / "trojai-round-image.json").write_text('{"clean_label": 5}')  # a .json beside an image names its label
    x, y = load_examples(d)
    assert x.shape == (9, 16, 16, 1) and y.tolist()[-1] == 5 and sorted(y.tolist()[:8]) == sorted(held_out[1][:8].tolist())


def test_an_s3_zoo_brings_its_example_folders(trojai_zoo, s3_server, bucket, tmp_path, capsys, monkeypatch):
    """zoo.path=s3://...: the prefix is mirrored whole, example folders with their models."""
    monkeypatch.setenv("GDM_RAY_CACHE", str(tmp_path / "cache"))
    s3_server.upload_tree(trojai_zoo, f"s3://{bucket}/round")
    out = tmp_path / "out"
    args = ["zoo-scan", f"zoo.path=s3://{bucket}/round", *DATA, "scan.steps=20", "full_search=false", "use_ray=false",
            f"out={out}", *s3_server.overrides()]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert {m: r["examples"] for m, r in _rows(out).items()} == {
        "id-00000000": f"own:{OWN}",
        "id-00000001": f"shared (own:{FEW} < zoo.min_examples=100)",
        "id-00000002": "shared",
    }


def test_zoo_min_examples_below_two_is_a_config_error(trojai_zoo, tmp_path, capsys):
    assert main(["zoo-scan", f"zoo.path={trojai_zoo}", *FAST, "zoo.min_examples=1", f"out={tmp_path / 'out'}"]) != 0
    err = capsys.readouterr().err
    assert "zoo.min_examples=1 must be >= 2" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
