"""Shared fixtures: small seeded data sets. Keep this file minimal."""

from __future__ import annotations

import pytest
import torch

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
