"""The core stays pure PyTorch: it imports with Ray, Hydra and boto3 blocked."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import gdm_ray.core

BLOCKED = ("ray", "hydra", "omegaconf", "boto3", "botocore")


def test_core_imports_without_ray_hydra_or_boto():
    modules = sorted(m.name for m in pkgutil.iter_modules(gdm_ray.core.__path__, "gdm_ray.core."))
    assert "gdm_ray.core.triggers" in modules and "gdm_ray.core.data" in modules
    code = (
        "import sys\n"
        f"for name in {BLOCKED!r}:\n"
        "    sys.modules[name] = None  # any import of it now raises ImportError\n"
        "import importlib\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print('ok', len(sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")
