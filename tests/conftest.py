"""Shared fixtures: small seeded data sets. Keep this file minimal."""

from __future__ import annotations

import os

# Ray reads its authentication mode when it is imported. Local Ray uses
# token authentication by default since 2.59; the two-node cluster of
# test_dist.py (`ray start`) needs it said explicitly, for its nodes and for
# this process, before anything imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")

from pathlib import Path

import pytest
import torch

from gdm_ray.cli.main import main
from gdm_ray.core.data import DataSpec, Splits, load_splits


@pytest.fixture(scope="session")
def synthetic_spec() -> DataSpec:
    """A tiny learnable grey data set: 2000 images of 16x16, 4 classes."""
    return DataSpec(name="synthetic", samples=2000, num_classes=4, image_size=[16, 16], seed=0)


@pytest.fixture(scope="session")
def synthetic_splits(synthetic_spec: DataSpec) -> Splits:
    """Seeded train/defense/eval splits of the synthetic set (treat as read-only)."""
    return load_splits(synthetic_spec)


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seeded generator for each test."""
    return torch.Generator().manual_seed(1234)


# --- small 8-class models made by `gdm-ray attack`, for the scan / zoo-scan / Ray tests ---

SCAN_DATA = ["data=synthetic", "data.num_classes=8", "data.samples=3000", "progress=false", "threads=1"]


def _attack_model(out: Path, rate: float) -> Path:
    args = [
        "attack",
        *SCAN_DATA,
        "train=tiny",
        "arch.width=8",
        "train.epochs=5",
        "attack.target_class=2",
        f"attack.rate={rate}",
        f"out={out}",
    ]
    assert main(args) == 0
    return out / "model.pt"


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    return {"backdoored": _attack_model(root / "bd", 0.2), "clean": _attack_model(root / "clean", 0.0)}


@pytest.fixture(scope="session")
def zoo(models, tmp_path_factory) -> Path:
    """Two real models, a corrupt model file, and a file that is not a model."""
    import shutil

    root = tmp_path_factory.mktemp("zoo-dir")
    shutil.copy(models["backdoored"], root / "vendor-a.pt")
    shutil.copy(models["clean"], root / "vendor-b.pt")
    shutil.copy(models["clean"], root / "vendor-c.pt")  # three working models: classes judged against the zoo
    (root / "broken.pt").write_bytes(b"PK\x03\x04 this is not a TorchScript archive")
    (root / "README.txt").write_text("not a model")
    return root


# --- a real S3-protocol server (moto in server mode) on 127.0.0.1 ---


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from s3server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server, request) -> str:
    """A fresh bucket for one test (name from the test's name)."""
    import re

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") or "b"
    s3_server.client().create_bucket(Bucket=name)
    return name


def finished_trials(read_states) -> dict[str, dict]:
    """Trials a Tune experiment's newest state file records as finished: id -> last
    result. ``read_states()`` returns the state files' texts, oldest first ([] if none)."""
    import json

    try:
        texts = read_states()
        state = json.loads(texts[-1]) if texts else None
    except (OSError, ValueError):  # being replaced (StoreError is an OSError)
        return {}
    done = {}
    for trial_json, meta_json in (state or {}).get("trial_data", []):
        trial = json.loads(trial_json)
        if trial["status"] == "TERMINATED":
            done[trial["trial_id"]] = json.loads(meta_json)["last_result"]
    return done


# CLI runs that test something other than MESA's extent estimate and restarts
# pin the paper's 3x3 square and no restarts (a run of a few steps looks collapsed)
PINNED_MESA = ["mesa.trigger_size=[3,3]", "mesa.restarts=0"]
