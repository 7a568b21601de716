"""Zoo layouts: one folder per model (TrojAI's), nested folders, mixed formats, on local disk and S3."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import PINNED_MESA
from conftest import SCAN_DATA as DATA

from gdm_ray.cli.main import main
from gdm_ray.cli.zoo import list_models
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.model_io import load_model, save_safetensors
from gdm_ray.core.models import build_model
from gdm_ray.core.program import save_program

FAST = [*DATA, "scan.steps=150", *PINNED_MESA, "mesa.steps=100", "mesa.eval_samples=128", "samples_per_level=4"]


def _touch(root: Path, rel: str, data: bytes = b"x") -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_model_ids_come_from_their_folders_and_example_data_is_not_a_model(tmp_path):
    for rel in (
        "vendor-a.pt",
        "id-00000001/model.pt",
        "id-00000001/config.json",
        "id-00000001/clean-example-data/class_0_example_0.png",
        "id-00000001/clean-example-data/stray.pt",
        "round2/id-00000002/model.pt2",
        "several/a.safetensors",
        "several/b.pth",
        ".hidden/x.pt",
        "run/ensemble/generators.safetensors",
    ):
        _touch(tmp_path, rel)
    ids = {m.model_id: m.path.relative_to(tmp_path).as_posix() for m in list_models(tmp_path)}
    assert ids == {
        "vendor-a": "vendor-a.pt",
        "id-00000001": "id-00000001/model.pt",
        "round2/id-00000002": "round2/id-00000002/model.pt2",
        "several/a": "several/a.safetensors",
        "several/b": "several/b.pth",
    }
    assert [m.model_id for m in list_models(tmp_path, "round2/*/*")] == ["round2/id-00000002"]


def test_two_models_with_one_id_name_both_paths(tmp_path):
    _touch(tmp_path, "m.pt")
    _touch(tmp_path, "m.safetensors")
    with pytest.raises(ConfigError, match=r"m\.pt and m\.safetensors share the model id 'm'"):
        list_models(tmp_path)


def _small_cnn(ts: Path):
    loaded = load_model(ts)
    net = build_model("small_cnn", loaded.input_shape[0], loaded.num_classes, 8)
    net.load_state_dict(loaded.module.state_dict())
    return net.eval(), loaded.input_shape, loaded.num_classes


def test_a_mixed_zoo_on_s3_is_scanned_in_one_run(s3_server, bucket, models, tmp_path, capsys, monkeypatch):
    """Five formats and three layouts under one S3 prefix: one verdict row per model, the backdoored two flagged."""
    monkeypatch.setenv("GDM_RAY_CACHE", str(tmp_path / "cache"))
    bd, shape, classes = _small_cnn(models["backdoored"])
    clean, _, _ = _small_cnn(models["clean"])
    local = tmp_path / "zoo"
    _touch(local, "vendor-a.pt", models["backdoored"].read_bytes())  # TorchScript at the top
    save_program(clean, _touch(local, "id-00000001/model.pt2"), shape, {})  # TrojAI's layout, a .pt2 program
    _touch(local, "id-00000001/clean-example-data/class_0_example_0.png", b"\x89PNG")
    save_safetensors(clean, _touch(local, "round2/id-00000002/model.safetensors"), "small_cnn", shape, classes, 8)
    torch.save(dict(bd.state_dict()), _touch(local, "weights/w.pth"))  # a weights-only checkpoint of the backdoored net
    torch.save(clean, _touch(local, "pickled/model.pt"))  # a whole pickled module (trusted below)
    s3_server.upload_tree(local, f"s3://{bucket}/zoo")
    out = tmp_path / "out"
    args = ["zoo-scan", f"zoo.path=s3://{bucket}/zoo", *FAST, "use_ray=false", "arch=small_cnn", "arch.width=8",
            "model.allow_pickle=true", f"out={out}", *s3_server.overrides()]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    rows = {r["model_id"]: r for r in pq.read_table(out / "verdicts.parquet").to_pylist()}
    assert set(rows) == {"vendor-a", "id-00000001", "round2/id-00000002", "weights", "pickled"}
    assert all(r["error"] is None for r in rows.values()), rows
    for mid in ("vendor-a", "weights"):  # the same backdoored weights, in two formats
        assert rows[mid]["backdoored"] and rows[mid]["target_class"] == 2, rows[mid]
    assert (out / "round2" / "id-00000002" / "scan.json").is_file()


def test_each_standard_architecture_as_safetensors_is_scanned(tmp_path, capsys):
    """One safetensors file per standard architecture (the arch in each header), zoo-scanned in one run."""
    from gdm_ray.core.standard_models import STANDARD_ARCHS

    kwargs = {
        "preact_resnet18": {"width": 8},
        "vgg16_bn": {"cifar_head": True},
        "mobilenet_v2": {},
        "vit": {"image_size": (16, 16), "patch": 4, "dim": 64, "depth": 2, "heads": 1, "mlp": 64},
    }
    zoo = tmp_path / "zoo"
    for arch, kw in kwargs.items():
        torch.manual_seed(0)
        net = STANDARD_ARCHS[arch](in_channels=1, num_classes=8, **kw).eval()
        save_safetensors(net, _touch(zoo, f"{arch}/weights.safetensors"), arch, (1, 16, 16), 8)
    out = tmp_path / "out"
    args = ["zoo-scan", f"zoo.path={zoo}", *DATA, "scan.steps=30", "full_search=false", "use_ray=false", f"out={out}"]
    assert main(args) == 0, capsys.readouterr().err
    rows = {r["model_id"]: r for r in pq.read_table(out / "verdicts.parquet").to_pylist()}
    assert set(rows) == set(kwargs) and all(r["error"] is None and r["score"] is not None for r in rows.values()), rows
