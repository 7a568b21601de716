"""Composing a command's config: configs/<command>.yaml on top of its typed
schema (gdm_ray.cli.settings), with Hydra overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gdm_ray.cli.settings import register, settings

__all__ = ["config_dir", "compose_config", "compose_settings"]


def config_dir() -> Path:
    """configs/ of this checkout, or $GDM_RAY_CONFIG_DIR."""
    env = os.environ.get("GDM_RAY_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "configs"
    if not path.is_dir():
        raise FileNotFoundError(f"config folder {path} not found (set GDM_RAY_CONFIG_DIR)")
    return path


def _shorthand(overrides: list[str]) -> list[str]:
    """``model=PATH`` is short for ``model.path=PATH`` (the model group also holds how the file is read)."""
    return [("model.path=" + o[len("model=") :]) if o.startswith("model=") else o for o in overrides]


def compose_config(command: str, overrides: list[str]):
    """Compose configs/<command>.yaml with Hydra overrides (no run): a DictConfig."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register()
    overrides = _shorthand(list(overrides))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=command):
        cfg = compose(config_name=command, overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def compose_settings(command: str, overrides: list[str]) -> Any:
    """The command's typed settings for these overrides, every value checked."""
    return settings(compose_config(command, overrides))
